"""The patched library against the unpatched build of the same source and flags.

With no loop, and with loops that compute the stock model (naive or euler,
K = 1), the logits of a prompt and 32 greedy decoded tokens are bit-identical.
Each run is a separate process that loads its library via LLAMA_CPP_LIB_PATH.
"""

from __future__ import annotations

import pytest

from loopcpp import build
from loopcpp.bench import Variant, run_variant
from loopcpp.config import LoopConfig
from loopcpp.models import fetch

N_PROMPT, N_DECODE = 64, 32


@pytest.fixture(scope="module")
def smol():
    return fetch("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def stock(smol):
    out = run_variant(Variant("stock", build.stock_lib(), smol), N_PROMPT, N_DECODE, threads=2)
    return out


@pytest.mark.parametrize(
    "loop",
    [
        None,
        LoopConfig(13, 17, count=1),
        LoopConfig(13, 17, count=1, method="naive", mode="layer", kv="first"),
        LoopConfig(0, 30, count=1, apply="prefill"),
    ],
    ids=["no-loop", "euler-k1", "naive-k1-layer", "whole-stack-k1"],
)
def test_bit_identical_to_stock(smol, stock, loop):
    overrides = loop.to_kv_overrides() if loop else {}
    out = run_variant(Variant("patched", None, smol, overrides), N_PROMPT, N_DECODE, threads=2)
    assert out["logits_sha"] == stock["logits_sha"]
    assert out["state_bytes"] == stock["state_bytes"]


def test_a_real_loop_differs(smol, stock):
    loop = LoopConfig(13, 17, count=3)
    out = run_variant(
        Variant("looped", None, smol, loop.to_kv_overrides()), N_PROMPT, N_DECODE, threads=2
    )
    assert out["logits_sha"] != stock["logits_sha"]
    # the KV cache (and so the saved state) does not grow with K
    assert out["state_bytes"] == stock["state_bytes"]
