"""Conformance of the mixture-of-experts and MLA families: patched llama.cpp vs the reference.

Tiny random f32 checkpoints of qwen3moe (softmax top-k), olmoe (softmax top-k,
unnormalised weights) and deepseek2 (DeepSeek-V3: multi-head latent attention,
sigmoid scores with a selection bias, expert groups, a shared expert, routed
scaling and a dense leading layer). Every mode, method, kv, routing and apply
value is run on each: a prompt split into ubatches as llama.cpp splits it, then
greedy token-by-token decode, f32 KV cache, logits compared one by one.

The grid is the full version-1 mode x method x kv x routing x apply product (48
loops per architecture; version 2 is in test_conformance_v2). llama.cpp (n_threads
and n_threads_batch) and torch run single-threaded: on two busy cores that is far
faster than two threads each (llama.cpp's thread barrier spins), and keeps the file around a minute.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from conftest import load_deterministic, one_torch_thread

torch = pytest.importorskip("torch")

from test_conformance import (  # noqa: E402  (the same comparison as the dense suite)
    N_UBATCH,
    PROMPT_LEN,
    V1_APPLIES,
    V1_KV,
    V1_METHODS,
    _compare,
    _llama_logits,
)

from loopcpp import LoopConfig  # noqa: E402
from loopcpp.config import MODES, ROUTINGS  # noqa: E402

ARCHS = ("qwen3moe", "olmoe", "deepseek2")
#: Max abs logit difference allowed. Stock llama.cpp is ~4e-6 from the reference on
#: all three (f32 cache); looped runs measured up to 2.5e-5 (deepseek2, window
#: over the dense leading layer).
ATOL = 1e-4
WINDOW = (1, 3)


def _grid() -> list[LoopConfig]:
    return [
        LoopConfig(*WINDOW, count=3, mode=m, method=me, kv=kv, routing=r, apply=ap)
        for m, me, kv, r, ap in itertools.product(MODES, V1_METHODS, V1_KV, ROUTINGS, V1_APPLIES)
    ]


def _load(gguf, loop=False):
    return load_deterministic(gguf, loop, n_ubatch=N_UBATCH)


_pairs: dict[str, tuple] = {}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield
    for _, _, llm, _, _ in _pairs.values():
        llm.close()
    _pairs.clear()


def _pair(arch: str) -> tuple:
    """``(arch, reference, stock-loaded llama, prompt, gguf path)``, built once per module."""
    if arch not in _pairs:
        from loopcpp.reference import LoopedReference
        from loopcpp.tiny import load_hf_model, tiny_checkpoint

        hf_dir, gguf = tiny_checkpoint(arch)
        ref = LoopedReference(load_hf_model(hf_dir))
        prompt = list(range(100, 100 + PROMPT_LEN))
        _pairs[arch] = (arch, ref, _load(gguf), prompt, gguf)
    return _pairs[arch]


@pytest.fixture(params=ARCHS)
def pair(request):
    return _pair(request.param)


def test_stock_matches_reference(pair):
    arch, ref, llm, prompt, _ = pair
    err = _compare(ref, llm, prompt, None)
    assert err < ATOL, f"{arch}: stock llama.cpp vs reference max abs err {err:.2e}"


def test_every_loop_configuration(pair):
    arch, ref, llm, prompt, _ = pair
    errors = {loop.describe(): _compare(ref, llm, prompt, loop) for loop in _grid()}
    worst = max(errors, key=errors.get)
    bad = {k: v for k, v in errors.items() if v >= ATOL}
    assert not bad, f"{arch}: {len(bad)} configurations off, worst {worst}: {errors[worst]:.2e}"


def test_windows_at_the_ends(pair):
    """Windows over the first layer (deepseek2's dense one) and over the last layer."""
    arch, ref, llm, prompt, _ = pair
    n = ref.n_layer
    for loop in (
        LoopConfig(0, 2, count=2, method="rk3", mode="layer"),
        LoopConfig(n - 2, n, count=2, kv="first", routing="fresh"),
    ):
        err = _compare(ref, llm, prompt, loop)
        assert err < ATOL, f"{arch} {loop.describe()}: {err:.2e}"


def test_frozen_routing_differs_from_fresh_in_llama_cpp():
    _, _, llm, prompt, _ = _pair("qwen3moe")
    loop = LoopConfig(*WINDOW, count=3)
    out = {}
    for routing in ROUTINGS:
        llm.set_loop(loop.with_(routing=routing))
        out[routing] = _llama_logits(llm, prompt, 0)[1]
    assert np.abs(out["frozen"] - out["fresh"]).max() > 1e-2
    # with K = 1 there is nothing to freeze: bit-identical
    for routing in ROUTINGS:
        llm.set_loop(loop.with_(count=1, routing=routing))
        out[routing] = _llama_logits(llm, prompt, 0)[1]
    assert np.array_equal(out["frozen"], out["fresh"])


def test_mla_state_size_equals_stock():
    """The MLA cache (latent + rope part) does not grow with K: state bytes equal stock's."""
    import llama_cpp

    _, ref, _, prompt, gguf = _pair("deepseek2")
    # the MLA cache holds one f32 latent + rope row per token and layer (no V cache)
    cfg = ref.config
    kv_bytes = ref.n_layer * len(prompt) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    sizes = {}
    for name, loop in (
        ("stock", False),
        ("looped", LoopConfig(0, 4, count=4, method="rk3", mode="layer", kv="first")),
    ):
        other = _load(gguf, loop=loop)
        try:
            other.eval(prompt)
            sizes[name] = int(llama_cpp.llama_state_get_size(other._ctx.ctx))
        finally:
            other.close()
    assert kv_bytes <= sizes["stock"] < 2 * kv_bytes, (sizes, kv_bytes)
    assert sizes["looped"] == sizes["stock"], sizes
