"""Tiny random checkpoints with a real tokenizer, for conformance tests.

``tiny_checkpoint(arch)`` returns ``(hf_dir, gguf_path)``: a seeded, deterministic
float32 Hugging Face checkpoint (hidden 64, a few layers, GQA) and its f32 GGUF
made by llama.cpp's own converter. Both are cached under
``~/.cache/loopcpp/tiny/<arch>-<hash>/``; the hash covers the config, the seed,
this module's recipe version and the torch / transformers versions, so a change
to any of them rebuilds. A build happens in a temporary folder that is renamed
into place only when complete.

The tokenizer is a real BPE vocabulary (StarCoder's, 49152 tokens) read from the
``ggml-vocab-starcoder.gguf`` that ships in the vendored llama.cpp source, so
no download is needed; the conversion is ``loopcpp.convert.hf_to_gguf``. Needs
torch and transformers, imported lazily so that importing this module is cheap.

``fixture_checkpoint(arch)``: for architectures no transformers class builds, a random
tiny GGUF written by llama.cpp's own ``test-llama-archs`` (no reference to compare with:
the K = 1 identity, state and smoke tests of tests/test_loop_fixtures.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# -- tiny checkpoints ------------------------------------------------------------

#: Bump when the recipe below changes in a way that changes the weights or files.
RECIPE_VERSION = 2
SEED = 1234
TOKENIZER_GGUF = "ggml-vocab-starcoder.gguf"
GGUF_NAME = "model-f32.gguf"

_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "initializer_range": 0.1,
}

#: arch -> (HF architecture class name, config overrides)
TINY_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", {"num_hidden_layers": 4}),
    "qwen2": ("Qwen2ForCausalLM", {"num_hidden_layers": 4}),
    "qwen3": ("Qwen3ForCausalLM", {"num_hidden_layers": 4}),
    "gemma3": (
        "Gemma3ForCausalLM",
        {
            # llama.cpp's gemma3 assumes the stock pattern: every 6th layer is global.
            "num_hidden_layers": 6,
            "sliding_window": 4,
            "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
            "query_pre_attn_scalar": 16,
            "hidden_activation": "gelu_pytorch_tanh",
            "tie_word_embeddings": True,
        },
    ),
    "qwen3moe": (
        "Qwen3MoeForCausalLM",
        {
            "num_hidden_layers": 4,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
    ),
    "olmoe": (
        "OlmoeForCausalLM",
        {
            "num_hidden_layers": 4,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "norm_topk_prob": False,
            # llama.cpp's olmoe sizes the k norm by n_embd: no GQA (as in the real OLMoE).
            "num_key_value_heads": 4,
            # llama.cpp's converter writes rms_norm_eps = 1e-5 for OLMoE whatever the config says.
            "rms_norm_eps": 1e-5,
        },
    ),
    "deepseek2": (
        "DeepseekV3ForCausalLM",
        {
            # MLA: low-rank q and compressed kv, a rope part shared by the heads. llama.cpp
            # treats q_lora_rank as required (only "lite" layer counts may omit it).
            "num_hidden_layers": 4,
            "num_key_value_heads": 4,
            # transformers sizes DeepSeek's rotary table by head_dim = the rope part.
            "head_dim": 8,
            "q_lora_rank": 32,
            "kv_lora_rank": 32,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 16,
            "v_head_dim": 16,
            "rope_interleave": True,
            # MoE: one dense leading layer, sigmoid scores with selection bias, 2 groups of 4
            # experts of which the best group is used, top-2 there, plus a shared expert.
            "first_k_dense_replace": 1,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "n_group": 2,
            "topk_group": 1,
            "n_shared_experts": 1,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
            "routed_scaling_factor": 2.5,
            # transformers' DeepseekV3Config has no such field (the model always uses sigmoid),
            # but llama.cpp defaults deepseek2 GGUFs without expert_gating_func to softmax. The
            # real DeepSeek-V3 config.json carries it, and so must ours for the converter.
            "scoring_func": "sigmoid",
            "num_mtp_layers": 0,
        },
    ),
}


#: Architectures looped by cpp_patch/0005 (the same checkpoint shape; quirks noted per entry).
TINY_ARCHS.update(
    {
        "olmo2": ("Olmo2ForCausalLM", {"num_hidden_layers": 4}),
        "granite": (
            "GraniteForCausalLM",
            {
                # every multiplier away from 1 so that a dropped one shows
                "num_hidden_layers": 4,
                "embedding_multiplier": 2.0,
                "residual_multiplier": 0.5,
                "attention_multiplier": 0.2,
                "logits_scaling": 3.0,
            },
        ),
        "smollm3": (
            "SmolLM3ForCausalLM",
            # no RoPE on every 4th layer (layer 3 here), as in SmolLM3
            {"num_hidden_layers": 4, "no_rope_layer_interval": 4, "no_rope_layers": [1, 1, 1, 0]},
        ),
        "starcoder2": ("Starcoder2ForCausalLM", {"num_hidden_layers": 4, "norm_epsilon": 1e-5}),
        "seed_oss": ("SeedOssForCausalLM", {"num_hidden_layers": 4}),
        "apertus": ("ApertusForCausalLM", {"num_hidden_layers": 4}),
        "qwen2moe": (
            "Qwen2MoeForCausalLM",
            {
                "num_hidden_layers": 4,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 32,
                "shared_expert_intermediate_size": 64,
                "norm_topk_prob": False,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
            },
        ),
        # llama.cpp's GLM converter looks up GLM's chat tokens
        "glm4": ("Glm4ForCausalLM", {"num_hidden_layers": 4, "_extra_tokens": ["<|user|>"]}),
        "cohere2": (
            "Cohere2ForCausalLM",
            {
                # llama.cpp's cohere2 assumes the stock pattern: every 4th layer is global
                "num_hidden_layers": 4,
                "sliding_window": 4,
                "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
                "layer_norm_eps": 1e-5,
                "logit_scale": 0.5,
                "tie_word_embeddings": True,  # the converter maps no lm_head
                "rotary_pct": 1.0,  # read by the converter (real configs carry it)
            },
        ),
        "exaone4": (
            "Exaone4ForCausalLM",
            {
                # llama.cpp enables EXAONE 4's sliding window only for 64-layer models:
                # a tiny one is all global attention
                "num_hidden_layers": 4,
                "sliding_window": None,
                "layer_types": ["full_attention"] * 4,
            },
        ),
        "gpt-oss": (
            "GptOssForCausalLM",
            {
                "num_hidden_layers": 4,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "sliding_window": 4,
                "layer_types": ["sliding_attention", "full_attention"] * 2,
                # llama.cpp's YaRN always truncates the correction range
                "rope_parameters": {
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "beta_fast": 32.0,
                    "beta_slow": 1.0,
                    "truncate": True,
                    "original_max_position_embeddings": 128,
                    "rope_theta": 150000.0,
                },
            },
        ),
        "gemma2": (
            "Gemma2ForCausalLM",
            {
                "_sentencepiece": 512,
                "num_hidden_layers": 4,
                "sliding_window": 4,
                "layer_types": ["sliding_attention", "full_attention"] * 2,
                "query_pre_attn_scalar": 16,
                "hidden_activation": "gelu_pytorch_tanh",
                "final_logit_softcapping": 30.0,
                "attn_logit_softcapping": 50.0,
                "tie_word_embeddings": True,
            },
        ),
        "ernie4_5": (
            "Ernie4_5ForCausalLM",
            {"_sentencepiece": 512, "num_hidden_layers": 4, "use_bias": False},
        ),
        "ernie4_5-moe": (
            "Ernie4_5_MoeForCausalLM",
            {
                "_sentencepiece": 512,
                "num_hidden_layers": 4,
                # llama.cpp sizes the shared expert as intermediate_size / num_key_value_heads
                "intermediate_size": 64,
                "moe_num_experts": 4,
                "moe_k": 2,
                "moe_intermediate_size": 32,
                "moe_num_shared_experts": 1,
                "moe_layer_start_index": 1,
                "moe_layer_end_index": 3,
                "moe_layer_interval": 1,
            },
        ),
        "glm4moe": (
            "Glm4MoeForCausalLM",
            {
                "_extra_tokens": ["[gMASK]", "<|user|>", "<|observation|>"],
                "num_hidden_layers": 4,
                "n_routed_experts": 4,
                "num_experts_per_tok": 2,
                "n_shared_experts": 1,
                "moe_intermediate_size": 32,
                "first_k_dense_replace": 1,
                "n_group": 1,
                "topk_group": 1,
                "routed_scaling_factor": 2.5,
                "norm_topk_prob": True,
                "use_qk_norm": True,
            },
        ),
        "minicpm3": (
            "MiniCPM3ForCausalLM",
            {
                "_sentencepiece": 512,
                "num_hidden_layers": 4,
                "num_key_value_heads": 4,
                "q_lora_rank": 32,
                "kv_lora_rank": 32,
                "qk_nope_head_dim": 16,
                "qk_rope_head_dim": 8,
                "v_head_dim": 16,
                "head_dim": 8,
                # llama.cpp's minicpm3 hard-codes MiniCPM3-4B's scales (scale_emb 12,
                # scale_depth 1.4, dim_model_base 256) instead of reading them: the tiny model
                # has those values (with 2.0 and 32 stock llama.cpp was 13.1 off transformers)
                "scale_emb": 12.0,
                "scale_depth": 1.4,
                "dim_model_base": 256,
            },
        ),
        "olmo": ("OlmoForCausalLM", {"num_hidden_layers": 4}),
        "command-r": (
            "CohereForCausalLM",
            {
                "num_hidden_layers": 4,
                "layer_norm_eps": 1e-5,
                "logit_scale": 0.5,
                "tie_word_embeddings": True,
            },
        ),
        "nemotron": (
            "NemotronForCausalLM",
            {"_sentencepiece": 512, "num_hidden_layers": 4, "norm_eps": 1e-5},
        ),
        "phi3": (
            "Phi3ForCausalLM",
            # the converter reads tokenizer.model; llama.cpp's SPM loader looks up the newline
            # byte token and phi3's <|endoftext|>
            {"_sentencepiece": 512, "_byte_fallback": True, "_extra_tokens": ["<|endoftext|>"],
             "num_hidden_layers": 4, "num_key_value_heads": 4},
        ),
        "mistral3": (
            # the text model of Mistral 3 (Ministral 3): YaRN rope with Llama 4's attention
            # temperature, both of which the converter requires
            "Ministral3ForCausalLM",
            {
                "num_hidden_layers": 4,
                "rope_parameters": {
                    "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                    "original_max_position_embeddings": 128, "mscale_all_dim": 1.0,
                    "mscale": 1.0, "llama_4_scaling_beta": 0.1, "beta_fast": 32.0,
                    "beta_slow": 1.0,
                },
            },
        ),
        "llama4": (
            "Llama4ForCausalLM",
            {
                # MoE on every layer (one routed expert + the shared one), no RoPE (and no qk
                # norm) on every 4th layer, chunked attention on the others. llama.cpp fixes
                # the chunk at the real model's 8192 (it does not read the config's): a
                # shorter chunk here would differ for a reason outside the loop.
                "num_hidden_layers": 4,
                "num_local_experts": 4,
                "num_experts_per_tok": 1,
                "intermediate_size": 64,
                "intermediate_size_mlp": 128,
                "interleave_moe_layer_step": 1,
                "no_rope_layers": [1, 1, 1, 0],
                "attention_chunk_size": 8192,
            },
        ),
        "arcee": ("ArceeForCausalLM", {"num_hidden_layers": 4}),
        "stablelm": ("StableLmForCausalLM", {"num_hidden_layers": 4, "layer_norm_eps": 1e-5}),
        "dots1": (
            "Dots1ForCausalLM",
            {
                "num_hidden_layers": 4,
                "num_key_value_heads": 4,  # llama.cpp's dots1 assumes no GQA
                "n_routed_experts": 4,
                "num_experts_per_tok": 2,
                "n_shared_experts": 1,
                "moe_intermediate_size": 32,
                "first_k_dense_replace": 1,
                "n_group": 1,
                "topk_group": 1,
                "norm_topk_prob": True,
                "routed_scaling_factor": 2.5,
                # read by the converter (real configs carry it); llama.cpp has no default
                "scoring_func": "sigmoid",
            },
        ),
    }
)


#: The gated-delta-net hybrids (qwen35, qwen35moe, qwen3next): linear attention on three of
#: four layers, no multi-token-prediction head (the converter expects one unless told).
_GATED_DELTA_NET: dict[str, Any] = {
    "num_hidden_layers": 4,
    "_convert_args": ["--no-mtp"],
    "layer_types": ["linear_attention", "linear_attention", "full_attention", "linear_attention"],
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
}
#: Their MoE variants' experts.
_GATED_DELTA_NET_MOE: dict[str, Any] = {
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
}

#: Recurrent and hybrid architectures (cpp_patch/0006, the recurrent state stash). Layer
#: patterns put a recurrent layer inside the test windows [1, 3) and [n - 2, n).
TINY_ARCHS.update(
    {
        "qwen35": (
            "Qwen3_5ForCausalLM",
            {
                **_GATED_DELTA_NET,
                # rope on a quarter of the head (4 dims: 2 pairs), text-only MRoPE sections
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "partial_rotary_factor": 0.25,
                    "mrope_section": [1, 1, 0],
                    "mrope_interleaved": True,
                },
            },
        ),
        "qwen35moe": (
            "Qwen3_5MoeForCausalLM",
            {
                **_GATED_DELTA_NET,
                **_GATED_DELTA_NET_MOE,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "partial_rotary_factor": 0.25,
                    "mrope_section": [1, 1, 0],
                    "mrope_interleaved": True,
                },
            },
        ),
        "qwen3next": (
            "Qwen3NextForCausalLM",
            {
                **_GATED_DELTA_NET,
                **_GATED_DELTA_NET_MOE,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "partial_rotary_factor": 0.25,
                },
            },
        ),
        "lfm2": (
            "Lfm2ForCausalLM",
            {
                "num_hidden_layers": 4,
                "layer_types": ["conv", "conv", "full_attention", "conv"],
                "norm_eps": 1e-5,
                "conv_L_cache": 3,
                "block_auto_adjust_ff_dim": False,
            },
        ),
        "lfm2moe": (
            "Lfm2MoeForCausalLM",
            {
                # layer 0 dense, MoE (sigmoid scores with an expert bias) after it
                "num_hidden_layers": 4,
                "layer_types": ["conv", "conv", "full_attention", "conv"],
                "norm_eps": 1e-5,
                # _COMMON's rms_norm_eps (1e-6) would be saved in config.json as an extra field,
                # and this converter (a plain TextModel, unlike LFM2's) reads rms_norm_eps
                # before norm_eps: real LFM2-MoE configs carry only norm_eps, so make them agree
                # (else every RMSNorm is off, 7.8e-3 on the logits)
                "rms_norm_eps": 1e-5,
                "num_dense_layers": 1,
                # the converter maps no lm_head for LFM2-MoE: tied embeddings, as the real ones
                "tie_word_embeddings": True,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 32,
            },
        ),
        "falcon-h1": (
            "FalconH1ForCausalLM",
            {
                # every layer runs attention and a Mamba-2 mixer side by side
                "num_hidden_layers": 4,
                "rms_norm_eps": 1e-5,
                "mamba_d_ssm": 128,
                "mamba_n_heads": 8,
                "mamba_d_head": 16,
                "mamba_n_groups": 1,
                "mamba_d_state": 16,
                "mamba_d_conv": 4,
                "mamba_expand": 2,
                "mamba_chunk_size": 16,
            },
        ),
        "granitehybrid": (
            "GraniteMoeHybridForCausalLM",
            {
                "num_hidden_layers": 4,
                "layer_types": ["mamba", "mamba", "attention", "mamba"],
                # transformers saves them as linear_attention / full_attention
                "_config_json": {"layer_types": ["mamba", "mamba", "attention", "mamba"]},
                # no RoPE: the converter writes a rope-free granitehybrid whenever there are
                # Mamba layers (Granite 4.0 hybrids are NoPE)
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "shared_intermediate_size": 64,
                "mamba_n_heads": 8,
                "mamba_d_head": 16,
                "mamba_n_groups": 1,
                "mamba_d_state": 16,
                "mamba_d_conv": 4,
                "mamba_expand": 2,
                "mamba_chunk_size": 16,
            },
        ),
        # transformers' NemotronH config always carries num_experts_per_tok, which makes the
        # converter write nemotron_h_moe: the tiny model is the MoE variant (same builder)
        "nemotron_h_moe": (
            "NemotronHForCausalLM",
            {
                "num_hidden_layers": 5,
                "layers_block_type": ["mamba", "mamba", "attention", "moe", "mamba"],
                "_convert_args": ["--no-mtp"],
                "n_routed_experts": 4,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 32,
                "moe_shared_expert_intermediate_size": 32,
                "n_group": 1,
                "topk_group": 1,
                "layer_norm_epsilon": 1e-5,
                # _COMMON's rms_norm_eps (1e-6) would be saved in config.json as an extra field,
                # which the converter writes as the RMS eps llama.cpp uses (real Nemotron-H
                # configs carry only layer_norm_epsilon): make them agree
                "rms_norm_eps": 1e-5,
                # transformers' NemotronH mixer clamps dt from below at time_step_min
                # (time_step_limit = (time_step_min, inf)); llama.cpp's Mamba-2 scan, like
                # transformers' own Mamba2, does not (5.5e-4 on the logits with the stock 1e-3).
                # At 1e-6 the clamp moves dt by at most 1e-6; the init range of dt stays
                # [time_step_floor = 1e-4, 0.1]
                "time_step_min": 1e-6,
                "ssm_state_size": 16,
                "mamba_num_heads": 8,
                "mamba_head_dim": 16,
                "n_groups": 1,
                "conv_kernel": 4,
                "expand": 2,
                "chunk_size": 16,
            },
        ),
        "jamba": (
            "JambaForCausalLM",
            {
                # attention at layer 2, MoE feed-forward on the odd layers
                "num_hidden_layers": 4,
                "attn_layer_period": 4,
                "attn_layer_offset": 2,
                "expert_layer_period": 2,
                "expert_layer_offset": 1,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "mamba_d_state": 16,
                "mamba_d_conv": 4,
                "mamba_expand": 2,
                "mamba_dt_rank": 8,
                "use_mamba_kernels": False,
                # the converter reads a SentencePiece tokenizer.model for Jamba
                "_sentencepiece": 512,
            },
        ),
        "mamba2": (
            "Mamba2ForCausalLM",
            {
                "num_hidden_layers": 4,
                "layer_norm_epsilon": 1e-5,
                "state_size": 16,
                "num_heads": 8,
                "head_dim": 16,
                "expand": 2,
                "n_groups": 1,
                "conv_kernel": 4,
                "chunk_size": 16,
            },
        ),
        "mamba": (
            "MambaForCausalLM",
            {
                "num_hidden_layers": 4,
                "layer_norm_epsilon": 1e-5,
                "state_size": 16,
                "expand": 2,
                "conv_kernel": 4,
                "time_step_rank": 8,
            },
        ),
    }
)


#: Architectures looped by cpp_patch/0007 (layers that read another layer's K/V, and the
#: builders whose layer loop needed more than the plain hand-over).
TINY_ARCHS.update(
    {
        # Gemma 4 with every feature of the family in one checkpoint: sliding and full layers
        # (head dims 16 / 32, proportional RoPE on a quarter of the full layers' dims), the last
        # two layers reuse the K/V of the last earlier layer of their type (layers 2 and 3),
        # per-layer token embeddings (E2B-style), and a MoE block beside the dense MLP (26B-style).
        "gemma4": (
            "Gemma4ForCausalLM",
            {
                # the converter reads tokenizer.json as a byte-fallback BPE (LlamaHfVocab)
                "_sentencepiece": 512,
                "_byte_fallback": True,
                "_hf_fast": True,
                "num_hidden_layers": 6,
                "sliding_window": 4,
                "layer_types": ["sliding_attention", "full_attention"] * 3,
                "global_head_dim": 32,
                "num_kv_shared_layers": 2,
                "hidden_size_per_layer_input": 8,
                "enable_moe_block": True,
                "num_experts": 4,
                "top_k_experts": 2,
                "moe_intermediate_size": 32,
                "final_logit_softcapping": 30.0,
                "hidden_activation": "gelu_pytorch_tanh",
                "tie_word_embeddings": True,
            },
        ),
        "jais2": (
            "Jais2ForCausalLM",
            {"num_hidden_layers": 4, "num_key_value_heads": 4, "layer_norm_eps": 1e-5},
        ),
    }
)


#: Recurrent builders converted after the stash (cpp_patch/0008).
TINY_ARCHS.update(
    {
        # Kimi Linear: Kimi Delta Attention (a gated delta rule over short-convolved q/k/v, three
        # conv states and a recurrent state) on three of four layers, MLA without RoPE on layer 2;
        # sigmoid-routed experts with a shared expert on every layer (transformers saves a dense
        # layer's MLP under block_sparse_moe, a name the converter does not map)
        "kimi-linear": (
            "KimiLinearForCausalLM",
            {
                "num_hidden_layers": 4,
                "layer_types": ["linear_attention", "linear_attention", "full_attention",
                                "linear_attention"],
                "mlp_layer_types": ["sparse"] * 4,
                "linear_head_dim": 16,
                "linear_num_heads": 4,
                "linear_conv_kernel_dim": 4,
                "kv_lora_rank": 32,
                "q_lora_rank": None,
                "qk_rope_head_dim": 8,
                "qk_nope_head_dim": 16,
                "v_head_dim": 16,
                "num_key_value_heads": 4,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 32,
                "n_shared_experts": 1,
                "routed_scaling_factor": 2.5,
                "norm_topk_prob": True,
                # the converter reads the checkpoint's own fields (1-based layer lists), which
                # transformers turns into layer_types and does not save
                "_config_json": {
                    "linear_attn_config": {
                        "full_attn_layers": [3],
                        "kda_layers": [1, 2, 4],
                        "head_dim": 16,
                        "num_heads": 4,
                        "short_conv_kernel_size": 4,
                    },
                    "num_shared_experts": 1,
                    "first_k_dense_replace": 0,
                    "moe_router_activation_func": "sigmoid",
                },
            },
        ),
    }
)

#: The text stacks of vision-language / multimodal models: the composite class with the
#: smallest towers that build (the converter's text GGUF skips them; their mmproj is not made),
#: the text decoder in ``_text_config``. The tests feed token ids only: text positions, the
#: same on every M-RoPE section.
_QWEN_VL_VISION: dict[str, Any] = {
    "depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
}
_STEP35_HUB: dict[str, Any] = {
    "layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
    "sliding_window": 4,
    "rope_theta": [5000000.0, 10000.0, 10000.0, 5000000.0],
    "partial_rotary_factors": [0.5, 1.0, 1.0, 0.5],
    "attention_other_setting": {"num_attention_heads": 8, "num_attention_groups": 2},
    "moe_layers_enum": "1,2,3",
}
_CHAMELEON_IMAGE_TOKENS = {
    "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(i - 4)) + "Z": i
    for i in range(4, 8196)
}
TINY_ARCHS.update(
    {
        "qwen3vl": (
            "Qwen3VLForConditionalGeneration",
            {
                "_text_config": {
                    "num_hidden_layers": 4,
                    # interleaved M-RoPE over the head's 8 pairs (Qwen3-VL: 24/20/20 of 64)
                    "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0,
                                        "mrope_section": [4, 2, 2], "mrope_interleaved": True},
                },
                # one deepstack layer (the real ones have 3): llama.cpp widens the input
                # embedding by it, a text token's deepstack part is zero
                "_vision_config": {**_QWEN_VL_VISION, "deepstack_visual_indexes": [0],
                                   "num_position_embeddings": 16},
            },
        ),
        "qwen3vlmoe": (
            "Qwen3VLMoeForConditionalGeneration",
            {
                "_text_config": {
                    "num_hidden_layers": 4,
                    # llama.cpp's qwen3vlmoe has experts on every layer (no dense one)
                    "num_local_experts": 4,
                    "num_experts_per_tok": 2,
                    # 2 * 16 != 64: transformers tells the saved layout from its own by shape
                    "moe_intermediate_size": 16,
                    "decoder_sparse_step": 1,
                    "mlp_only_layers": [],
                    "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0,
                                        "mrope_section": [4, 2, 2], "mrope_interleaved": True},
                },
                "_vision_config": {**_QWEN_VL_VISION, "deepstack_visual_indexes": [0],
                                   "num_position_embeddings": 16},
                # Qwen3-VL-MoE checkpoints store the experts as [E, H, 2I] / [E, I, H]
                "_saved_transposed": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
            },
        ),
        # Chameleon: LayerNorm'd q/k per head (ChameleonForConditionalGeneration with the
        # smallest VQ-VAE image tokenizer; the converter drops it)
        "chameleon": (
            "ChameleonForConditionalGeneration",
            {
                "num_hidden_layers": 4,
                "rms_norm_eps": 1e-5,
                "_repeat_rows": ["q_norm", "k_norm"],
                # the converter sizes the k norm by hidden_size / num_key_value_heads: no GQA
                # (as in Chameleon 7B)
                "num_key_value_heads": 4,
                # the image placeholder the class requires: a token of its own (the 49152
                # StarCoder tokens, then this one)
                "_extra_tokens": ["<image>"],
                # and the image tokens transformers masks out of the logits: the ids llama.cpp
                # hard-codes (Chameleon's [4, 8196)), named as in Chameleon's vocabulary
                "vocabulary_map": {"<image>": 49152, **_CHAMELEON_IMAGE_TOKENS},
                "_vq_config": {"embed_dim": 32, "num_embeddings": 16, "latent_channels": 32,
                               "resolution": 16, "base_channels": 32,
                               "channel_multiplier": [1, 2], "num_res_blocks": 1},
            },
        ),
        # PaddleOCR-VL: an ERNIE 4.5 text stack with M-RoPE
        "paddleocr": (
            "PaddleOCRVLForConditionalGeneration",
            {
                "_sentencepiece": 512,  # the ERNIE converter reads tokenizer.model
                "_text_config": {
                    "num_hidden_layers": 4,
                    "rms_norm_eps": 1e-5,
                    "use_bias": False,
                    # M-RoPE sections over the head's 8 pairs (PaddleOCR-VL: 16/24/24 of 64)
                    "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0,
                                        "mrope_section": [2, 3, 3]},
                },
                "_vision_config": {"hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 1, "num_attention_heads": 2,
                                   "image_size": 28},
            },
        ),
        # HunyuanOCR: HunYuan dense (q/k norms after RoPE) with XD-RoPE: four position
        # sections and a fixed NTK alpha (transformers saves it as "dynamic" + mrope_section)
        "hunyuan_vl": (
            "HunYuanVLForConditionalGeneration",
            {
                "_text_config": {
                    "num_hidden_layers": 4,
                    "rms_norm_eps": 1e-5,
                    # the real 16/16/16/16 of 64 pairs, over the head's 8; the real alpha
                    # (llama.cpp puts a text token at position 0 on the 4th section, which a
                    # high NTK alpha makes small: see the suite's ATOL)
                    "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0,
                                        "alpha": 1000.0, "factor": 1.0,
                                        "mrope_section": [2, 2, 2, 2]},
                },
                "_vision_config": {"hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 1, "num_attention_heads": 2,
                                   "num_key_value_heads": 2, "out_hidden_size": 64,
                                   "text_hidden_size": 64, "max_image_size": 64},
            },
        ),
        # Step-3.7 Flash: full layers (partial RoPE 0.5) and sliding layers with more heads
        # (full RoPE, their own theta), head-wise sigmoid attention gates, zero-centred norms,
        # sigmoid-routed experts with a selection bias and a shared expert after a dense layer.
        # The converter reads the hub config's own fields, which transformers turns into its
        # own: the entry gives those (the class takes them too) and writes them into config.json
        "step35": (
            "Step3p7ForConditionalGeneration",
            {
                # the class requires a pad id (StarCoder's vocabulary has none)
                "_text_config": {**_STEP35_HUB, "num_hidden_layers": 4, "pad_token_id": 0,
                                 "n_routed_experts": 4, "num_experts_per_tok": 2,
                                 "moe_intermediate_size": 32, "share_expert_dim": 32},
                "_config_json": {**_STEP35_HUB, "num_attention_groups": 2, "moe_num_experts": 4,
                                 "moe_top_k": 2, "norm_expert_weight": True},
                "_vision_config": {"hidden_size": 32, "num_hidden_layers": 1,
                                   "num_attention_heads": 2, "image_size": 28,
                                   "mlp_ratio": 2.0},
            },
        ),
        # Qwen2-VL and Qwen2.5-VL share llama.cpp's qwen2vl: the Qwen2.5-VL class
        "qwen2vl": (
            "Qwen2_5_VLForConditionalGeneration",
            {
                "_text_config": {
                    "num_hidden_layers": 4,
                    # M-RoPE sections over the head's 8 pairs (Qwen2-VL: 16/24/24 of 64)
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                        "mrope_section": [2, 3, 3]},
                    # llama.cpp's qwen2vl reads no RMS-norm epsilon (src/models/qwen2vl.cpp:
                    # f_norm_rms_eps stays 0, every Qwen2(.5)-VL GGUF runs so); the real 1e-6
                    # was 3.7e-4 off stock, 1.2e-4 on the first token alone (measured)
                    "rms_norm_eps": 0.0,
                },
                "_vision_config": {**_QWEN_VL_VISION, "fullatt_block_indexes": [0]},
            },
        ),
        # Gemma 3n's text stack: altup (4 streams), laurel, per-layer token embeddings,
        # activation sparsity. The text-only class (the converter takes it too): the composite
        # one builds its vision tower with timm, not installed. llama.cpp hard-codes E2B/E4B
        # values the tiny model must have: 256 per-layer input dims, laurel rank 64,
        # activation sparsity (0.95) on the first 10 layers (here all 4), and K/V shared
        # from layer 20 on, so no sharing at 4 layers (transformers saves no K/V weights for
        # a shared layer, which llama.cpp's loader requires)
        "gemma3n": (
            "Gemma3nForCausalLM",
            {
                "_sentencepiece": 512,
                "_byte_fallback": True,  # llama.cpp's SPM loader looks up the newline byte
                "num_hidden_layers": 4,
                "sliding_window": 4,
                "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
                "num_kv_shared_layers": 0,
                "activation_sparsity_pattern": [0.95] * 4,
                # llama.cpp's sparsity cut uses the unbiased std (transformers the biased
                # one): a real-sized feed-forward keeps the difference small (see the ATOL)
                "intermediate_size": 4096,
                "hidden_size_per_layer_input": 256,
                "laurel_rank": 64,
                "hidden_activation": "gelu_pytorch_tanh",
                "final_logit_softcapping": 30.0,
                "tie_word_embeddings": True,
            },
        ),
    }
)


#: The classic decoders (issue 15, group "classic"): GPT-2, StarCoder 1, BLOOM, Falcon, GPT-NeoX,
#: Phi-2, Gemma 1 and Mellum. Their layers live in the base model's one layer list
#: (transformer.h, gpt_neox.layers, model.layers). LayerNorm models: biases are perturbed too.
TINY_ARCHS.update(
    {
        # GPT-2: learned positions, fused qkv with biases, tanh-GELU MLP of 4 * n_embd (the
        # converter writes 4 * n_embd whatever n_inner says), tied LM head as the real ones
        "gpt2": (
            "GPT2LMHeadModel",
            # n_ctx: read by the converter (real configs carry it)
            {"num_hidden_layers": 4, "layer_norm_epsilon": 1e-5, "n_ctx": 512,
             "tie_word_embeddings": True},
        ),
        # StarCoder 1 / SantaCoder (GPTBigCode): multi-query attention (the converter writes
        # one KV head), learned positions, tied LM head
        "starcoder": (
            "GPTBigCodeForCausalLM",
            {"num_hidden_layers": 4, "layer_norm_epsilon": 1e-5, "multi_query": True,
             "tie_word_embeddings": True},
        ),
        # BLOOM: ALiBi instead of positions (4 heads: llama.cpp's ALiBi slopes for a power of
        # two), a LayerNorm after the embeddings, tied LM head; seq_length: the context length
        # the converter reads (real configs carry it)
        "bloom": (
            "BloomForCausalLM",
            {"num_hidden_layers": 4, "layer_norm_epsilon": 1e-5, "seq_length": 512,
             "tie_word_embeddings": True},
        ),
        # Falcon 40B/180B style (new_decoder_architecture): GQA with grouped fused qkv, two
        # LayerNorms feeding attention and MLP in parallel, no biases, RoPE; tied LM head
        "falcon": (
            "FalconForCausalLM",
            {"num_hidden_layers": 4, "layer_norm_epsilon": 1e-5, "new_decoder_architecture": True,
             "num_kv_heads": 2, "num_ln_in_parallel_attn": 2, "parallel_attn": True,
             "bias": False, "alibi": False, "tie_word_embeddings": True},
        ),
        # GPT-NeoX / Pythia: RoPE on a quarter of the head (Pythia's rotary_pct 0.25: 4 of 16
        # dims), parallel residual, untied LM head (embed_out); exact-erf GELU as the real ones
        "gptneox": (
            "GPTNeoXForCausalLM",
            {"num_hidden_layers": 4, "layer_norm_eps": 1e-5, "num_key_value_heads": 4,
             "use_parallel_residual": True, "hidden_act": "gelu",
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                 "partial_rotary_factor": 0.25}},
        ),
        # Phi-2: one LayerNorm feeding attention and MLP in parallel, partial RoPE (Phi-2's
        # 0.4: 6 of 16 dims), biases everywhere including the LM head; the converter writes
        # as many KV heads as heads (no GQA)
        "phi2": (
            "PhiForCausalLM",
            {"num_hidden_layers": 4, "layer_norm_eps": 1e-5, "num_key_value_heads": 4,
             "intermediate_size": 256,  # the converter writes 4 * n_embd (as Phi-2 has)
             "hidden_act": "gelu_new",
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                 "partial_rotary_factor": 0.4}},
        ),
        # Gemma 1: (1 + w) RMS norms, embeddings times sqrt(hidden), tanh-GELU gated MLP,
        # tied LM head (the converter skips lm_head); the converter reads tokenizer.model and
        # sets CodeGemma's special ids 67-70 and 107 (inside the 512-token vocabulary)
        "gemma": (
            "GemmaForCausalLM",
            {"_sentencepiece": 512, "num_hidden_layers": 4,
             "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True},
        ),
        # Mellum 2: MoE on every layer (llama.cpp's mellum has no dense layers), q/k RMS norms,
        # sliding layers and every 4th layer global (llama.cpp's default pattern). One rope base
        # for both types: llama.cpp's mellum graph ropes the sliding layers with the global
        # base (it reads rope.freq_base_swa but does not use it); with transformers' default
        # 10000 for the sliding layers stock llama.cpp was 0.74 off (measured)
        "mellum": (
            "MellumForCausalLM",
            {
                "num_hidden_layers": 4,
                "sliding_window": 4,
                "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
                "mlp_layer_types": ["sparse"] * 4,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 32,
                "norm_topk_prob": True,
                "rope_parameters": {
                    "full_attention": {"rope_type": "default", "rope_theta": 500000.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 500000.0},
                },
            },
        ),
    }
)


#: Issue 15, group i15misc: assorted dense / MoE builders (HunYuan, Granite SWA, BitNet, GLM, ...).
TINY_ARCHS.update(
    {
        # HunYuan dense v1: q/k RMS norms applied after RoPE
        "hunyuan-dense": ("HunYuanDenseV1ForCausalLM", {"num_hidden_layers": 4}),
        # Granite 4 SWA, its MoE variant (the same llama.cpp arch, more of the builder): layers
        # 0 and 3 global, 1 and 2 sliding, attention sinks, a shared expert beside the routed
        # ones, and every Granite multiplier away from 1 so that a dropped one shows
        "granite_swa": (
            "GraniteMoeSWAForCausalLM",
            {
                "num_hidden_layers": 4,
                "sliding_window": 4,
                "layer_types": ["full_attention", "sliding_attention", "sliding_attention",
                                "full_attention"],
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "intermediate_size": 32,
                "shared_intermediate_size": 64,
                "embedding_multiplier": 2.0,
                "residual_multiplier": 0.5,
                "attention_multiplier": 0.2,
                "logits_scaling": 3.0,
            },
        ),
        # BitNet b1.58 (1bitLLM's): sub-norms before o_proj and down_proj. llama.cpp's bitnet
        # builder hard-codes SiLU (the 1bitLLM checkpoints'); the converter reads
        # tokenizer.model and quantises the projections (see _bitlinear); it maps no lm_head
        # (the output is the token embedding, as in the real ones)
        "bitnet": (
            "BitNetForCausalLM",
            {"_sentencepiece": 512, "_bitlinear": True, "num_hidden_layers": 4,
             "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
             # the converter maps the sub-norms by 1bitLLM's names
             "_convert_renames": {"self_attn.attn_sub_norm": "self_attn.inner_attn_ln",
                                  "mlp.ffn_sub_norm": "mlp.ffn_layernorm"}},
        ),
        # GLM-4-9B-chat-hf (GlmForCausalLM): the converter writes chatglm (not glm4). RoPE on
        # half the head dims, q/k/v biases; the converter looks up GLM's chat tokens and
        # hard-codes rope base 10000 and the norm eps 1e-5 (ChatGLM's layernorm_epsilon)
        "chatglm": (
            "GlmForCausalLM",
            {"num_hidden_layers": 4, "_extra_tokens": ["<|user|>"], "rms_norm_eps": 1e-5},
        ),
        # HY3 (Hunyuan 3): layer 0 dense, then sigmoid-routed experts with a selection bias and
        # a shared expert, routed weights normalised and scaled
        "hy_v3": (
            "HYV3ForCausalLM",
            {
                "num_hidden_layers": 4,
                "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"],
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "num_shared_experts": 1,
                "moe_intermediate_size": 32,
                "router_scaling_factor": 2.5,
            },
        ),
        # Laguna (poolside): per-layer head counts, a per-head gate on the attention output,
        # sliding layers with their own RoPE (full rotary, base 10000) beside the global
        # layers' partial RoPE, layer 0 dense then sigmoid-routed experts with a shared expert.
        # llama.cpp fixes Laguna-XS.2's pattern (global where il % 4 == 0): layers 1-3 slide
        # (with layer 3 global, stock llama.cpp was 1.6 off transformers)
        "laguna": (
            "LagunaForCausalLM",
            {
                "num_hidden_layers": 4,
                "num_attention_heads_per_layer": [4, 8, 8, 4],
                "gating": True,
                "sliding_window": 4,
                "layer_types": ["full_attention"] + ["sliding_attention"] * 3,
                "rope_parameters": {
                    "full_attention": {"rope_type": "default", "rope_theta": 500000.0,
                                       "partial_rotary_factor": 0.5},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0,
                                          "partial_rotary_factor": 1.0},
                },
                "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"],
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 32,
                "shared_expert_intermediate_size": 32,
                "moe_routed_scaling_factor": 2.5,
            },
        ),
        # Mistral 4 (the text model): DeepSeek-V2's MLA with a MoE, YaRN RoPE with Llama 4's
        # attention temperature. The converter takes it as Mistral3ForConditionalGeneration
        # (model_type mistral4); transformers loads it by model_type as Mistral4ForCausalLM
        "mistral4": (
            "Mistral4ForCausalLM",
            {
                "num_hidden_layers": 4,
                "num_key_value_heads": 4,
                "q_lora_rank": 32,
                "kv_lora_rank": 32,
                "qk_rope_head_dim": 8,
                "qk_nope_head_dim": 8,
                "v_head_dim": 16,
                "head_dim": 16,
                "rope_interleave": True,
                "rope_parameters": {
                    "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                    "original_max_position_embeddings": 128, "mscale_all_dim": 1.0,
                    "mscale": 1.0, "llama_4_scaling_beta": 0.1, "beta_fast": 32.0,
                    "beta_slow": 1.0, "partial_rotary_factor": 0.5,
                },
                # MoE after a dense layer 0, top-2 of 4 plus a shared expert
                "first_k_dense_replace": 1,
                "n_routed_experts": 4,
                "num_experts_per_tok": 2,
                "n_shared_experts": 1,
                "moe_intermediate_size": 32,
                "routed_scaling_factor": 2.5,
                "_config_json": {"architectures": ["Mistral3ForConditionalGeneration"]},
            },
        ),
        # MiMo-V2-Flash: global layers 0 and 3, sliding layers 1 and 2 with twice the K/V heads
        # and attention sinks, q/k head dim 24 with RoPE on a third of it (base 5e6 global, 1e4
        # sliding), v head dim 16 scaled by attention_value_scale, layer 0 dense then
        # sigmoid-routed experts with a selection bias; no MTP head (--no-mtp)
        "mimo2": (
            "MiMoV2FlashForCausalLM",
            {
                "num_hidden_layers": 4,
                "_convert_args": ["--no-mtp"],
                "rms_norm_eps": 1e-5,  # the converter's default (MiMo's layernorm_epsilon)
                "head_dim": 24,
                "v_head_dim": 16,
                "sliding_window": 4,
                "layer_types": ["full_attention", "sliding_attention", "sliding_attention",
                                "full_attention"],
                "rope_parameters": {
                    "full_attention": {"rope_type": "default", "rope_theta": 5000000.0,
                                       "partial_rotary_factor": 0.334},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0,
                                          "partial_rotary_factor": 0.334},
                },
                "n_routed_experts": 4,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 32,
                "n_group": 1,
                "topk_group": 1,
                "norm_topk_prob": True,
                # the real one's (null in the hub config): neither the converter nor llama.cpp's
                # mimo2 carries a routed scale
                "routed_scaling_factor": 1.0,
                # the converter reads the hub config's fields (transformers derives layer_types
                # and the sliding layers' head counts from them and does not save them)
                "_config_json": {
                    "hybrid_layer_pattern": [0, 1, 1, 0],
                    "swa_num_key_value_heads": 4,
                    "swa_num_attention_heads": 4,
                    "swa_head_dim": 24,
                    "swa_v_head_dim": 16,
                    "topk_method": "noaux_tc",
                    # and the rotary fraction at the top of rope_parameters
                    "rope_parameters": {
                        "full_attention": {"rope_type": "default", "rope_theta": 5000000.0,
                                           "partial_rotary_factor": 0.334},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0,
                                              "partial_rotary_factor": 0.334},
                        "partial_rotary_factor": 0.334,
                    },
                },
            },
        ),
    }
)


#: Mixture-of-experts families (issue 15, group i15moe): sliding/global patterns, leading dense
#: layers and shared experts where the family has them.
TINY_ARCHS.update(
    {
        # GraniteMoeShared (a superset of GraniteMoe, the same llama.cpp arch): every multiplier
        # away from 1 so that a dropped one shows, and the shared expert
        "granitemoe": (
            "GraniteMoeSharedForCausalLM",
            {
                "num_hidden_layers": 4,
                "intermediate_size": 32,  # the experts' size
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "shared_intermediate_size": 64,
                "embedding_multiplier": 2.0,
                "residual_multiplier": 0.5,
                "attention_multiplier": 0.2,
                "logits_scaling": 3.0,
            },
        ),
        "phimoe": (
            "PhimoeForCausalLM",
            {
                # the converter reads tokenizer.model (as phi3's) and registers the class as
                # PhiMoEForCausalLM
                "_sentencepiece": 512,
                "_byte_fallback": True,
                "_extra_tokens": ["<|endoftext|>"],
                "_config_json": {"architectures": ["PhiMoEForCausalLM"]},
                "num_hidden_layers": 4,
                "num_key_value_heads": 4,
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "intermediate_size": 32,
                "rms_norm_eps": 1e-5,
                "attention_bias": True,
                "lm_head_bias": True,
                # the converter writes Phi-3's rope factors from the original context length
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                    "original_max_position_embeddings": 512},
            },
        ),
        "dbrx": (
            "DbrxForCausalLM",
            {
                "num_hidden_layers": 4,
                "d_model": 64,
                "n_heads": 4,
                "n_layers": 4,
                "max_seq_len": 512,
                "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2},
                # the converter reads rope_theta from attn_config (the real configs have it
                # there); clip_qkv 1.0 clamps some of the tiny model's q/k/v
                "attn_config": {"kv_n_heads": 2, "clip_qkv": 1.0, "rope_theta": 10000.0},
            },
        ),
        "cohere2moe": (
            "Cohere2MoeForCausalLM",
            {
                # every 4th layer global (the stock pattern), layer 0 a dense MLP, a shared
                # expert averaged with the routed ones
                "num_hidden_layers": 4,
                "sliding_window": 4,
                "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
                "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"],
                "prefix_dense_intermediate_size": 128,
                "intermediate_size": 32,  # the experts' size
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "num_shared_experts": 1,
                "layer_norm_eps": 1e-5,
                "logit_scale": 0.5,
                "tie_word_embeddings": True,
            },
        ),
        "exaone-moe": (
            "ExaoneMoeForCausalLM",
            {
                # sigmoid scores with a selection bias, a shared expert, layer 0 dense; sliding
                # layers with RoPE and a global one without, every 4th
                "num_hidden_layers": 4,
                "sliding_window": 4,
                "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
                "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"],
                "first_k_dense_replace": 1,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 32,
                "num_shared_experts": 1,
                "routed_scaling_factor": 2.5,
                "norm_topk_prob": True,
                "n_group": 1,
                "topk_group": 1,
                # llama.cpp's exaone-moe requires expert_gating_func, which the converter
                # writes from scoring_func (transformers' config has no such field)
                "scoring_func": "sigmoid",
            },
        ),
        "minimax-m2": (
            "MiniMaxM2ForCausalLM",
            {
                # sigmoid scores with a selection bias, RoPE on half of the head
                "num_hidden_layers": 4,
                "intermediate_size": 32,  # the experts' size
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                    "partial_rotary_factor": 0.5},
                # the converter reads rotary_dim, and writes llama.cpp's expert_gating_func
                # (no default: it aborts without) from scoring_func; real configs carry both
                "_config_json": {"rotary_dim": 8, "scoring_func": "sigmoid"},
            },
        ),
        "afmoe": (
            "AfmoeForCausalLM",
            {
                # layer 0 dense, sigmoid-routed experts with a shared expert after it; every
                # 4th layer global, the others sliding; gated attention with q/k norms
                "num_hidden_layers": 4,
                "num_dense_layers": 1,
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "num_shared_experts": 1,
                "moe_intermediate_size": 32,
                "route_scale": 2.5,
                "sliding_window": 4,
                "global_attn_every_n_layers": 4,
                "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
                # llama.cpp's afmoe always scales the embeddings by sqrt(hidden) (muP, as the
                # real checkpoints), and renormalises the top-k weights (transformers always
                # does) only when the converter finds route_norm (real configs carry it)
                "mup_enabled": True,
                "_config_json": {"route_norm": True},
            },
        ),
    }
)


def _config_class(arch: str) -> Any:
    import transformers

    names = {
        "llama": "LlamaConfig",
        "qwen2": "Qwen2Config",
        "qwen3": "Qwen3Config",
        "gemma3": "Gemma3TextConfig",
        "qwen3moe": "Qwen3MoeConfig",
        "olmoe": "OlmoeConfig",
        "deepseek2": "DeepseekV3Config",
    }
    if arch in names:
        return getattr(transformers, names[arch])
    return getattr(transformers, TINY_ARCHS[arch][0]).config_class


#: Recipe options (not config fields) that an entry may set in its overrides:
#: ``_extra_tokens``: special tokens added to the tokenizer (converters that look them up;
#: with ``_sentencepiece``, user-defined symbols of the trained vocabulary);
#: ``_sentencepiece``: a SentencePiece vocabulary of that size trained on a fixed text,
#: for converters that read ``tokenizer.model``; ``_byte_fallback``: that vocabulary has
#: the 256 byte tokens (llama.cpp's SPM loader looks up ``<0x0A>`` for the newline);
#: ``_convert_args``: further converter flags; ``_config_json``: fields written into the
#: saved config.json as given (transformers renames some values, e.g. hybrid layer types, to
#: names the vendored converter does not know).
#: ``_hf_fast``: with ``_sentencepiece``, also the vocabulary as a Hugging Face fast tokenizer
#: (tokenizer.json, byte-fallback BPE), for converters that read it (gguf's LlamaHfVocab).
#: ``_bitlinear``: the layers' projection weights become sign(w) times their mean magnitude,
#: which BitNet's converter quantisation (round(w / mean|w|) clamped to [-1, 1], times
#: mean|w|) leaves as they are: the f32 GGUF holds the checkpoint's own weights.
#: ``_convert_renames``: {old: new} substrings of the saved tensor names, replaced in a copy
#: that only the converter reads (names transformers renamed that the converter still maps
#: by their original checkpoints' names).
#: ``_text_config``: the class's config is composite (a vision-language model): these fields,
#: on top of the common ones and the tokenizer's ids, make its ``text_config``; the entry's
#: other fields (and ``tie_word_embeddings``) stay on the composite config.
#: ``_vision_config`` / ``_audio_config`` / ``_vq_config``: the composite config's sub-config
#: of that name (the smallest tower that builds: llama.cpp's text GGUF skips it).
#: ``_saved_transposed``: names (suffixes) of 3-D tensors saved with dims 1 and 2 swapped: the
#: layout of the real checkpoints, which transformers converts on load but (the shapes being
#: its own) does not restore on save; the converter reads the real layout.
#: ``_repeat_rows``: parameters (name parts) whose rows all get row 0's perturbed values: per-head
#: norms that the real checkpoints repeat over the heads (the converter keeps row 0).
_OPTIONS = ("_extra_tokens", "_sentencepiece", "_byte_fallback", "_convert_args", "_config_json",
            "_hf_fast", "_bitlinear", "_convert_renames", "_text_config", "_vision_config",
            "_audio_config", "_vq_config", "_saved_transposed", "_repeat_rows")


def _spec(arch: str) -> tuple[str, dict[str, Any]]:
    if arch not in TINY_ARCHS:
        raise ValueError(
            f"no tiny checkpoint recipe for {arch!r}: use one of {', '.join(TINY_ARCHS)}"
        )
    cls_name, overrides = TINY_ARCHS[arch]
    return cls_name, {**_COMMON, **overrides}


def cache_root() -> Path:
    from loopcpp.build import cache_dir

    return cache_dir() / "tiny"


def _digest(arch: str) -> str:
    import torch
    import transformers

    cls_name, cfg = _spec(arch)
    blob = json.dumps(
        {
            "arch": arch,
            "class": cls_name,
            "config": cfg,
            "seed": SEED,
            "recipe": RECIPE_VERSION,
            "tokenizer": TOKENIZER_GGUF,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _load_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from loopcpp.convert import vendored_llama_cpp

    models = vendored_llama_cpp() / "models"
    if not (models / TOKENIZER_GGUF).is_file():
        raise FileNotFoundError(
            f"{TOKENIZER_GGUF} is missing from {models}: the vendored llama.cpp tree is incomplete"
        )
    return AutoTokenizer.from_pretrained(str(models), gguf_file=TOKENIZER_GGUF)


def _sentencepiece_model(dest: Path, vocab_size: int, byte_fallback: bool = False,
                         extra_tokens: Sequence[str] = ()) -> dict[str, int]:
    """Train a SentencePiece BPE vocabulary on a fixed text into dest/tokenizer.model.

    Returns the config fields it fixes (vocab size and special ids). No Hugging Face
    tokenizer is written: the converter reads tokenizer.model, the tests use token ids.
    """
    import random

    import sentencepiece as spm

    rng = random.Random(SEED)
    letters = "abcdefghijklmnopqrstuvwxyz"
    lines = [
        " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 8))) for _ in range(12))
        for _ in range(2000)
    ]
    text = dest / "spm-train.txt"
    text.write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(dest / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        num_threads=1,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        byte_fallback=byte_fallback,
        user_defined_symbols=list(extra_tokens),
        minloglevel=2,
    )
    text.unlink()
    (dest / "tokenizer.vocab").unlink(missing_ok=True)
    return {"vocab_size": vocab_size, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}


def _hf_fast_tokenizer(dest: Path) -> None:
    """dest/tokenizer.model as a Hugging Face fast tokenizer: byte-fallback BPE (Llama 2 style)."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers.convert_slow_tokenizer import generate_merges

    sp = spm.SentencePieceProcessor(model_file=str(dest / "tokenizer.model"))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = generate_merges(vocab, {p: sp.get_score(i) for i, p in enumerate(pieces)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=pieces[0],
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.save(str(dest / "tokenizer.json"))
    names = dict(zip(("unk_token", "bos_token", "eos_token", "pad_token"), pieces[:4], strict=True))
    (dest / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **names}, indent=1)
    )


