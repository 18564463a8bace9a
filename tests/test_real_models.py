"""The four bundled real models run looped, through llama-cpp-python and the patched llama-cli."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from loopcpp import LoopConfig, build
from loopcpp.api import load
from loopcpp.gguf_io import read_model
from loopcpp.models import fetch
from loopcpp.window import depth_window

MODELS = [
    "smollm2-135m-instruct",
    "gemma3-270m",
    "qwen2.5-coder-0.5b-instruct",
    "qwen2.5-coder-1.5b-instruct",
]
PROMPT = "The capital of France is"


def _loop_for(path) -> LoopConfig:
    n = read_model(path).n_layer
    a, b, _ = depth_window(n)
    return LoopConfig(a, b, count=3)


@pytest.fixture(scope="module", params=MODELS)
def real(request):
    path = fetch(request.param)
    return request.param, path, _loop_for(path)


def test_runs_looped_in_python(real):
    name, path, loop = real
    llm = load(path, loop=loop, n_ctx=256, logits_all=True, n_threads=2)
    assert llm.loop == loop
    tokens = llm.tokenize(PROMPT.encode())
    llm.eval(tokens)
    looped = np.array(llm.scores[: llm.n_tokens])
    llm.set_loop(None)
    llm.eval(tokens)
    stock = np.array(llm.scores[: llm.n_tokens])
    assert np.isfinite(looped).all()
    assert np.abs(looped - stock).max() > 1e-2, f"{name}: the loop changed nothing"
    out = llm.create_completion(PROMPT, max_tokens=8, temperature=0)
    assert out["usage"]["completion_tokens"] > 0


@pytest.fixture(scope="module")
def tools():
    """The patched llama.cpp tools (built incrementally, cached)."""
    return build.dev_lib(tools=True, rpc=True)  # the same configuration as tests/test_rpc.py


def _run(exe, path, loop: LoopConfig | None, *extra: str) -> subprocess.CompletedProcess:
    args = [
        str(exe),
        "-m",
        str(path),
        "-p",
        PROMPT,
        "-n",
        "8",
        "--temp",
        "0",
        "-t",
        "2",
        "-c",
        "256",
        *extra,
    ]
    if loop is not None:
        args += [
            "--override-kv",
            ",".join(
                f"{k}={'int' if isinstance(v, int) else 'str'}:{v}"
                for k, v in loop.to_kv_overrides().items()
            ),
        ]
    return subprocess.run(
        args, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )


def test_runs_looped_in_llama_completion(real, tools):
    name, path, loop = real
    looped = _run(tools / "llama-completion", path, loop, "-no-cnv", "-v")
    assert looped.returncode == 0, looped.stderr[-2000:]
    assert f"loop                  = [{loop.start}, {loop.end}) x {loop.count}" in looped.stderr
    stock = _run(tools / "llama-completion", path, None, "-no-cnv", "-v")
    assert stock.returncode == 0
    assert "loop                  = off" in stock.stderr
    assert looped.stdout.startswith(PROMPT) and stock.stdout.startswith(PROMPT)


def test_runs_looped_in_llama_cli(real, tools):
    name, path, loop = real
    out = _run(tools / "llama-cli", path, loop, "-st")
    assert out.returncode == 0, out.stderr[-2000:]
    reply = out.stdout.split(f"> {PROMPT}", 1)[-1]
    assert "Generation:" in reply and len(reply.split("[ Prompt:")[0].strip()) > 0


def test_llama_tools_refuse_a_bad_window(tools):
    path = fetch("smollm2-135m-instruct")
    bad = LoopConfig(20, 30, count=2)
    args = [
        str(tools / "llama-completion"),
        "-m",
        str(path),
        "-p",
        "x",
        "-n",
        "1",
        "-no-cnv",
        "--override-kv",
        "loop.start=int:20,loop.end=int:40,loop.count=int:2",
    ]
    out = subprocess.run(
        args, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    assert out.returncode != 0
    assert "loop window [20, 40) is invalid for a model with 30 layers" in out.stderr
    assert bad.check(30)  # the same window ending at 30 is fine
