"""Bad loop settings are refused with a clear error, never an abort of the process.

The llama.cpp side is driven directly (llama_cpp.Llama with kv_overrides,
llama_set_loop through ctypes) to show that the patch itself refuses them
before any GGML_ASSERT; the Python API refuses them earlier still. Every bad
case runs in this one process, and a good model loads right after.
"""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np
import pytest

from loopcpp import LoopConfig, LoopConfigError, engine
from loopcpp.api import llama_errors, load
from loopcpp.models import fetch

BAD_OVERRIDES = {
    "window past the end": (
        {"loop.start": 20, "loop.end": 40, "loop.count": 2},
        "loop window [20, 40) is invalid for a model with 30 layers",
    ),
    "reversed window": ({"loop.start": 17, "loop.end": 13, "loop.count": 2}, "is invalid"),
    "empty window": ({"loop.start": 13, "loop.end": 13, "loop.count": 2}, "is invalid"),
    "negative start": ({"loop.start": -1, "loop.end": 13, "loop.count": 2}, "is invalid"),
    "K = 0": ({"loop.start": 13, "loop.end": 17, "loop.count": 0}, "loop count 0 is out of range"),
    "K huge": ({"loop.start": 13, "loop.end": 17, "loop.count": 100000}, "out of range"),
    "unknown method": (
        {"loop.start": 13, "loop.end": 17, "loop.count": 2, "loop.method": "simpson"},
        "unknown loop.method 'simpson': use one of naive, euler, rk3",
    ),
    "unknown mode": (
        {"loop.start": 1, "loop.end": 2, "loop.count": 2, "loop.mode": "blocks"},
        "unknown loop.mode",
    ),
    "unknown kv": (
        {"loop.start": 1, "loop.end": 2, "loop.count": 2, "loop.kv": "middle"},
        "unknown loop.kv",
    ),
    "unknown routing": (
        {"loop.start": 1, "loop.end": 2, "loop.count": 2, "loop.routing": "x"},
        "unknown loop.routing",
    ),
    "unknown apply": (
        {"loop.start": 1, "loop.end": 2, "loop.count": 2, "loop.apply": "decode"},
        "unknown loop.apply",
    ),
    "incomplete": ({"loop.start": 13}, "incomplete loop metadata"),
}


@pytest.fixture(scope="module")
def smol():
    return str(fetch("smollm2-135m-instruct"))


@pytest.mark.parametrize("case", list(BAD_OVERRIDES), ids=list(BAD_OVERRIDES))
def test_patch_refuses_bad_overrides(smol, case):
    """llama.cpp refuses the load and logs the reason as an error."""
    overrides, message = BAD_OVERRIDES[case]
    with llama_errors() as errors:
        with pytest.raises(ValueError):
            llama_cpp.Llama(smol, kv_overrides=overrides, verbose=False, n_ctx=64)
    assert any(message in line for line in errors), errors


def test_good_model_loads_after_bad_ones(smol):
    llm = llama_cpp.Llama(
        smol,
        n_ctx=64,
        verbose=False,
        kv_overrides={"loop.start": 13, "loop.end": 17, "loop.count": 2},
    )
    llm.eval(llm.tokenize(b"Hello"))
    assert engine.get_loop(llm._ctx.ctx) == LoopConfig(13, 17, count=2)


def test_set_loop_refuses_invalid_params_in_c(smol):
    """llama_set_loop itself returns -1 and leaves the context's loop as it was."""
    llm = load(smol, loop=LoopConfig(13, 17, count=2), n_ctx=64)
    lib = engine.lib()
    for bad in (
        engine.llama_loop_params(13, 31, 2, 0, 1, 0, 0, 0),  # window past 30 layers
        engine.llama_loop_params(13, 17, 0, 0, 1, 0, 0, 0),  # K = 0
        engine.llama_loop_params(13, 17, 65, 0, 1, 0, 0, 0),  # K > 64
        engine.llama_loop_params(13, 17, 2, 7, 1, 0, 0, 0),  # mode out of range
        engine.llama_loop_params(13, 17, 2, 0, 99, 0, 0, 0),  # method out of range
    ):
        assert lib.llama_set_loop(llm._ctx.ctx, ctypes.byref(bad)) == -1
    assert llm.loop == LoopConfig(13, 17, count=2)
    llm.eval(llm.tokenize(b"Still works"))
    assert np.isfinite(np.asarray(llm._ctx.get_logits()[:10])).all()


def test_python_api_refuses_before_cpp(smol):
    llm = load(smol, loop=False, n_ctx=64)
    with pytest.raises(LoopConfigError, match="out of range for a model with 30 layers"):
        llm.set_loop(LoopConfig(25, 31))
    with pytest.raises(LoopConfigError, match="out of range for a model with 30 layers"):
        load(smol, loop=LoopConfig(0, 40))
    for kwargs, msg in (
        ({"start": 3, "end": 3}, "empty or reversed"),
        ({"start": 0, "end": 2, "count": 0}, "K=0 is out of range"),
        ({"start": 0, "end": 2, "method": "simpson"}, "unknown loop method 'simpson'"),
        ({"start": 0, "end": 2, "count": "3"}, "must be an integer"),
    ):
        with pytest.raises(LoopConfigError, match=msg):
            LoopConfig(**kwargs)
    assert llm.loop is None


def test_bad_files(tmp_path, smol):
    from loopcpp.gguf_io import ModelFileError
    from loopcpp.models import ModelNotFoundError

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(open(smol, "rb").read(100_000))
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    cases = [
        (tmp_path / "missing.gguf", ModelNotFoundError),
        (tmp_path, ModelNotFoundError),
        (text, ModelNotFoundError),
        (truncated, ModelFileError),
    ]
    for path, err in cases:
        with pytest.raises(err) as e:
            load(path)
        assert str(path.name) in str(e.value) or str(path) in str(e.value)
    # and a good model right after, in the same process
    good = load(smol, n_ctx=64)
    assert good.create_completion("Hi", max_tokens=2, temperature=0)["usage"]["completion_tokens"]
