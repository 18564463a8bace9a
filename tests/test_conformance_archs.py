"""Conformance of the architectures cpp_patch/0005 loops, on tiny random f32 checkpoints.

1. Stock llama.cpp (the patched library, no loop) against transformers: a prompt
   split into ubatches, then 16 greedy decoded tokens, f32 KV cache; every logit
   row against one transformers forward over the whole sequence.
2. K = 1 (euler, and naive in layer mode) and no loop against the unpatched build
   of the same source: the logits are bit-identical. Each library runs in its own
   process (LLAMA_CPP_LIB_PATH).

3. Looped llama.cpp against the PyTorch reference (loopcpp/reference.py, the model's own
   forward): both modes x euler/rk3 x kv first/last at K = 3, the authors' anchored recipe,
   and a window that reaches the last layer; prompt in ubatches, then 16 decoded tokens.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import (  # noqa: E402
    compare_with_reference,
    k1_mismatches,
    llama_greedy,
    load_deterministic,
    one_torch_thread,
    require_patched,
)

from loopcpp import archs  # noqa: E402
from loopcpp.tiny import TINY_ARCHS  # noqa: E402

#: The architectures of this suite: looped, with a tiny recipe, not in the older suites.
OLD = ("llama", "qwen2", "qwen3", "gemma3", "qwen3moe", "olmoe", "deepseek2")
#: The recurrent and hybrid architectures (cpp_patch/0006) have their own suite,
#: tests/test_conformance_recurrent.py (stock, looped, state and K = 1 tests).
ARCHS = tuple(
    a for a in archs.LOOP_ARCHS
    if a in TINY_ARCHS and a not in OLD and a not in archs.RECURRENT_ARCHS
)

N_UBATCH = 5
PROMPT_LEN = 12
N_DECODE = 16
#: Max abs logit difference, stock llama.cpp vs transformers (logits are O(1)). gemma2 and
#: starcoder2 (gelu_pytorch_tanh) go through ggml's fp16 GELU table: measured 2.0e-4 and
#: 3.9e-4, the same order as gemma3's 1e-3 in test_conformance. gemma4: stock 2.6e-3, looped
#: up to 7.8e-3, and the cause is the same table. Bisected per op (ggml eval callback against
#: transformers hooks): layer 0 matches to 9e-6; the first op off is layer 1's MLP GELU,
#: where an fp16 rounding flip of an input ~1e-6 off moves the MLP output by 2e-4; given
#: llama.cpp's own inputs the emulated table is bit-exact. The model amplifies it: exact vs
#: emulated GELU in the reference itself is 1.1e-2 apart unlooped (llama.cpp vs emulated:
#: 1.1e-3), 1.8e-2 for rk3/block kv=first on [1, 3).
#: The classic GELU decoders likewise (ggml's fp16 table; loopcpp's emulation of it covers
#: the tanh forms, gelu_new and BLOOM's too): stock gpt2 5.0e-4, starcoder 7.1e-4, bloom 3.1e-4,
#: phi2 8.0e-4, gemma 1.4e-4. falcon and gptneox: 2.5e-3 and 1.9e-3, because llama.cpp
#: computes their exact (erf) GELU as ggml's tanh one: with that emulated too, 6.7e-4 and
#: 2.4e-4 (measured; the test keeps transformers' exact GELU).
#: gemma3n: GELU too, and llama.cpp's activation sparsity cuts at mean + 1.645 std with the
#: unbiased std (1/(n - 1), src/models/gemma3n.cpp gaussian_topk) where transformers takes the
#: biased one: stock 2.5e-2 off at n_ff 128, 3.5e-3 at the recipe's 4096 (3.4e-4 with
#: transformers patched to the unbiased std), looped up to 9.6e-3 (2.3e-3 patched; measured).
#: hunyuan_vl: llama.cpp gives a text token position 0 on the 4th XD-RoPE section (the
#: lowest-frequency pairs; llm_graph_input_pos::set_input), transformers its position on all
#: four: stock 6.0e-5, looped 9.0e-5 with the real NTK alpha 1000 (3e-2 with alpha 1; measured).
ATOL = {"gemma2": 5e-3, "starcoder2": 5e-3, "gemma4": 1e-2, "gpt2": 5e-3, "starcoder": 5e-3,
        "bloom": 5e-3, "phi2": 5e-3, "gemma": 5e-3, "falcon": 5e-3, "gptneox": 5e-3,
        "gemma3n": 2e-2, "hunyuan_vl": 5e-4}
#: Stock llama.cpp does not match transformers here (cause not found yet): left out of the
#: stock comparison, still in the K = 1 identity test. The measured error is the reason.
STOCK_MISMATCH: dict[str, str] = {
    # cause found: transformers routes Phi-3.5-MoE with sparsemixer (each of the top-2 weights
    # a softmax over the logits within 2 * router_jitter_noise of that pick: ~1.0 each), llama.cpp
    # with a softmax top-2 renormalised; no config value makes the two agree
    "phimoe": "2.4e+00 (sparsemixer routing in transformers vs softmax top-2 in llama.cpp)",
    "afmoe": "3.6e+00, already on the first token (not RoPE or the sliding window); the GGUF "
    "tensors, norms and routing keys (sigmoid, route_norm, route_scale, muP) match the "
    "checkpoint; cause not isolated",
}
DEFAULT_ATOL = 1e-4
#: Vocabulary columns left out of the comparisons, with the reason. chameleon: llama.cpp sets
#: the image tokens' logits (ids [4, 8196), hard-coded) to -FLT_MAX with a ggml_set_1d on the
#: [n_vocab, n_outputs] logits, which reaches the ubatch's first output row only (transformers
#: masks every row): the other rows' image logits differ by ~FLT_MAX (measured; the text
#: logits 3e-6).
SKIP_COLUMNS = {"chameleon": slice(4, 8196)}
#: Looped settings over the arch's tolerance, with the measured error and a looser bound that
#: still fails a real bug (O(1) errors): gemma4's rk3/block kv=last on [1, 3) is 2.9e-2 off
#: (every other loop <= 7.8e-3). Not a top-k tie (the two references below route every token
#: to the same experts): this loop amplifies the fp16 GELU flips above ten times more than
#: the others. The reference against itself with exact instead of emulated GELU differs by
#: 0.17 here (kv=first: 1.8e-2); the error grows over the decoded tokens (5e-3 at the end of
#: the prompt), whose last-iteration K/V every later token reads.
LOOSE: dict[tuple[str, str], float] = {("gemma4", "layers [1, 3) x K=3 rk3/block "): 5e-2}

#: Measured by test_stock_matches_transformers (the worst error), for scripts/architectures.py.
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


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in STOCK_MISMATCH])
def test_stock_matches_transformers(arch):
    require_patched()
    from loopcpp.reference import emulate_ggml_cpu_gelu
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
    emulate_ggml_cpu_gelu(model)
    with torch.no_grad():
        want = model(torch.tensor([tokens])).logits[0].float().numpy()
    assert got.shape == want.shape
    if arch in SKIP_COLUMNS:
        got, want = (np.delete(x, np.r_[SKIP_COLUMNS[arch]], axis=-1) for x in (got, want))
    err = float(np.abs(got - want).max())
    atol = ATOL.get(arch, DEFAULT_ATOL)
    _record(arch, "stock_err", err)
    _record(arch, "stock_atol", atol)
    assert err < atol, f"{arch}: stock llama.cpp vs transformers max abs err {err:.2e}"


K1_LOOPS = {
    "no-loop": None,
    "euler-k1": {"start": 1, "end": 3, "count": 1},
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


def test_the_suite_covers_the_priority_archs():
    """The architectures named first in issue 15 that have a tiny recipe are in this suite."""
    for arch in ("olmo2", "granite", "smollm3", "gpt-oss", "gemma2", "qwen2moe", "cohere2"):
        assert arch in ARCHS
    # and every arch here really loops on the C side (listed in LLAMA_LOOP_ARCHS)
    assert set(ARCHS) <= set(archs.LOOP_ARCHS)


# -- looped llama.cpp vs the reference ------------------------------------------------------
#
# Until the generic reference lands (branch ref), the current loopcpp/reference.py runs the
# architectures below unchanged once their class is admitted: they use embed_tokens, the
# layers with the model's rotary embeddings and per-layer masks, norm and lm_head, with no
# scale outside the layers. The admission is checked: the reference without a loop must
# match stock llama.cpp first.

#: The loops of issue 15: both modes x euler/rk3 x kv first/last, K = 3, window [1, 3).
LOOPS = [
    dict(mode=m, method=me, kv=kv)
    for m in ("block", "layer")
    for me in ("euler", "rk3")
    for kv in ("first", "last")
]
REF_ARCHS = (
    "olmo2",
    "smollm3",
    "starcoder2",
    "seed_oss",
    "apertus",
    "qwen2moe",
    "glm4",
    "exaone4",
    "olmo",
    "arcee",
    "stablelm",
    "nemotron",
    "ernie4_5",
    "gpt-oss",
    "glm4moe",
    "dots1",
    "ernie4_5-moe",
    "gemma2",
    # embeddings or logits scaled outside the layers: the reference runs the model's own
    # forward, so they are the model's own code
    "granite",
    "cohere2",
    "command-r",
    "phi3",
    "mistral3",
    "llama4",
    "minicpm3",
    # layers that read another layer's K/V (cpp_patch/0007)
    "gemma4",
    "jais2",
    # the classic decoders: layers in the base model's one layer list (transformer.h,
    # gpt_neox.layers, model.layers); learned positions (gpt2, starcoder), ALiBi (bloom),
    # parallel attention + MLP (falcon, gptneox, phi2), MoE with sliding layers (mellum)
    "gpt2",
    "starcoder",
    "bloom",
    "falcon",
    "gptneox",
    "phi2",
    "gemma",
    "mellum",
    # assorted dense / MoE builders (HunYuan, Granite SWA, GLM, Laguna, Mistral 4, MiMo-V2, BitNet)
    "hunyuan-dense",
    "granite_swa",
    "chatglm",
    "hy_v3",
    "laguna",
    "mistral4",
    "mimo2",
    "bitnet",
    # mixture-of-experts families (group i15moe); the loops above route frozen (the default)
    "granitemoe",
    "cohere2moe",
    "exaone-moe",
    "dbrx",
    "minimax-m2",
    # the text stacks of vision-language models (the composite class, token ids only)
    "qwen3vl",
    "qwen2vl",
    "gemma3n",
    "qwen3vlmoe",
    "chameleon",
    "paddleocr",
    "hunyuan_vl",
    "step35",
)
#: Windows that hold a K/V producer and a layer reading its K/V (num_kv_shared_layers = 2:
#: gemma4's layers 4 and 5 read the K/V of layers 2 and 3): the reader sees the current
#: evaluation's K/V inside the window, the kept evaluation's after it.
KV_SHARING_WINDOWS = {"gemma4": [(2, 5), (3, 6)]}


@pytest.mark.parametrize("arch", REF_ARCHS)
def test_looped_matches_reference(arch):
    require_patched()
    from loopcpp import LoopConfig
    from loopcpp.reference import LoopedReference, emulate_ggml_cpu_gelu
    from loopcpp.tiny import load_hf_model, tiny_checkpoint

    hf_dir, gguf = tiny_checkpoint(arch)
    model = load_hf_model(hf_dir)
    emulate_ggml_cpu_gelu(model)
    ref = LoopedReference(model)
    llm = load_deterministic(gguf, n_ubatch=N_UBATCH)
    atol = ATOL.get(arch, DEFAULT_ATOL)
    prompt = list(range(100, 100 + PROMPT_LEN))
    def compare(loop):
        return compare_with_reference(ref, llm, prompt, loop, N_DECODE, N_UBATCH,
                                      skip=SKIP_COLUMNS.get(arch))

    try:
        stock = compare(None)
        assert stock < atol, f"{arch}: the reference without a loop is {stock:.2e} off stock"
        errors = {}
        for kw in LOOPS:
            loop = LoopConfig(1, 3, count=3, **kw)
            errors[loop.describe()] = compare(loop)
        # the authors' anchored recipe (docs/LOOPING.md v2) on the same window
        loop = LoopConfig.recipe("paper", ref.n_layer, start=1, end=3, count=3)
        errors[loop.describe()] = compare(loop)
        for start, end in KV_SHARING_WINDOWS.get(arch, []):
            for kw in (dict(kv="first"), dict(kv="last"), dict(kv="first", mode="layer"),
                       dict(kv="refined")):
                loop = LoopConfig(start, end, count=3, **kw)
                errors[loop.describe()] = compare(loop)
        n = ref.n_layer
        # a window that reaches the last layer: the output rows are selected after the loop
        loop = LoopConfig(n - 2, n, count=2)
        errors[loop.describe()] = compare(loop)
    finally:
        llm.close()
    worst = max(errors, key=errors.get)
    _record(arch, "loop_err", errors[worst])
    _record(arch, "loop_atol", atol)
    _record(arch, "loop_configs", len(errors))
    def bound(describe: str) -> float:
        loose = [b for (a, prefix), b in LOOSE.items() if a == arch and describe.startswith(prefix)]
        return max([atol, *loose])

    bad = {k: v for k, v in errors.items() if v >= bound(k)}
    assert not bad, f"{arch}: {len(bad)} loops off, worst {worst}: {errors[worst]:.2e}"
