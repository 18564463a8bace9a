"""Conformance of the recurrent and hybrid architectures (cpp_patch/0006, the recurrent state
stash), on tiny random f32 checkpoints.

1. Stock llama.cpp (the patched library, no loop) against transformers: a prompt split into
   ubatches, then 16 greedy decoded tokens; every logit row against one transformers forward.
2. Looped llama.cpp against the PyTorch reference (loopcpp/reference.py, whose stash keeps the
   recurrent states by the same rule): both modes x euler/rk3 x kv first/last at K = 3 on the
   window [1, 3), kv = refined, and a window reaching the last layer; prefill in ubatches,
   16 decoded tokens, the loop on throughout.
3. The state after a looped ubatch is the chosen evaluation's: a looped prefill, then the loop
   off, in llama.cpp and the reference alike (later tokens read only what persisted); with
   kv = first and a window that reaches the last layer, every layer persists its natural pass,
   so the sequence's state bytes equal the stock model's, and the state size never changes.
4. K = 1 and no loop against the unpatched build: bit-identical logits.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import (  # noqa: E402
    assert_kv_first_keeps_the_natural_pass,
    compare_with_reference,
    k1_mismatches,
    llama_greedy,
    load_deterministic,
    one_torch_thread,
    require_patched,
    seq_state,
)

from loopcpp import archs  # noqa: E402
from loopcpp.tiny import TINY_ARCHS  # noqa: E402

#: The recurrent and hybrid architectures 0006 loops (after the plain decoders in LOOP_ARCHS).
ARCHS = tuple(a for a in archs.RECURRENT_ARCHS if a in TINY_ARCHS)

N_UBATCH = 5
PROMPT_LEN = 12
N_DECODE = 16
DEFAULT_ATOL = 1e-4
#: Stock llama.cpp vs transformers: DEFAULT_ATOL unless listed.
STOCK_ATOL: dict[str, float] = {}
#: Stock llama.cpp does not match transformers here (cause not found yet): left out of the
#: comparisons with transformers and the reference, still in the llama.cpp-only tests (state
#: bytes, K = 1 identity). The measured error is the reason.
STOCK_MISMATCH: dict[str, str] = {}
#: transformers 5.24's Mamba-1 scan (mamba, jamba) ignores the cached state when a
#: multi-token forward continues a sequence (mamba_selective_scan takes no initial state),
#: so a prompt split into ubatches is wrong there; llama.cpp's is right. These prefill in
#: one ubatch (decode steps still read the persisted states).
PREFILL_UBATCH = {"mamba": PROMPT_LEN, "jamba": PROMPT_LEN}
REF_ARCHS = tuple(a for a in ARCHS if a not in STOCK_MISMATCH)
#: Looped llama.cpp vs the reference.
LOOP_ATOL: dict[str, float] = {
    # qwen35 (gated delta net): stock is 8.2e-5 off transformers at the first row of the second
    # ubatch (chunked GDN round-off); the looped rk3/block kv=last run grows to 1.0e-3 over the
    # decoded tokens, where the f32 reference itself is 2e-4 from the same reference in f64
    # and llama.cpp 8e-4 from it: f32 round-off amplified by the loop, not a semantic gap.
    "qwen35": 2e-3,
    # the same gated delta net: measured worst 1.7e-4 (qwen35moe, euler/block kv=refined) and
    # 1.5e-3 (qwen3next, euler/block kv=refined), stock within 1e-4
    "qwen35moe": 2e-3,
    "qwen3next": 2e-3,
}

RESULTS = os.environ.get("LOOPCPP_ARCH_RESULTS")


def _record(arch: str, key: str, value: object) -> None:
    if not RESULTS:
        return
    path = os.path.abspath(RESULTS)
    data = json.load(open(path)) if os.path.exists(path) else {}
    data.setdefault(arch, {})[key] = value
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


def test_the_suite_covers_the_priority_archs():
    for arch in ("qwen35", "lfm2", "falcon-h1", "mamba2"):
        assert arch in REF_ARCHS
    assert set(ARCHS) <= set(archs.LOOP_ARCHS)
    assert not set(ARCHS) & set(archs.NOT_LOOPED)


@pytest.mark.parametrize("arch", REF_ARCHS)
def test_stock_matches_transformers(arch):
    require_patched()
    from loopcpp.tiny import load_hf_model, tiny_checkpoint

    hf_dir, gguf = tiny_checkpoint(arch)
    llm = load_deterministic(gguf, n_ubatch=N_UBATCH)
    try:
        prompt = list(range(100, 100 + PROMPT_LEN))
        got = llama_greedy(llm, prompt, N_DECODE)[1]
        tokens = prompt + [int(t) for t in np.argmax(got[PROMPT_LEN - 1 : -1], axis=-1)]
    finally:
        llm.close()
    model = load_hf_model(hf_dir)
    with torch.no_grad():
        want = model(torch.tensor([tokens])).logits[0].float().numpy()
    assert got.shape == want.shape
    err = float(np.abs(got - want).max())
    atol = STOCK_ATOL.get(arch, DEFAULT_ATOL)
    _record(arch, "stock_err", err)
    _record(arch, "stock_atol", atol)
    assert err < atol, f"{arch}: stock llama.cpp vs transformers max abs err {err:.2e}"


#: Both modes x euler/rk3 x kv first/last, K = 3, window [1, 3) (issue 15's set).
LOOPS = [
    dict(mode=m, method=me, kv=kv)
    for m in ("block", "layer")
    for me in ("euler", "rk3")
    for kv in ("first", "last")
]


@pytest.mark.parametrize("arch", REF_ARCHS)
def test_looped_matches_reference(arch):
    require_patched()
    from loopcpp import LoopConfig
    from loopcpp.reference import LoopedReference
    from loopcpp.tiny import load_hf_model, tiny_checkpoint

    hf_dir, gguf = tiny_checkpoint(arch)
    ref = LoopedReference(load_hf_model(hf_dir))
    n_ubatch = PREFILL_UBATCH.get(arch, N_UBATCH)
    llm = load_deterministic(gguf, n_ubatch=n_ubatch)
    atol = LOOP_ATOL.get(arch, DEFAULT_ATOL)
    prompt = list(range(100, 100 + PROMPT_LEN))
    n = ref.n_layer

    def compare(loop):
        return compare_with_reference(ref, llm, prompt, loop, N_DECODE, n_ubatch)

    try:
        stock = compare(None)
        assert stock < atol, f"{arch}: the reference without a loop is {stock:.2e} off stock"
        errors = {}
        for kw in LOOPS:
            loop = LoopConfig(1, 3, count=3, **kw)
            errors[loop.describe()] = compare(loop)
        loop = LoopConfig(1, 3, count=3, kv="refined")
        errors[loop.describe()] = compare(loop)
        # a window that reaches the last layer: the output rows are selected after the loop
        loop = LoopConfig(n - 2, n, count=2)
        errors[loop.describe()] = compare(loop)
    finally:
        llm.close()
    worst = max(errors, key=errors.get)
    _record(arch, "loop_err", errors[worst])
    _record(arch, "loop_atol", atol)
    _record(arch, "loop_configs", len(errors))
    bad = {k: v for k, v in errors.items() if v >= atol}
    assert not bad, f"{arch}: {len(bad)} loops off, worst {worst}: {errors[worst]:.2e}"


@pytest.mark.parametrize("arch", REF_ARCHS)
def test_state_after_a_looped_ubatch_is_the_chosen_evaluations(arch):
    """A looped prefill persists the chosen evaluation's states: decoding on without the loop
    agrees with the reference (which keeps that evaluation's states) for kv first, last and
    refined in both modes; the state size is the stock model's whatever the loop."""
    require_patched()
    import llama_cpp

    from loopcpp import LoopConfig, engine
    from loopcpp.reference import LoopedReference
    from loopcpp.tiny import load_hf_model, tiny_checkpoint

    hf_dir, gguf = tiny_checkpoint(arch)
    ref = LoopedReference(load_hf_model(hf_dir))
    prompt = list(range(100, 100 + PROMPT_LEN))
    atol = LOOP_ATOL.get(arch, DEFAULT_ATOL)
    n_ubatch = PREFILL_UBATCH.get(arch, N_UBATCH)
    llm = load_deterministic(gguf, n_ubatch=n_ubatch)
    try:
        llm.set_loop(None)
        llm.reset()
        llm.eval(prompt)
        stock_len = len(seq_state(llm))
        stock_size = llama_cpp.llama_state_get_size(llm._ctx.ctx)
        tail = [int(t) for t in np.argmax(np.array(llm.scores[: llm.n_tokens]), axis=-1)][:4]

        errors = {}
        for kv in ("first", "last", "refined"):
            for mode in ("block", "layer"):
                loop = LoopConfig(1, 3, count=3, kv=kv, mode=mode)
                llm.set_loop(loop)
                llm.reset()
                llm.eval(prompt)
                assert llama_cpp.llama_state_get_size(llm._ctx.ctx) == stock_size
                assert len(seq_state(llm)) == stock_len, "the state grew"
                # the loop off through the C API, which keeps the cache (LoopedLlama.set_loop
                # drops the cached prompt)
                engine.set_loop(llm._ctx.ctx, llm._model.model, None)
                got = []
                for t in tail:
                    llm.eval([t])
                    got.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
                ref.set_loop(loop)
                ref.reset()
                ref.run(prompt, n_ubatch)
                ref.set_loop(None)
                want = torch.cat([ref.forward([t]) for t in tail]).numpy()
                errors[loop.describe()] = float(np.abs(np.stack(got) - want).max())
    finally:
        llm.close()
    bad = {k: v for k, v in errors.items() if v >= atol}
    _record(arch, "state_decode_err", max(errors.values()))
    assert not bad, f"{arch}: decode after a looped prefill off the reference: {bad}"


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_first_state_bytes_equal_the_stock_models(arch):
    """With kv = first and a window that reaches the last layer every layer persists its
    natural pass: the sequence's state bytes (K/V cells and recurrent states) after a looped
    prompt equal the stock model's bit for bit, and kv = last's differ at the same size."""
    require_patched()
    from loopcpp.tiny import tiny_checkpoint

    _, gguf = tiny_checkpoint(arch)
    prompt = list(range(100, 100 + PROMPT_LEN))
    llm = load_deterministic(gguf, n_ubatch=N_UBATCH)
    try:
        assert_kv_first_keeps_the_natural_pass(llm, prompt, arch)
    finally:
        llm.close()
    _record(arch, "state_stash", True)


K1_LOOPS = {
    "no-loop": None,
    "euler-k1": {"start": 1, "end": 3, "count": 1},
    "euler-k1-first": {"start": 1, "end": 3, "count": 1, "kv": "first"},
    "naive-k1-layer": {
        "start": 0,
        "end": 4,
        "count": 1,
        "method": "naive",
        "mode": "layer",
        "kv": "first",
    },
}


def test_k1_bit_identical_to_stock_build():
    require_patched()
    off = k1_mismatches(K1_LOOPS, ARCHS, _record)
    assert not off, f"not bit-identical to the stock build: {off}"
