"""Write docs/ARCHITECTURES.md: every llama.cpp architecture and its loop status.

The status comes from loopcpp.archs (looped or not, and why not), loopcpp.tiny (a
tiny checkpoint recipe) and the results of the conformance and fixture suites, which
record them when LOOPCPP_ARCH_RESULTS names a JSON file:

    LOOPCPP_ARCH_RESULTS=docs/results/architectures.json python -m pytest \\
        tests/test_conformance_archs.py tests/test_conformance_recurrent.py \\
        tests/test_loop_fixtures.py                           # with LLAMA_CPP_LIB_PATH=dev build
    python scripts/architectures.py docs/results/architectures.json > docs/ARCHITECTURES.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from loopcpp import archs  # noqa: E402
from loopcpp.tiny import TINY_ARCHS  # noqa: E402

#: Model families (as people know them) per llama.cpp architecture, for the architectures
#: named in issue 15 and the older suites; others show the architecture name only.
FAMILIES = {
    "llama": "Llama 2/3.x, Mistral 7B, Mixtral, SmolLM2, TinyLlama, many fine-tunes",
    "qwen2": "Qwen2, Qwen2.5, Qwen2.5-Coder",
    "qwen3": "Qwen3 dense",
    "nemotron_h_moe": "Nemotron-H MoE, Nemotron 3",
    "gemma3": "Gemma 3 (text)",
    "qwen3moe": "Qwen3 MoE (30B-A3B, 235B-A22B)",
    "olmoe": "OLMoE",
    "deepseek2": "DeepSeek-V2/V3/R1, Kimi K2, Moonlight",
    "mistral4": "Mistral 4 (DeepSeek-V2 graph)",
    "olmo2": "OLMo 2, OLMo 3",
    "granite": "Granite 3.x dense",
    "granitemoe": "Granite 3.x MoE, GraniteMoeShared",
    "smollm3": "SmolLM3",
    "starcoder2": "StarCoder2",
    "seed_oss": "Seed-OSS",
    "apertus": "Apertus",
    "mistral3": "Ministral 3, Mistral Small 3.x (text)",
    "qwen2moe": "Qwen1.5-MoE, Qwen2-MoE",
    "glm4": "GLM-4 (0414)",
    "glm4moe": "GLM-4.5, GLM-4.6",
    "cohere2": "Command R7B, Command A",
    "command-r": "Command R, Command R+",
    "exaone4": "EXAONE 4",
    "gpt-oss": "gpt-oss 20B/120B",
    "phi3": "Phi-3, Phi-4",
    "phimoe": "Phi-3.5-MoE",
    "gemma2": "Gemma 2",
    "llama4": "Llama 4 Scout/Maverick",
    "ernie4_5": "ERNIE 4.5 dense",
    "ernie4_5-moe": "ERNIE 4.5 MoE",
    "deepseek": "DeepSeek-MoE (v1)",
    "internlm2": "InternLM2",
    "minicpm3": "MiniCPM3",
    "minicpm": "MiniCPM 1/2",
    "olmo": "OLMo 1",
    "nemotron": "Nemotron (Minitron)",
    "arcee": "Arcee AFM",
    "stablelm": "StableLM 2",
    "dots1": "dots.llm1",
    "qwen35": "Qwen3.5",
    "qwen35moe": "Qwen3.5 MoE",
    "qwen3next": "Qwen3-Next",
    "gemma4": "Gemma 4",
    "gemma3n": "Gemma 3n",
    "granitehybrid": "Granite 4 (hybrid)",
    "lfm2": "LFM2",
    "falcon-h1": "Falcon-H1",
    "nemotron_h": "Nemotron-H, Nemotron Nano 2",
    "jamba": "Jamba",
    "mamba": "Mamba",
    "mamba2": "Mamba 2",
    "gptneox": "GPT-NeoX, Pythia",
    "gpt2": "GPT-2",
    "starcoder": "StarCoder 1, SantaCoder (GPTBigCode)",
    "bloom": "BLOOM, BLOOMZ",
    "falcon": "Falcon 7B/40B/180B",
    "phi2": "Phi-1.5, Phi-2",
    "gemma": "Gemma 1, CodeGemma",
    "mellum": "Mellum 2",
    "jais2": "Jais 2",
    "cogvlm": "CogVLM (text stack)",
    "deci": "DeciLM, Llama-3.1-Nemotron-51B/253B",
    "nanbeige": "Nanbeige (looped)",
    "mimo2": "MiMo-V2-Flash",
    "rwkv6": "RWKV-6",
    "rwkv7": "RWKV-7",
    "kimi-linear": "Kimi Linear",
    "qwen2vl": "Qwen2-VL, Qwen2.5-VL (text stack)",
    "qwen3vl": "Qwen3-VL (text stack)",
    "qwen3vlmoe": "Qwen3-VL MoE (text stack)",
    "chameleon": "Chameleon",
    "paddleocr": "PaddleOCR-VL (text stack)",
    "hunyuan_vl": "HunyuanOCR (text stack)",
    "step35": "Step-3.5 / Step-3.7 Flash",
    "hunyuan-dense": "Hunyuan dense (0.5B-7B)",
    "hy_v3": "Hy3 (Hunyuan 3)",
    "granite_swa": "Granite 4 SWA (dense and MoE)",
    "bitnet": "BitNet b1.58",
    "chatglm": "ChatGLM3, GLM-4-9B (GlmForCausalLM)",
    "laguna": "Laguna (poolside)",
    "exaone": "EXAONE 3, 3.5",
    "dbrx": "DBRX",
    "cohere2moe": "Cohere 2 MoE (North)",
    "exaone-moe": "K-EXAONE (EXAONE MoE)",
    "hunyuan-moe": "Hunyuan-A13B",
    "minimax-m2": "MiniMax-M2",
    "afmoe": "Arcee Trinity (AFMoE)",
}

#: Why a looped architecture has no conformance run (no tiny recipe in loopcpp.tiny).
NO_TINY = {
    "phi3": "the tiny checkpoint's SentencePiece vocabulary lacks the special tokens "
    "llama.cpp's phi3 vocab loader looks up",
    "mistral3": "recipe not written yet (Ministral3 needs YaRN + llama-4 scaling parameters)",
    "llama4": "recipe not written yet (MoE, chunked attention, no-RoPE layers)",
    "deepseek": "no transformers class (remote code)",
    "internlm2": "no transformers class (remote code)",
    "cogvlm": "no text-only transformers class",
    "deci": "no transformers class (remote code)",
    "nanbeige": "no transformers class (remote code)",
    "exaone": "no transformers class (ExaoneForCausalLM is remote code; transformers 5.24 "
    "has Exaone4 and ExaoneMoe only)",
    "minicpm": "no transformers class (MiniCPMForCausalLM is remote code; transformers 5.24 "
    "has MiniCPM3 only)",
    "muse-glimmer": "no transformers class",
    "rwkv6": "no transformers class (transformers has RWKV-4 only); the fixture is loopcpp's "
    "(loopcpp.tiny._RWKV_LAYER), test-llama-archs disables its RWKV ones",
    "rwkv7": "no transformers class (transformers has RWKV-4 only); the fixture is loopcpp's "
    "(loopcpp.tiny._RWKV_LAYER), test-llama-archs disables its RWKV ones",
    "minimax-01": "the converter reads the MiniMax tokenizer through remote code and needs a "
    "sharded checkpoint index; no tiny recipe from transformers' MiniMax class yet",
    "plamo2": "no transformers class (remote code)",
    "bailingmoe3": "no transformers class (remote code)",
    "deepseek2-ocr": "no text-only transformers class, and llama.cpp's test-llama-archs writes "
    "no fixture of it",
    "plm": "no transformers class, and llama.cpp's test-llama-archs writes no fixture of it "
    "(its tensor shapes are a TODO there)",
    "rwkv6qwen2": "no transformers class; test-llama-archs disables its RWKV fixtures and "
    "loopcpp writes RWKV-6/7 ones only (not the Qwen-FFN hybrids)",
    "arwkv7": "no transformers class; test-llama-archs disables its RWKV fixtures and "
    "loopcpp writes RWKV-6/7 ones only (not the Qwen-FFN hybrids)",
    "hunyuan-moe": "the converter's set_vocab needs Hunyuan's remote-code tiktoken tokenizer "
    "(mergeable_ranks, a known pre-tokenizer hash) and hard-codes bos id 127959",
    "nemotron_h": "the vendored converter reads the config through transformers' AutoConfig, "
    "whose NemotronH config always has num_experts_per_tok (conversion/nemotron.py:221 tests "
    "its presence), so every NemotronH, real dense ones included, converts as nemotron_h_moe; "
    "removing the field from config.json does not help (tested as nemotron_h_moe, same builder)",
}


#: What the generic PyTorch reference (loopcpp/reference.py, branch ref) must do beyond
#: calling ``model.model.layers[i]`` with the model's own position embeddings and mask.
REFERENCE_NEEDS = {
    "granite": "embeddings times embedding_multiplier (in GraniteModel.forward, not in "
    "embed_tokens); logits divided by logits_scaling",
    "minicpm3": "embeddings times scale_emb; logits divided by hidden_size/dim_model_base",
    "gemma2": "embeddings times sqrt(hidden_size) (in the model's forward); a sliding and a "
    "full mask per layer (layer_types); final_logit_softcapping after the LM head",
    "cohere2": "logits times logit_scale",
    "command-r": "logits times logit_scale",
    "gpt-oss": "a sliding and a full mask per layer; frozen routing: the router is "
    "mlp.router (returns scores and indices)",
    "qwen2moe": "frozen routing: mlp.gate (the shared expert and its sigmoid gate always run)",
    "ernie4_5-moe": "frozen routing: the MoE router of the sparse layers (layer 0 is dense)",
    "glm4moe": "frozen routing: mlp.gate (group-limited top-k with a selection bias; "
    "layer 0 is dense)",
    "dots1": "frozen routing: mlp.gate (sigmoid scores with a selection bias; layer 0 dense)",
    "smollm3": "nothing: the no-RoPE layers decide inside their attention module",
    "olmo2": "nothing (post-norms and full-width q/k norms are inside the layer)",
    "exaone4": "nothing for the tiny checkpoint (all layers global, see loopcpp/tiny.py)",
    "qwen35": "the recurrent state stash: linear-attention conv/recurrent states (cache API)",
    "lfm2": "the recurrent state stash: short-convolution conv states (cache API)",
    "falcon-h1": "the recurrent state stash; layers return a tuple (the stand-in returns one)",
    "mamba2": "the recurrent state stash: Mamba-2 conv/SSM states (cache API)",
    "mamba": "the recurrent state stash; transformers' scan drops the cached state on a "
    "multi-token continuation, so the prompt is one ubatch",
    "jamba": "as mamba (the same Mamba-1 scan)",
    "gemma4": "K/V sharing: the layers after the window read the shared_kv_states the kept "
    "evaluation left; frozen routing: the router and experts are the layer's own",
}


def _families(arch: str) -> str:
    return FAMILIES.get(arch, "")


def table(results: dict) -> str:
    from test_conformance_archs import ARCHS, OLD, STOCK_MISMATCH
    from test_conformance_recurrent import ARCHS as RECURRENT
    from test_conformance_recurrent import STOCK_MISMATCH as RECURRENT_MISMATCH

    rows = []
    for arch in archs.LOOP_ARCHS:
        r = results.get(arch, {})
        k1 = {True: "K = 1 bit-identical to stock", False: "K = 1 NOT identical"}.get(
            r.get("k1_identical"), "K = 1 not run"
        )
        state = (
            "kv = first state bytes equal stock" if r.get("state_stash") else "state test not run"
        )
        if arch in RECURRENT and arch in RECURRENT_MISMATCH:
            status = (
                f"recurrent state stash: {k1}; {state}; stock llama.cpp vs transformers off: "
                f"{RECURRENT_MISMATCH[arch]}"
            )
        elif arch in RECURRENT and "loop_err" in r:
            status = (
                f"conformance tested (recurrent state stash): stock vs transformers "
                f"{r['stock_err']:.1e} (tol {r['stock_atol']:.0e}); looped vs reference max "
                f"{r['loop_err']:.1e} over {r['loop_configs']} loops (tol {r['loop_atol']:.0e}); "
                f"decode after a looped prefill {r.get('state_decode_err', float('nan')):.1e}; "
                f"{state}; {k1}"
            )
        elif arch in OLD:
            status = "conformance tested (tests/test_conformance.py, test_conformance_moe.py)"
        elif arch in ARCHS and arch in STOCK_MISMATCH:
            k1 = "K = 1 bit-identical to stock" if r.get("k1_identical") else "K = 1 not run"
            status = f"{k1}; stock llama.cpp vs transformers off: {STOCK_MISMATCH[arch]}"
        elif arch in ARCHS and "stock_err" in r:
            k1 = {True: "K = 1 bit-identical to stock", False: "K = 1 NOT identical"}.get(
                r.get("k1_identical"), "K = 1 not run"
            )
            stock = f"stock vs transformers {r['stock_err']:.1e} (tol {r['stock_atol']:.0e})"
            if "loop_err" in r:
                status = (
                    f"conformance tested: {stock}; looped vs reference max "
                    f"{r['loop_err']:.1e} over {r['loop_configs']} loops "
                    f"(tol {r['loop_atol']:.0e}); {k1}"
                )
            else:
                why = REFERENCE_NEEDS.get(arch, "")
                status = f"{stock}; {k1}; looped vs reference waits for the generic one ({why})"
        elif arch in TINY_ARCHS:
            status = "tiny recipe, not run"
        elif "fixture_k1_identical" in r:
            k1 = ("K = 1 bit-identical to stock" if r["fixture_k1_identical"]
                  else "K = 1 NOT identical")
            ran = ("a K = 3 loop runs in both modes, kv = first state bytes equal stock"
                   if r.get("fixture_loop") else "loop run failed")
            why = NO_TINY.get(arch, "no transformers class (remote code)")
            status = (f"loops; on a random fixture (llama.cpp's test-llama-archs; tests/"
                      f"test_loop_fixtures.py): "
                      f"{k1}, {ran}; no conformance: {why}")
        else:
            status = "loops, untested: " + NO_TINY.get(arch, "no tiny recipe yet")
        rows.append(f"| {arch} | {_families(arch)} | {status} |")
    for arch, why in sorted(archs.NOT_LOOPED.items()):
        rows.append(f"| {arch} | {_families(arch)} | not supported: {why} |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    results = json.loads(Path(argv[1]).read_text()) if len(argv) > 1 else {}
    print(
        "# Architectures\n\n"
        "Generated by `scripts/architectures.py` from loopcpp/archs.py, loopcpp/tiny.py and the\n"
        "results of tests/test_conformance_archs.py, test_conformance_recurrent.py and\n"
        "test_loop_fixtures.py (see the script's docstring). Looped: the\n"
        "architecture's graph builder hands its layer body to\n"
        "`build_layers` (cpp_patch/0003-0008; 0006 and 0008: recurrent and hybrid, the\n"
        "recurrent state stash, tests/test_conformance_recurrent.py) "
        f"and it is in `LLAMA_LOOP_ARCHS`: {len(archs.LOOP_ARCHS)} architectures; "
        f"{len(archs.NOT_LOOPED)} are not supported.\n\n"
        "| architecture | families | status |\n|---|---|---|\n" + table(results) + "\n\n"
        "## What the generic reference needs per architecture\n\n"
        "Beyond running `model.model.layers[i]` with the model's own rotary embeddings and\n"
        "causal mask (every architecture above with a tiny recipe):\n\n"
        + "\n".join(f"- {a}: {why}" for a, why in REFERENCE_NEEDS.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
