"""The loop on llama.cpp's Vulkan backend equals the CPU backend of the same build.

Needs the patched Vulkan dev build (``python -m loopcpp.build dev --backend vulkan``,
after ``bash scripts/vulkan_deps.sh``) and a Vulkan device; ``make test-vulkan``
does all three and runs this file. Without the build every test here is skipped
(``make test``); with LOOPCPP_VULKAN=1 (set by ``make test-vulkan``) a missing
build or device fails instead. On a machine without a GPU the device is Mesa's
software rasteriser lavapipe (``mesa-vulkan-drivers``), which ggml-vulkan only
uses when asked: GGML_VK_VISIBLE_DEVICES=0 is set unless already given.

Each test runs one subprocess (LLAMA_CPP_LIB_PATH must point at the Vulkan
build before llama_cpp is imported) on a tiny f32 checkpoint
(loopcpp.tiny) and compares the logits of a one-batch prompt and of four
decode steps (fixed tokens, so both devices see the same sequence) between:

- ``cpu``: no layer offloaded and ``op_offload`` off, so every op runs on the CPU
  backend of this build;
- ``vk``: every layer and the output on the Vulkan device (``n_gpu_layers=-1``);
- ``split``: the layers from one strictly inside the loop window on the Vulkan
  device, the rest on the CPU (``n_gpu_layers`` cutting through the window, so
  the window's iterates cross devices every evaluation).

Tolerance: measured first on the stock model (loop off), whose Vulkan logits
differ from the CPU ones by kernel rounding only; ``STOCK_TOL`` bounds that, and
the loop's error is allowed ``LOOP_FACTOR`` times the family's measured stock
error (the loop runs the window several times, so rounding accumulates) with
``LOOP_TOL`` as a floor. The figures behind them are in docs/RESULTS.md
("GPU backends"); every test also checks that the loop changes the logits by
far more than the tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Families of the tiny checkpoints that the patch loops.
FAMILIES = ("llama", "qwen2", "qwen3", "gemma3", "qwen3moe", "olmoe", "deepseek2")

#: max |Vulkan - CPU| of the stock logits allowed. Measured on lavapipe (Mesa 22.3, which
#: reports fp16 and so gets ggml-vulkan's fp16 matrix kernels), logits up to ~4: full offload
#: 4.8e-3 (qwen2) to 8.9e-3 (qwen3), split 2.2e-3 to 2.6e-3 (docs/RESULTS.md, GPU backends).
STOCK_TOL = 3e-2
#: a loop's max |Vulkan - CPU| may be this many times the family's stock error (measured:
#: at most 2.3, llama's rk4 kv=refined anchor_norm with full offload)...
LOOP_FACTOR = 4.0
#: ...or this, whichever is larger
LOOP_TOL = 2e-2
#: every loop must move the CPU logits by more than this (it is on; measured: more than 2)
LOOP_EFFECT = 5e-2

REQUIRED = os.environ.get("LOOPCPP_VULKAN") == "1"

KNOWN_DEFECT = (
    "open defect, not the loop's: on a Vulkan context (lavapipe, Mesa 22.3), changing the "
    "graph of a live context (set_loop, or a stock control vector) corrupts the heap in "
    "llama_decode; CPU and fresh contexts are fine (docs/RESULTS.md, GPU backends)"
)


def _lib_dir() -> Path:
    from loopcpp import build

    return build.cache_dir() / "dev" / "llama.cpp" / build.build_dir_name("vulkan") / "bin"


def _have_build() -> bool:
    return (_lib_dir() / "libllama.so").exists() and (_lib_dir() / "libggml-vulkan.so").exists()


def _missing(why: str) -> None:
    if REQUIRED:
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="module")
def vk_env() -> dict[str, str]:
    if not _have_build():
        _missing(
            f"no Vulkan build in {_lib_dir()}: `make test-vulkan` (or "
            "`bash scripts/vulkan_deps.sh` and `python -m loopcpp.build dev --backend vulkan`)"
        )
    env = {
        **os.environ,
        "LLAMA_CPP_LIB_PATH": str(_lib_dir()),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    env.setdefault("GGML_VK_VISIBLE_DEVICES", "0")  # lavapipe is a CPU-type device
    probe = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    if probe.returncode != 0 or "Vulkan" not in probe.stdout:
        _missing(f"no Vulkan device usable by the build:\n{probe.stdout}\n{probe.stderr[-2000:]}")
    return env


PROBE = textwrap.dedent(
    """
    import llama_cpp
    lib = llama_cpp.llama_cpp._lib
    import ctypes
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_name.restype = ctypes.c_char_p
    lib.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_description.restype = ctypes.c_char_p
    for i in range(lib.ggml_backend_dev_count()):
        d = lib.ggml_backend_dev_get(i)
        print(lib.ggml_backend_dev_name(d).decode(), lib.ggml_backend_dev_description(d).decode())
    """
)

# argv[1]: JSON {"gguf": path, "loops": {name: LoopConfig kwargs}, "what": [...]}; prints JSON
SCRIPT = textwrap.dedent(
    """
    import ctypes, json, sys
    import numpy as np
    import llama_cpp
    import loopcpp
    from loopcpp import LoopConfig

    job = json.loads(sys.argv[1])
    path = job["gguf"]
    loops = {name: LoopConfig(**kw) for name, kw in job["loops"].items()}
    prompt = b"Tide pools along the rocky coast hold sea anemones, small crabs and fish."
    follow = b" The water is cold"
    base = dict(n_ctx=128, n_batch=64, n_ubatch=64, logits_all=True, n_threads=2,
                n_threads_batch=2, type_k=0, type_v=0)
    places = {
        "cpu": dict(n_gpu_layers=0, op_offload=False),
        "vk": dict(n_gpu_layers=-1, op_offload=False),
        "split": dict(n_gpu_layers=job["split_ngl"], op_offload=False),
    }

    def run(llm):
        # the prompt in one batch, then fixed tokens one at a time (they read the KV cache)
        tokens = llm.tokenize(prompt)
        llm.eval(tokens)
        rows = list(llm.scores[: len(tokens)])
        for t in llm.tokenize(follow, add_bos=False)[:4]:
            llm.eval([t])
            rows.append(llm.scores[llm.n_tokens - 1])
        return np.array(rows, dtype=np.float32)

    def logits(loop, place):
        llm = loopcpp.load(path, loop=loop, **base, **places[place])
        try:
            out = run(llm)
            state = int(llama_cpp.llama_state_get_size(llm._ctx.ctx))
            return out, state
        finally:
            llm.close()

    result = {}
    stock = {p: logits(False, p) for p in places}
    for p in ("vk", "split"):
        result[f"stock {p}"] = float(np.abs(stock[p][0] - stock["cpu"][0]).max())
    result["max |logit|"] = float(np.abs(stock["cpu"][0]).max())
    for name, loop in loops.items():
        got = {p: logits(loop, p) for p in places}
        for p in ("vk", "split"):
            result[f"{name} {p}"] = float(np.abs(got[p][0] - got["cpu"][0]).max())
            # the loop adds no state: the bytes of a saved context equal stock's
            result[f"{name} {p} state"] = [got[p][1], stock[p][1]]
        result[f"{name} effect"] = float(np.abs(got["cpu"][0] - stock["cpu"][0]).max())

    if job.get("reuse"):
        # one Vulkan context: loop A, then set_loop to loops of other counts and settings (and
        # off); each must equal a fresh context of that loop, and decode graphs must be reused
        # after the change
        names = list(loops)
        for place in ("vk", "split"):
            llm = loopcpp.load(path, loop=loops[names[0]], **base, **places[place])
            try:
                run(llm)
                for name in names[1:] + [None, names[0]]:
                    llm.set_loop(loops[name] if name else None)
                    before = llama_cpp.llama_perf_context(llm._ctx.ctx).n_reused
                    out = run(llm)
                    reused = llama_cpp.llama_perf_context(llm._ctx.ctx).n_reused - before
                    fresh = logits(loops[name] if name else False, place)[0]
                    key = f"reuse {place} -> {name or 'off'}"
                    result[key] = float(np.abs(out - fresh).max())
                    result[key + " reused"] = int(reused)
            finally:
                llm.close()
    print(json.dumps(result))
    """
)


def _loops(n_layer: int) -> tuple[dict[str, dict], int]:
    """Loops over a window inside the model, and the n_gpu_layers cutting through it."""
    start, end = 1, n_layer - 1  # 4 layers: [1, 3); gemma3's 6: [1, 5)
    mid = start + 1  # layers >= mid on the device: the cut is strictly inside the window
    split_ngl = n_layer + 1 - mid  # llama.cpp offloads layers >= n_layer + 1 - n_gpu_layers
    w = dict(start=start, end=end)
    loops = {
        # version 1
        "v1 euler K=3": dict(w, count=3),
        "v1 rk3 K=2 layer kv=first": dict(w, count=2, method="rk3", mode="layer", kv="first"),
        "v1 naive K=2 apply=prefill": dict(w, count=2, method="naive", apply="prefill"),
        # version 2 (docs/LOOPING.md): anchor, norm interp, kv refined, apply first
        "v2 euler K=4 anchor=0.5 norm=interp": dict(w, count=4, anchor=0.5, norm="interp"),
        "v2 rk4 K=2 kv=refined anchor_norm": dict(
            w, count=2, method="rk4", kv="refined", anchor_norm=True
        ),
        "v2 heavy_ball K=3 apply=first n=2": dict(
            w, count=3, method="heavy_ball", apply="first", apply_n=2
        ),
    }
    return loops, split_ngl


def _n_layer(gguf_path: Path) -> int:
    from loopcpp.gguf_io import read_model

    return int(read_model(gguf_path).n_layer)


def _run(env: dict[str, str], job: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(job)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _tiny(family: str) -> Path:
    pytest.importorskip("transformers")
    from loopcpp.tiny import tiny_checkpoint

    return tiny_checkpoint(family)[1]


def _check(result: dict, loops: dict) -> None:
    for p in ("vk", "split"):
        assert result[f"stock {p}"] <= STOCK_TOL, f"stock {p}: {result}"
    for name in loops:
        assert result[f"{name} effect"] > LOOP_EFFECT, f"{name}: is the loop on? {result}"
        for p in ("vk", "split"):
            tol = max(LOOP_TOL, LOOP_FACTOR * result[f"stock {p}"])
            assert result[f"{name} {p}"] <= tol, f"{name} {p}: {result[f'{name} {p}']} > {tol}"
            looped, stock = result[f"{name} {p} state"]
            assert looped == stock, f"{name} {p}: state {looped} bytes, stock {stock}"


DEEPSEEK2_NORM_INTERP = (
    "open: deepseek2 (MLA + MoE), v2 euler K=4 anchor 0.5 norm=interp with every layer on the "
    "Vulkan device differs from the CPU by 1.46 (its stock error 9.5e-3; the split placement "
    "and the other five loops agree within 1.4e-2): an expert routed differently or a real "
    "defect, not yet told apart (docs/RESULTS.md, GPU backends)"
)


@pytest.mark.parametrize(
    "family",
    [
        pytest.param(f, marks=pytest.mark.xfail(strict=True, reason=DEEPSEEK2_NORM_INTERP))
        if f == "deepseek2" else f
        for f in FAMILIES
    ],
)
def test_loop_on_vulkan_equals_cpu(vk_env: dict[str, str], family: str) -> None:
    gguf_path = _tiny(family)
    loops, split_ngl = _loops(_n_layer(gguf_path))
    result = _run(vk_env, {"gguf": str(gguf_path), "loops": loops, "split_ngl": split_ngl})
    print(family, json.dumps(result))
    _check(result, loops)


@pytest.mark.xfail(
    strict=True,
    reason=KNOWN_DEFECT,
)
def test_set_loop_of_another_count_on_vulkan(vk_env: dict[str, str]) -> None:
    """set_loop on a Vulkan context: to loops of other counts and settings, off, and back.
    Each change must give the logits of a fresh context of the new loop, and decode graphs
    must be reused again after it (full offload, and the window split between devices).

    Open defect (xfail, strict: it fails the suite once fixed, so the mark gets removed):
    from a looped graph to another loop, llama_decode crashes in lavapipe's queue thread
    (a call through a null pointer; glibc reports "corrupted double-linked list"), with
    logits_all, n_batch 64, op_offload off. Reproduced on the tiny llama, window [1, 3), K 5 -> 2,
    5 -> 1, 1 -> 5, 5 -> off, for full offload and the split; not with the same loop set
    again, or fresh contexts one after another. The stock graph change of the next test
    crashes the same way, so the cause is below the loop (llama.cpp's scheduler re-reserve
    on a live ggml-vulkan backend, or lavapipe)."""
    gguf_path = _tiny("llama")
    n_layer = _n_layer(gguf_path)
    w = dict(start=1, end=n_layer - 1)
    loops = {
        "K=2": dict(w, count=2),
        "K=5 rk3": dict(w, count=5, method="rk3"),
        "K=3 kv=refined anchor=0.3": dict(w, count=3, kv="refined", anchor=0.3),
        "K=1": dict(w, count=1),
    }
    job = {"gguf": str(gguf_path), "loops": loops, "split_ngl": n_layer - 1, "reuse": True}
    result = _run(vk_env, job)
    print(json.dumps(result))
    for place in ("vk", "split"):
        for name in [*list(loops)[1:], None, "K=2"]:
            key = f"reuse {place} -> {name or 'off'}"
            assert result[key] <= LOOP_TOL, f"{key}: {result[key]}"
            assert result[key + " reused"] >= 2, f"{key}: graphs reused {result[key + ' reused']}"


CVEC = textwrap.dedent(
    """
    import ctypes, sys
    import llama_cpp
    import loopcpp

    llm = loopcpp.load(sys.argv[1], loop=False, n_ctx=128, n_batch=64, n_ubatch=64,
                       logits_all=True, n_gpu_layers=-1, op_offload=False, type_k=0, type_v=0)
    n_embd = llama_cpp.llama_model_n_embd(llm._model.model)
    n_layer = llama_cpp.llama_model_n_layer(llm._model.model)
    n = n_embd * n_layer
    data = (ctypes.c_float * n)(*([0.01] * n))

    def run():
        llm.reset()
        llm.eval(llm.tokenize(b"Tide pools along the rocky coast hold sea anemones."))
        for t in llm.tokenize(b" The water is cold", add_bos=False)[:4]:
            llm.eval([t])

    run()
    for _ in range(3):
        llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, data, n, n_embd, 1, n_layer - 1)
        run()
        llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, None, 0, n_embd, 0, 0)
        run()
    print("ok")
    """
)


@pytest.mark.xfail(strict=True, reason=KNOWN_DEFECT)
def test_stock_graph_change_on_vulkan(vk_env: dict[str, str]) -> None:
    """The same defect without any loop: a control vector on, off and on again (llama.cpp's
    own way of changing a live context's graph, which re-reserves the scheduler as set_loop
    does) crashes a stock (loop-free) context on the Vulkan device."""
    proc = subprocess.run(
        [sys.executable, "-c", CVEC, str(_tiny("llama"))],
        env=vk_env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        f"exit {proc.returncode}:\n{proc.stderr[-2000:]}"
    )
