"""Conformance: the patched llama.cpp against the PyTorch reference, logit by logit.

Tiny random f32 checkpoints of every dense architecture, every mode x method x
kv x apply, a prompt split into ubatches as llama.cpp splits it, then greedy
token-by-token decode. The KV cache is f32 (type_k = type_v = 0), so the only
differences left are f32 round-off (and ggml's fp16 GELU table, emulated by
the reference).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import (  # noqa: E402
    TINY_ATOL,
    compare_with_reference,
    llama_greedy,
    load_deterministic,
)

from loopcpp import LoopConfig  # noqa: E402
from loopcpp.config import MODES  # noqa: E402

ARCHS = ("llama", "qwen2", "qwen3", "gemma3")
#: Max abs logit difference allowed: conftest.TINY_ATOL (the measurements are noted there).
ATOL = TINY_ATOL
N_DECODE = 16
N_UBATCH = 5
PROMPT_LEN = 12


#: The version-1 values of the settings (LOOPING.md v1), crossed in full.
V1_METHODS = ("naive", "euler", "rk3")
V1_KV = ("last", "first")
V1_APPLIES = ("all", "prefill")


def _configs(n_layer: int) -> list[LoopConfig]:
    a, b = 1, min(3, n_layer - 1)
    return [
        LoopConfig(a, b, count=3, mode=m, method=me, kv=kv, apply=ap)
        for m, me, kv, ap in itertools.product(MODES, V1_METHODS, V1_KV, V1_APPLIES)
    ]


_llama_logits = llama_greedy


@pytest.fixture(scope="module", params=ARCHS)
def pair(request):
    from loopcpp.reference import LoopedReference, emulate_ggml_cpu_gelu
    from loopcpp.tiny import load_hf_model, tiny_checkpoint

    torch.set_num_threads(1)
    hf_dir, gguf = tiny_checkpoint(request.param)
    model = load_hf_model(hf_dir)
    emulate_ggml_cpu_gelu(model)
    ref = LoopedReference(model)
    llm = load_deterministic(gguf, n_ubatch=N_UBATCH)
    prompt = list(range(100, 100 + PROMPT_LEN))
    return request.param, ref, llm, prompt


def _compare(ref, llm, prompt, loop):
    return compare_with_reference(ref, llm, prompt, loop, N_DECODE, N_UBATCH)


def test_stock_matches_reference(pair):
    arch, ref, llm, prompt = pair
    err = _compare(ref, llm, prompt, None)
    assert err < ATOL[arch], f"{arch}: stock llama.cpp vs reference max abs err {err:.2e}"


def test_every_loop_configuration(pair):
    arch, ref, llm, prompt = pair
    n_layer = ref.n_layer
    errors = {}
    for loop in _configs(n_layer):
        errors[loop.describe()] = _compare(ref, llm, prompt, loop)
    worst = max(errors, key=errors.get)
    bad = {k: v for k, v in errors.items() if v >= ATOL[arch]}
    assert not bad, f"{arch}: {len(bad)} configurations off, worst {worst}: {errors[worst]:.2e}"


def test_loop_changes_logits(pair):
    """The loop must do something: K=3 euler differs from the stock model."""
    arch, ref, llm, prompt = pair
    llm.set_loop(None)
    _, stock = _llama_logits(llm, prompt, 2)
    llm.set_loop(LoopConfig(1, 3, count=3))
    _, looped = _llama_logits(llm, prompt, 2)
    assert np.abs(stock - looped).max() > 1e-3


def test_window_at_the_ends(pair):
    """Windows touching the first and the last layer (output rows selected after the loop)."""
    arch, ref, llm, prompt = pair
    n = ref.n_layer
    for loop in (LoopConfig(0, 2, count=2, method="rk3"), LoopConfig(n - 2, n, count=2)):
        err = _compare(ref, llm, prompt, loop)
        assert err < ATOL[arch], f"{arch} {loop.describe()}: {err:.2e}"


def test_window_at_the_end_with_output_selection(pair):
    """Only the last token's logits requested: the rows are selected after the loop."""
    arch, ref, llm, prompt = pair
    n = ref.n_layer
    vocab = llm.n_vocab()
    one = load_deterministic(llm.model_path, n_ubatch=N_UBATCH, logits_all=False)
    for loop in (LoopConfig(n - 2, n, count=3), LoopConfig(0, n, count=2, mode="layer")):
        one.set_loop(loop)
        one.eval(prompt)
        got = np.ctypeslib.as_array(one._ctx.get_logits(), shape=(vocab,)).copy()
        ref.set_loop(loop)
        ref.reset()
        want = ref.run(prompt, N_UBATCH)[-1].numpy()
        err = float(np.abs(got - want).max())
        assert err < ATOL[arch], f"{arch} {loop.describe()}: {err:.2e}"