def _transpose_saved(dest: Path, suffixes: Sequence[str]) -> None:
    """Swap dims 1 and 2 of the saved tensors whose names end with one of ``suffixes``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in sorted(dest.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        for name, t in tensors.items():
            if name.endswith(tuple(suffixes)):
                tensors[name] = t.transpose(1, 2).contiguous()
        save_file(tensors, str(path), metadata=metadata)


def _build(arch: str, dest: Path) -> None:
    """Write the HF checkpoint (weights + tokenizer) and its f32 GGUF into dest."""
    import torch
    import transformers

    from loopcpp.convert import hf_to_gguf

    cls_name, cfg = _spec(arch)
    options = {k: cfg.pop(k) for k in _OPTIONS if k in cfg}
    tokenizer = None
    if "_sentencepiece" in options:
        special = _sentencepiece_model(dest, options["_sentencepiece"],
                                       options.get("_byte_fallback", False),
                                       options.get("_extra_tokens", ()))
        if options.get("_hf_fast"):
            _hf_fast_tokenizer(dest)
    else:
        tokenizer = _load_tokenizer()
        if options.get("_extra_tokens"):
            tokenizer.add_special_tokens({"additional_special_tokens": options["_extra_tokens"]})
        special = {
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    config_class = _config_class(arch)
    subs = {k[1:]: options[k] for k in ("_vision_config", "_audio_config", "_vq_config")
            if k in options}
    if "_text_config" in options:
        text = {k: cfg.pop(k) for k in _COMMON if k in cfg}
        text.update(special, **options["_text_config"])
        config = config_class(
            **cfg, **subs, text_config=text, tie_word_embeddings=text["tie_word_embeddings"]
        )
    else:
        for key in [k for k in _COMMON if k not in TINY_ARCHS[arch][1]]:
            if isinstance(getattr(config_class, key, None), property):
                del cfg[key]  # derived by this config (Falcon's head_dim), not a field
        config = config_class(**cfg, **subs, **special)
    text_config = config.get_text_config()
    if hasattr(text_config, "vocab_size_per_layer_input"):
        # per-layer token embeddings (gemma3n, gemma4): llama.cpp sizes them by the vocabulary
        text_config.vocab_size_per_layer_input = text_config.vocab_size
    config.architectures = [cls_name]
    torch.manual_seed(SEED)
    model = getattr(transformers, cls_name)._from_config(config, dtype=torch.float32)
    # Perturb norms and biases, whose default init (ones / zeros) would hide
    # conversion mistakes such as gemma's (1 + w) norm offset.
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        # per-head norms that real checkpoints repeat over the heads (one norm per head_dim)
        for name, p in sorted(model.named_parameters()):
            if any(k in name for k in options.get("_repeat_rows", ())):
                p.copy_(p[:1].expand_as(p))
        # DeepSeek-V3's expert selection bias is a buffer initialised to zero.
        for name, buf in sorted(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                buf.add_(0.1 * torch.randn(buf.shape, generator=gen, dtype=buf.dtype))
        if options.get("_bitlinear"):
            for name, p in sorted(model.named_parameters()):
                if ".layers." in name and name.endswith("_proj.weight"):
                    p.copy_(torch.sign(p) * p.abs().mean())
    model.save_pretrained(dest)
    if options.get("_saved_transposed"):
        _transpose_saved(dest, options["_saved_transposed"])
    if options.get("_config_json"):
        path = dest / "config.json"
        saved = json.loads(path.read_text())
        saved.update(options["_config_json"])
        path.write_text(json.dumps(saved, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(dest)
    src = dest
    if options.get("_convert_renames"):
        # a copy for the converter only, in a folder of the same name (the GGUF's model name)
        from safetensors.torch import load_file, save_file

        src = dest / "_convert" / dest.name
        src.mkdir(parents=True)
        for f in dest.iterdir():
            if f.is_file() and f.name != "model.safetensors":
                shutil.copy2(f, src / f.name)
        tensors = load_file(str(dest / "model.safetensors"))
        for old, new in options["_convert_renames"].items():
            tensors = {k.replace(old, new): v for k, v in tensors.items()}
        save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    hf_to_gguf(src, dest / GGUF_NAME, outtype="f32",
               extra_args=tuple(options.get("_convert_args", ())))
    if src != dest:
        shutil.rmtree(dest / "_convert")


def tiny_checkpoint(arch: str) -> tuple[Path, Path]:
    """``(hf_dir, gguf_path)`` of the cached tiny checkpoint of ``arch``, built if needed."""
    _spec(arch)
    root = cache_root()
    final = root / f"{arch}-{_digest(arch)}"
    gguf_path = final / GGUF_NAME
    if gguf_path.is_file():
        return final, gguf_path
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{arch}-", dir=root))
    # The converter names the model after its folder: build in one named like
    # the final folder so that the GGUF metadata is deterministic.
    tmp = staging / final.name
    try:
        tmp.mkdir()
        _build(arch, tmp)
        if final.exists() and not gguf_path.is_file():
            shutil.rmtree(final)  # an incomplete folder left by hand
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished first.
            if not gguf_path.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final, gguf_path


#: Bump when the fixture recipe (tool arguments, file choice) changes.
FIXTURE_VERSION = 1


#: Architectures llama.cpp's test-llama-archs writes no model of (its RWKV fixtures are
#: disabled upstream), written here from their loaders' tensor lists (src/models/<arch>.cpp,
#: ``load_arch_tensors``): per layer, tensor -> ggml shape (``ne``) in terms of the sizes below.
#: The head size is the real models' 64: with 16, stock llama.cpp's RWKV-7 corrupts its heap
#: (``free(): invalid next size`` when the context is freed; measured).
_RWKV_SIZES = {"n_embd": 128, "n_ff": 256, "n_vocab": 128, "n_layer": 4, "head": 64, "lora": 8}
_RWKV_LAYER: dict[str, dict[str, tuple[str, ...]]] = {
    "rwkv6": {
        "attn_norm.weight": ("n_embd",), "attn_norm.bias": ("n_embd",),
        "attn_norm_2.weight": ("n_embd",), "attn_norm_2.bias": ("n_embd",),
        "time_mix_w1.weight": ("n_embd", "lora*5"), "time_mix_w2.weight": ("lora", "n_embd", "5"),
        "time_mix_lerp_x.weight": ("n_embd", "1", "1"),
        "time_mix_lerp_fused.weight": ("n_embd", "1", "1", "5"),
        "time_mix_first.weight": ("head", "n_embd/head"), "time_mix_decay.weight": ("n_embd",),
        "time_mix_decay_w1.weight": ("n_embd", "lora"),
        "time_mix_decay_w2.weight": ("lora", "n_embd"),
        "time_mix_key.weight": ("n_embd", "n_embd"), "time_mix_value.weight": ("n_embd", "n_embd"),
        "time_mix_receptance.weight": ("n_embd", "n_embd"),
        "time_mix_gate.weight": ("n_embd", "n_embd"),
        "time_mix_ln.weight": ("n_embd",), "time_mix_ln.bias": ("n_embd",),
        "time_mix_output.weight": ("n_embd", "n_embd"),
        "channel_mix_lerp_k.weight": ("n_embd", "1", "1"),
        "channel_mix_lerp_r.weight": ("n_embd", "1", "1"),
        "channel_mix_key.weight": ("n_embd", "n_ff"),
        "channel_mix_value.weight": ("n_ff", "n_embd"),
        "channel_mix_receptance.weight": ("n_embd", "n_embd"),
    },
    "rwkv7": {
        "attn_norm.weight": ("n_embd",), "attn_norm.bias": ("n_embd",),
        "attn_norm_2.weight": ("n_embd",), "attn_norm_2.bias": ("n_embd",),
        **{f"time_mix_{x}0.weight": ("n_embd",) for x in "wav"},
        **{f"time_mix_{x}1.weight": ("n_embd", "lora") for x in "wavg"},
        **{f"time_mix_{x}2.weight": ("lora", "n_embd") for x in "wavg"},
        "time_mix_lerp_fused.weight": ("n_embd", "1", "1", "6"),
        "time_mix_k_k.weight": ("n_embd",), "time_mix_k_a.weight": ("n_embd",),
        "time_mix_r_k.weight": ("n_embd",),
        "time_mix_key.weight": ("n_embd", "n_embd"), "time_mix_value.weight": ("n_embd", "n_embd"),
        "time_mix_receptance.weight": ("n_embd", "n_embd"),
        "time_mix_ln.weight": ("n_embd",), "time_mix_ln.bias": ("n_embd",),
        "time_mix_output.weight": ("n_embd", "n_embd"),
        "channel_mix_lerp_k.weight": ("n_embd", "1", "1"),
        "channel_mix_key.weight": ("n_embd", "n_ff"),
        "channel_mix_value.weight": ("n_ff", "n_embd"),
    },
}


def _write_rwkv_fixture(arch: str, dest: Path) -> None:
    """A seeded random RWKV-6 / RWKV-7 GGUF with the fixture vocabulary of test-llama-archs."""
    import gguf
    import numpy as np

    size = dict(_RWKV_SIZES)
    size.update({"lora*5": size["lora"] * 5, "n_embd/head": size["n_embd"] // size["head"]})
    rng = np.random.default_rng(SEED)
    w = gguf.GGUFWriter(str(dest), arch)
    w.add_context_length(256)
    w.add_embedding_length(size["n_embd"])
    w.add_block_count(size["n_layer"])
    w.add_feed_forward_length(size["n_ff"])
    w.add_head_count(0)
    w.add_layer_norm_eps(1e-5)
    w.add_wkv_head_size(size["head"])
    if arch == "rwkv6":
        w.add_time_mix_extra_dim(size["lora"])
        w.add_time_decay_extra_dim(size["lora"])
        w.add_rescale_every_n_layers(2)  # the rescale of the stock models, inside the layer
    else:
        for add in (w.add_decay_lora_rank, w.add_iclr_lora_rank,
                    w.add_value_residual_mix_lora_rank, w.add_gate_lora_rank):
            add(size["lora"])
    w.add_token_shift_count(2)
    w.add_tokenizer_model("test")
    w.add_token_list([f"tok_{i}" for i in range(size["n_vocab"])])
    w.add_token_types([1] * size["n_vocab"])
    w.add_token_scores([0.0] * size["n_vocab"])

    def tensor(name: str, ne: tuple[str, ...]) -> None:
        shape = tuple(size[d] if d in size else int(d) for d in reversed(ne))
        w.add_tensor(name, (0.1 * rng.standard_normal(shape)).astype(np.float32))

    tensor("token_embd.weight", ("n_embd", "n_vocab"))
    tensor("token_embd_norm.weight", ("n_embd",))
    tensor("token_embd_norm.bias", ("n_embd",))
    for il in range(size["n_layer"]):
        for name, ne in _RWKV_LAYER[arch].items():
            tensor(f"blk.{il}.{name}", ne)
    tensor("output_norm.weight", ("n_embd",))
    tensor("output_norm.bias", ("n_embd",))
    tensor("output.weight", ("n_embd", "n_vocab"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def fixture_checkpoint(arch: str) -> Path:
    """A random tiny GGUF of ``arch`` written by llama.cpp's own ``test-llama-archs``, cached.

    For the architectures no transformers class builds (remote-code models, builders without
    a Hugging Face counterpart): no reference to compare with, but the K = 1 identity, the
    state tests and a looped run need only a GGUF. The tool's model (2 layers for most
    architectures, its MoE variant where it has one) is seeded; the cache is keyed by the stock
    build it comes from. ValueError names an architecture the tool does not write.
    """
    from loopcpp import build

    # keyed by the stock build (its folder name is its key) the fixture comes from
    recipe = [arch, SEED, FIXTURE_VERSION, build.stock_lib().parent.parent.name]
    if arch in _RWKV_LAYER:
        recipe.append([_RWKV_SIZES, _RWKV_LAYER[arch]])
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    root = cache_root()
    final = root / f"fixture-{arch}-{digest}.gguf"
    if final.is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".fixture-{arch}-", dir=root))
    try:
        if arch in _RWKV_LAYER:
            _write_rwkv_fixture(arch, staging / "model.gguf")
            os.replace(staging / "model.gguf", final)
            return final
        tool = build.fixture_tool()
        proc = subprocess.run([str(tool), "-a", arch, "-s", str(SEED), "-o", str(staging)],
                              capture_output=True, text=True, check=False)
        made = sorted(staging.glob("*-moe.gguf")) or sorted(staging.glob("*-dense.gguf"))
        if proc.returncode != 0 or not made:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            raise ValueError(f"llama.cpp's test-llama-archs wrote no model of {arch!r}: "
                             + " / ".join(tail))
        os.replace(made[0], final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def load_hf_model(hf_dir: Path | str, attn_implementation: str = "eager") -> Any:
    """Load a checkpoint folder as a float32 causal LM in eval mode.

    A config AutoModelForCausalLM does not map loads with the causal LM class of its model
    type (``<Name>Config`` -> ``<Name>ForCausalLM``: Mistral 4's), else with the class the
    checkpoint names (the vision-language models' ``...ForConditionalGeneration``).
    """
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    cls: Any = AutoModelForCausalLM
    config = AutoConfig.from_pretrained(str(hf_dir))
    if type(config) not in AutoModelForCausalLM._model_mapping:
        name = type(config).__name__.removesuffix("Config") + "ForCausalLM"
        if not hasattr(transformers, name) and config.architectures:
            name = config.architectures[0]
        cls = getattr(transformers, name, AutoModelForCausalLM)
    model = cls.from_pretrained(
        str(hf_dir), dtype=torch.float32, attn_implementation=attn_implementation
    )
    return model.eval()


if __name__ == "__main__":  # pragma: no cover - manual helper
    for name in sys.argv[1:] or list(TINY_ARCHS):
        print(name, *tiny_checkpoint(name))
