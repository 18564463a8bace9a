"""The architectures the loop engine supports, in one place.

``LOOP_ARCHS`` are llama.cpp architecture names (``general.architecture``) whose
graph builder hands its layer body to ``build_layers``, in the order of
``LLAMA_LOOP_ARCHS`` in cpp_patch (0001 and 0004 list the first seven, 0005 the
plain decoders, 0006 the recurrent and hybrid ones, 0007 the K/V-sharing and the
less plain ones); tests/test_loop_archs.py checks
that the two lists agree.
``NOT_LOOPED`` says why each other architecture of the vendored llama.cpp is
left out. docs/ARCHITECTURES.md (scripts/architectures.py) adds the test status.
"""

from __future__ import annotations

#: llama.cpp architectures that loop (LLAMA_LOOP_ARCHS in cpp_patch, in order).
LOOP_ARCHS: tuple[str, ...] = (
    "llama",
    "qwen2",
    "qwen3",
    "gemma3",
    "qwen3moe",
    "olmoe",
    "deepseek2",
    "olmo2",
    "granite",
    "smollm3",
    "starcoder2",
    "seed_oss",
    "apertus",
    "mistral3",
    "qwen2moe",
    "glm4",
    "cohere2",
    "exaone4",
    "gpt-oss",
    "phi3",
    "gemma2",
    "llama4",
    "ernie4_5",
    "ernie4_5-moe",
    "glm4moe",
    "deepseek",
    "internlm2",
    "minicpm3",
    "olmo",
    "command-r",
    "nemotron",
    "arcee",
    "stablelm",
    "dots1",
    "mistral4",
    "phimoe",
    "granitemoe",
    "afmoe",
    "arctic",
    "baichuan",
    "bailingmoe",
    "bailingmoe2",
    "bitnet",
    "bloom",
    "chameleon",
    "chatglm",
    "codeshell",
    "cohere2moe",
    "dbrx",
    "deepseek2-ocr",
    "exaone",
    "exaone-moe",
    "falcon",
    "gemma",
    "gpt2",
    "granite_swa",
    "grok",
    "grovemoe",
    "hunyuan-dense",
    "hunyuan-moe",
    "hunyuan_vl",
    "hy_v3",
    "jais",
    "laguna",
    "maincoder",
    "maple",
    "mellum",
    "minicpm",
    "minimax-m2",
    "mpt",
    "openelm",
    "orion",
    "paddleocr",
    "pangu-embedded",
    "phi2",
    "plamo",
    "plamo3",
    "plm",
    "qwen",
    "qwen2vl",
    "qwen3vl",
    "qwen3vlmoe",
    "refact",
    "smallthinker",
    "spark2_5",
    "starcoder",
    "step35",
    "talkie",
    "xverse",
    # cpp_patch/0006: recurrent and hybrid builders (the recurrent state stash)
    "qwen35",
    "qwen35moe",
    "qwen3next",
    "lfm2",
    "lfm2moe",
    "falcon-h1",
    "granitehybrid",
    "nemotron_h",
    "nemotron_h_moe",
    "mamba",
    "mamba2",
    "jamba",
    # cpp_patch/0007: layers that read another layer's K/V (gemma4, gemma3n), and builders whose
    # layer loop needed more than the plain hand-over (two residual branches, a layer that hands
    # on its input, the model's own passes, a conditional output-row selection)
    "gemma4",
    "gemma3n",
    "gptneox",
    "jais2",
    "cogvlm",
    "muse-glimmer",
    "deci",
    "nanbeige",
    "mimo2",
    # cpp_patch/0008: recurrent builders converted after the stash
    "kimi-linear",
    "minimax-01",
    "plamo2",
    "bailingmoe3",
    "rwkv6",
    "rwkv6qwen2",
    "rwkv7",
    "arwkv7",
)

#: The recurrent and hybrid architectures (cpp_patch/0006, the recurrent state stash): they have
#: their own conformance suite, tests/test_conformance_recurrent.py.
RECURRENT_ARCHS: tuple[str, ...] = LOOP_ARCHS[
    LOOP_ARCHS.index("qwen35") : LOOP_ARCHS.index("jamba") + 1
] + LOOP_ARCHS[LOOP_ARCHS.index("kimi-linear") :]

#: llama.cpp architectures of the vendored tree that do not loop, and why.
NOT_LOOPED: dict[str, str] = {
    "bert": "encoder (bidirectional attention, no KV cache): not a causal decoder",
    "clip": "vision tower",
    "deepseek32": "sparse (DSA/MSA) attention cache: no K/V stash in that cache yet",
    "deepseek4": "hyper-connection streams, a compressed sparse attention cache: no stash yet",
    "dflash": "speculative draft head (its graph is not a layer stack)",
    "dots3note": "sparse (DSA/MSA) attention cache: no K/V stash in that cache yet",
    "dream": "diffusion LM (non-causal attention without a KV cache)",
    "eagle3": "speculative draft head (its graph is not a layer stack)",
    "eurobert": "encoder (bidirectional attention, no KV cache): not a causal decoder",
    "gemma-embedding": "encoder (bidirectional attention, no KV cache): not a causal decoder",
    "gemma4-assistant": "speculative draft head (its graph is not a layer stack)",
    "glm-dsa": "sparse (DSA/MSA) attention cache: no K/V stash in that cache yet",
    "glm5-next": "hyper-connection streams and a sparse (DSA) attention cache whose selection is "
    "carried across layers: no stash yet",
    "graniteswitch": "per-layer adapter ids carried across layers: not handed to build_layers yet",
    "hrm_text": "loops its own layers already (hierarchical H/L cycles): not converted",
    "hy_v4": "sparse (DSA/MSA) attention cache: no K/V stash in that cache yet",
    "jina-bert-v2": "encoder (bidirectional attention, no KV cache): not a causal decoder",
    "jina-bert-v3": "encoder (bidirectional attention, no KV cache): not a causal decoder",
    "kimi-k3": "attention residuals: a bank of earlier layers' inputs carried across layers, "
    "not one hidden state to loop",
    "llada": "diffusion LM (non-causal attention without a KV cache)",
    "llada-moe": "diffusion LM (non-causal attention without a KV cache)",
    "llama-embed": "embedding model (shares llama's builder; not listed)",
    "minimax-m3": "sparse (DSA/MSA) attention cache: no K/V stash in that cache yet",
    "modern-bert": "encoder (bidirectional attention, no KV cache): not a causal decoder",
    "neo-bert": "encoder (bidirectional attention, no KV cache): not a causal decoder",
    "nomic-bert": "encoder (bidirectional attention, no KV cache): not a causal decoder",
    "nomic-bert-moe": "encoder (bidirectional attention, no KV cache): not a causal decoder",
    "pockettts": "TTS head",
    "qwen3tts": "TTS talker (shares qwen3vl's builder; not listed)",
    "qwen4exp": "hyper-connection residual streams with per-layer input injection: not handed to "
    "build_layers yet",
    "rnd1": "diffusion LM (non-causal attention without a KV cache)",
    "t5": "encoder-decoder (cross attention): not a plain causal decoder stack",
    "t5encoder": "encoder (bidirectional attention, no KV cache): not a causal decoder",
    "wavtokenizer-dec": "vocoder",
}


def status(arch: str) -> str:
    """One line: whether ``arch`` loops, and if not, why."""
    if arch in LOOP_ARCHS:
        return f"{arch}: loops (build_layers)"
    why = NOT_LOOPED.get(arch, "not an architecture of the vendored llama.cpp")
    return f"{arch}: does not loop ({why})"
