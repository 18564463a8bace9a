"""The C side's own refusals (D8): llama_loop_check / llama_set_loop without the Python
pre-checks, and a model load with an unknown loop.* key or a key of the wrong type."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest
from conftest import require_patched

from loopcpp import LoopConfig, engine


@pytest.fixture(scope="module")
def tiny():
    require_patched()
    from loopcpp.api import load
    from loopcpp.tiny import tiny_checkpoint

    _, gguf = tiny_checkpoint("llama")
    llm = load(gguf, loop=LoopConfig(1, 3, count=2), n_ctx=32, n_threads=1, n_threads_batch=1)
    yield gguf, llm
    llm.close()


BAD = {
    "anchor above 1": (dict(anchor=1.5), "loop anchor 1.5 is out of range"),
    "anchor below 0": (dict(anchor=-0.1), "loop anchor -0.1 is out of range"),
    "negative step": (dict(step=-0.5), "loop step -0.5 is out of range"),
    "step above 1": (dict(step=1.5), "loop step 1.5 is out of range"),
    "step with naive": (dict(step=0.5, method=0), "loop step has no effect with method naive"),
    "step with uniform": (dict(step=0.5, method=10), "no effect with method uniform"),
    "interp with rk4": (dict(norm=1, method=5), "loop norm interp needs method euler, not rk4"),
    "first without n": (dict(apply=2, apply_n=0), "loop apply first needs apply_n >= 1"),
    "n without first": (dict(apply_n=2), "loop apply_n 2 needs apply first"),
    "momentum 1": (dict(momentum=1.0), "loop momentum 1 is out of range"),
    "uniform in layer mode": (dict(method=10, mode=1), "uniform runs in block mode only"),
    "norm out of range": (dict(norm=7), "out of range"),
}


@pytest.mark.parametrize("case", BAD)
def test_llama_loop_check_and_set_loop_refuse(tiny, case):
    _, llm = tiny
    changes, message = BAD[case]
    params = engine.to_params(LoopConfig(1, 3, count=2))
    for name, value in changes.items():
        setattr(params, name, value)
    err = ctypes.create_string_buffer(512)
    assert engine.lib().llama_loop_check(llm._model.model, ctypes.byref(params), err, 512) == -1
    assert message in err.value.decode(), err.value
    assert engine.lib().llama_set_loop(llm._ctx.ctx, ctypes.byref(params)) == -1
    assert llm.loop == LoopConfig(1, 3, count=2)  # unchanged


_LOAD = """
import sys, json, llama_cpp
overrides = json.loads(sys.argv[2])
try:
    llama_cpp.Llama(sys.argv[1], n_ctx=32, verbose=True, kv_overrides=overrides)
except ValueError as e:
    print("refused:", e)
else:
    print("loaded")
"""


def _load(gguf, overrides):
    import json

    return subprocess.run(
        [sys.executable, "-c", _LOAD, str(gguf), json.dumps(overrides)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )


WINDOW = {"loop.start": 1, "loop.end": 3, "loop.count": 2}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"loop.anchr": 0.5}, "unknown loop key 'loop.anchr' in the kv overrides"),
        ({"loop.anchor": "0.5"},
         "kv override of loop key 'loop.anchor' has type str, expected float"),
        ({"loop.anchor_norm": 1}, "loop key 'loop.anchor_norm' has type int, expected bool"),
        ({"loop.anchor": 1.5}, "loop anchor 1.5 is out of range"),
        ({"loop.norm": "interp", "loop.method": "heun"}, "norm interp needs method euler"),
    ],
)
def test_load_refuses_unknown_and_mistyped_loop_keys(tiny, extra, message):
    gguf, _ = tiny
    proc = _load(gguf, {**WINDOW, **extra})
    assert "refused:" in proc.stdout, proc.stdout + proc.stderr[-800:]
    assert message in proc.stderr, proc.stderr[-800:]


def test_load_accepts_every_v2_key(tiny):
    gguf, _ = tiny
    v2 = {"loop.step": 0.5, "loop.anchor": 0.5, "loop.norm": "interp", "loop.anchor_norm": True,
          "loop.momentum": 0.2, "loop.apply": "first", "loop.apply_n": 2, "loop.kv": "refined"}
    proc = _load(gguf, {**WINDOW, **v2})
    assert "loaded" in proc.stdout, proc.stderr[-800:]
    assert "step = 0.5, anchor = 0.5, norm = interp, anchor_norm, apply_n = 2" in proc.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"loop.bogus": ("x", "STRING")}, "unknown loop key 'loop.bogus' in the model file"),
        ({"loop.anchor": ("0.5", "STRING")},
         "loop key 'loop.anchor' has GGUF type str, expected f32"),
        ({"loop.apply_n": (2, "INT32")}, "loop key 'loop.apply_n' has GGUF type i32, expected u32"),
    ],
)
def test_load_refuses_unknown_and_mistyped_keys_in_the_file(tiny, tmp_path, extra, message):
    import gguf

    from loopcpp import gguf_io

    src_path, _ = tiny
    src = gguf_io.read_gguf(src_path)
    u32 = gguf.GGUFValueType.UINT32
    kvs = {"loop.start": gguf_io.KV(1, u32), "loop.end": gguf_io.KV(3, u32),
           "loop.count": gguf_io.KV(2, u32)}
    kvs.update({k: gguf_io.KV(v, getattr(gguf.GGUFValueType, t)) for k, (v, t) in extra.items()})
    out = tmp_path / "bad.gguf"
    tensors = [gguf_io.TensorOut(t.name, t) for t in src.tensors]
    with out.open("wb") as dst:
        gguf_io._write_gguf_stream(dst, src, gguf_io.rewrite_metadata(src, kvs), tensors)
    proc = _load(out, {})
    assert "refused:" in proc.stdout, proc.stdout + proc.stderr[-800:]
    assert message in proc.stderr, proc.stderr[-800:]
