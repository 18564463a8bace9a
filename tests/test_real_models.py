"""The three bundled real models run looped, through llama-cpp-python and the patched llama-cli."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from loopcpp import LoopConfig, build
from loopcpp.api import load
from loopcpp.gguf_io import read_model
from loopcpp.models import fetch
from loopcpp.window import depth_window

MODELS = ["smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct"]
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
def llama_cli():
    exe = build.dev_lib(tools=True).parent / "bin" / "llama-completion"
    if not exe.exists():
        exe = exe.parent / "llama-cli"
    return exe


def _cli(exe, path, overrides: list[str]) -> subprocess.CompletedProcess:
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
        "--no-warmup",
        "-c",
        "256",
    ]
    for ov in overrides:
        args += ["--override-kv", ov]
    if exe.name == "llama-cli":
        args.append("-no-cnv")
    return subprocess.run(
        args, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )


def test_runs_looped_in_llama_cli(real, llama_cli):
    name, path, loop = real
    ov = [
        f"loop.start=int:{loop.start}",
        f"loop.end=int:{loop.end}",
        f"loop.count=int:{loop.count}",
        "loop.method=str:euler",
    ]
    looped = _cli(llama_cli, path, ov)
    assert looped.returncode == 0, looped.stderr[-2000:]
    assert f"[{loop.start}, {loop.end}) x {loop.count}" in looped.stderr  # the context's loop line
    stock = _cli(llama_cli, path, [])
    assert stock.returncode == 0
    assert "loop                  = off" in stock.stderr


def test_llama_cli_refuses_a_bad_window(llama_cli):
    path = fetch("smollm2-135m-instruct")
    bad = _cli(llama_cli, path, ["loop.start=int:20", "loop.end=int:40", "loop.count=int:2"])
    assert bad.returncode != 0
    assert "loop window [20, 40) is invalid for a model with 30 layers" in bad.stderr
