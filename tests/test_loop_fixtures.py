"""The looped architectures no transformers class builds, on llama.cpp's own random fixtures.

Remote-code models (DeciLM, InternLM2, Baichuan, ...) and builders without a Hugging Face
counterpart have no reference to compare with, but their loop can still be held to what
needs no oracle. The tiny GGUF is the one llama.cpp's ``test-llama-archs`` writes
(loopcpp.tiny.fixture_checkpoint: 2 layers for most architectures, seeded, random weights):

1. K = 1 (euler; naive in layer mode with kv = first) and no loop give logits bit-identical
   to the unpatched build of the same source, each library in its own process.
2. A loop runs: both modes at K = 3 change the logits of a ubatched prefill and 16 decoded
   tokens, and every logit is finite.
3. The sequence state after a looped prompt (a window reaching the last layer) has the stock
   model's size; with kv = first its bytes (K/V cells and recurrent states) equal the stock
   model's, with kv = last they differ.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    assert_kv_first_keeps_the_natural_pass,
    k1_mismatches,
    llama_greedy,
    load_deterministic,
    require_patched,
)

from loopcpp import LoopConfig, archs
from loopcpp.tiny import TINY_ARCHS, fixture_checkpoint

#: Looped architectures without a tiny transformers recipe (those have conformance suites).
FIXTURE_ARCHS = tuple(a for a in archs.LOOP_ARCHS if a not in TINY_ARCHS)
#: llama.cpp's test-llama-archs writes no model of these (its arch_supported / saver list).
NO_FIXTURE = {
    a: "llama.cpp's test-llama-archs writes no model of it (its saver or arch_supported list)"
    for a in ("bitnet", "deepseek2-ocr", "plm", "step35", "gemma3n", "chameleon")
}
NO_FIXTURE.update({
    a: "no fixture: test-llama-archs disables its RWKV models; loopcpp writes RWKV-6 and RWKV-7 "
    "ones only (loopcpp.tiny._RWKV_LAYER), not the Qwen-FFN hybrids"
    for a in ("rwkv6qwen2", "arwkv7")
})
ARCHS = tuple(a for a in FIXTURE_ARCHS if a not in NO_FIXTURE)

N_UBATCH = 5
PROMPT = list(range(10, 22))
N_DECODE = 16


def _record(arch: str, key: str, value: object) -> None:
    from test_conformance_archs import _record as record

    record(arch, key, value)


def test_k1_bit_identical_to_stock_build():
    require_patched()
    loops = {
        "no-loop": None,
        "euler-k1": {"start": 0, "end": 1, "count": 1},
        "euler-k1-first": {"start": 0, "end": 2, "count": 1, "kv": "first"},
        "naive-k1-layer": {"start": 0, "end": 2, "count": 1, "method": "naive",
                           "mode": "layer", "kv": "first"},
    }
    off = k1_mismatches(loops, ARCHS, _record, key="fixture_k1_identical")
    assert not off, f"not bit-identical to the stock build: {off}"


@pytest.mark.parametrize("arch", ARCHS)
def test_loop_runs_and_persists_the_chosen_evaluation(arch):
    require_patched()
    import llama_cpp

    llm = load_deterministic(fixture_checkpoint(arch), n_ubatch=N_UBATCH)
    try:
        n = llama_cpp.llama_model_n_layer(llm._model.model)
        stock = llama_greedy(llm, PROMPT, N_DECODE)[1]
        for mode in ("block", "layer"):
            llm.set_loop(LoopConfig(0, n, count=3, mode=mode))
            got = llama_greedy(llm, PROMPT, N_DECODE)[1]
            assert got.shape == stock.shape
            assert np.isfinite(got).all(), f"{arch}: {mode} loop gave non-finite logits"
            assert not np.array_equal(got, stock), f"{arch}: the {mode} loop changed nothing"
        assert_kv_first_keeps_the_natural_pass(llm, PROMPT, arch)
    finally:
        llm.close()
    _record(arch, "fixture_loop", True)


def test_every_looped_arch_is_tested_somewhere():
    """A recipe (the conformance suites) or a fixture here, or the reason there is neither."""
    for arch in archs.LOOP_ARCHS:
        assert arch in TINY_ARCHS or arch in ARCHS or arch in NO_FIXTURE, arch
