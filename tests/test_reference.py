"""The PyTorch reference of the loop semantics, on tiny random checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loopcpp.config import LoopConfig, LoopConfigError
from loopcpp.tiny import TINY_ARCHS, load_hf_model, tiny_checkpoint

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
LoopedReference = pytest.importorskip("loopcpp.reference").LoopedReference

ARCHS = list(TINY_ARCHS)
# token ids below 512: the smallest tiny vocabulary (the seeded SentencePiece ones)
PROMPT = [1, 11, 367, 17, 334, 350, 44, 475, 179, 77, 394, 31, 400, 12, 9, 315, 300, 28]

_models: dict[str, object] = {}


def model(arch: str):
    if arch not in _models:
        try:
            hf_dir, _ = tiny_checkpoint(arch)
        except FileNotFoundError as exc:  # no vendored llama.cpp tree here
            pytest.skip(str(exc))
        torch.set_num_threads(2)
        _models[arch] = load_hf_model(hf_dir)
    return _models[arch]


def window(m) -> LoopConfig:
    n = m.config.get_text_config().num_hidden_layers
    return LoopConfig(start=1, end=n - 1, count=3)


def hf_logits(m, tokens, n_ubatch):
    from transformers import DynamicCache

    cache = DynamicCache(config=m.config)
    out = []
    with torch.no_grad():
        for i in range(0, len(tokens), n_ubatch):
            ids = torch.tensor([tokens[i : i + n_ubatch]])
            out.append(m(ids, cache=cache, use_cache=True).logits[0])
    return torch.cat(out)


@pytest.mark.parametrize("arch", ARCHS)
def test_stock_matches_hf_forward(arch):
    m = model(arch)
    for n_ubatch in (len(PROMPT), 5):
        got = LoopedReference(m, None).run(PROMPT, n_ubatch)
        want = hf_logits(m, PROMPT, n_ubatch)
        assert got.shape == (len(PROMPT), m.config.get_text_config().vocab_size)
        # gemma3's sliding layers keep a shorter cache in HF: round-off only
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_loops_are_bit_identical(arch):
    m = model(arch)
    stock = LoopedReference(m, None).run(PROMPT, 7)
    base = window(m).with_(count=1)
    for cfg in (
        base.with_(method="euler"),
        base.with_(method="naive"),
        base.with_(method="naive", mode="layer", kv="first"),
    ):
        got = LoopedReference(m, cfg).run(PROMPT, 7)
        assert torch.equal(got, stock), cfg.describe()
    looped = LoopedReference(m, window(m)).run(PROMPT, 7)
    assert torch.isfinite(looped).all()
    assert (looped - stock).abs().max() > 1e-3


@pytest.mark.parametrize("method,count", [("naive", 2), ("euler", 2), ("rk3", 1)])
def test_whole_model_loop_matches_hf_recomputation(method, count):
    """A one-batch loop over every layer, recomputed with plain HF calls.

    With the window covering the whole stack and an empty cache, each evaluation
    of the block map is an ordinary HF forward (attention over its own K/V).
    """
    m = model("llama")
    n = m.config.get_text_config().num_hidden_layers
    cfg = LoopConfig(start=0, end=n, count=count, method=method)
    got = LoopedReference(m, cfg).forward(PROMPT)
    ids = torch.tensor([PROMPT])
    norm = m.model.norm
    m.model.norm = torch.nn.Identity()
    try:
        with torch.no_grad():

            def g(x):
                return m.model(inputs_embeds=x, use_cache=False).last_hidden_state

            x = m.model.embed_tokens(ids)
            h = 1.0 / count
            for _ in range(count):
                if method == "naive":
                    x = g(x)
                elif method == "euler":
                    x = x + h * (g(x) - x)
                else:  # the contract's Shu-Osher rk3, written out
                    y1 = x + h * (g(x) - x)
                    y2 = 0.75 * x + 0.25 * (y1 + h * (g(y1) - y1))
                    x = x / 3 + 2 / 3 * (y2 + h * (g(y2) - y2))
            want = m.lm_head(norm(x))[0]
    finally:
        m.model.norm = norm
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_cache_does_not_grow_with_k():
    m = model("llama")
    for cfg in (window(m), window(m).with_(method="rk3", mode="layer", count=2)):
        ref = LoopedReference(m, cfg)
        ref.run(PROMPT, 6)
        ref.forward([42])
        for layer in range(m.config.get_text_config().num_hidden_layers):
            assert ref.kv_length(layer) == len(PROMPT) + 1
        evals = ref.last_evals
        per_window_layer = cfg.count * len(cfg.stages)
        assert evals[cfg.start] == per_window_layer and evals[cfg.end - 1] == per_window_layer
        assert evals[0] == 1 and evals[cfg.end] == 1


def test_kv_first_vs_last():
    m = model("qwen3")
    cfg = window(m)
    stock = LoopedReference(m, None)
    stock.forward(PROMPT)
    first = LoopedReference(m, cfg.with_(kv="first"))
    last = LoopedReference(m, cfg.with_(kv="last"))
    first.forward(PROMPT)
    last.forward(PROMPT)
    # kv=first in block mode persists the stock entries for the first batch's window
    for layer in range(cfg.end):
        assert torch.equal(first.past_k[layer], stock.past_k[layer])
        assert torch.equal(first.past_v[layer], stock.past_v[layer])
    assert not torch.equal(last.past_k[cfg.start + 1], stock.past_k[cfg.start + 1])
    # so decoding differs
    a, b = first.forward([77]), last.forward([77])
    assert (a - b).abs().max() > 1e-4


def with_cache_of(ref, src):
    ref.past_k, ref.past_v, ref.n_past = list(src.past_k), list(src.past_v), src.n_past
    return ref


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_apply_prefill_decodes_with_the_stock_stack(arch):
    m = model(arch)
    cfg = window(m)
    looped = LoopedReference(m, cfg.with_(apply="prefill"))
    looped.run(PROMPT, 8)
    always = with_cache_of(LoopedReference(m, cfg), looped)
    stock = with_cache_of(LoopedReference(m, None), looped)
    assert (always.forward([5]) - stock.forward([5])).abs().max() > 1e-4
    stock = with_cache_of(LoopedReference(m, None), looped)
    for token in (5, 900, 31):
        assert torch.equal(looped.forward([token]), stock.forward([token]))
    # a multi-token batch is looped again
    assert (looped.forward([7, 8]) - stock.forward([7, 8])).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_chunked_prefill_matches_unchunked(arch):
    m = model(arch)
    whole = LoopedReference(m, None).run(PROMPT, len(PROMPT))
    for n_ubatch, n_batch in ((4, None), (1, None), (4, 10)):
        chunked = LoopedReference(m, None).run(PROMPT, n_ubatch, n_batch)
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)


def test_run_splits_like_llama_cpp():
    m = model("llama")
    ref = LoopedReference(m, window(m))
    sizes = []
    forward = ref.forward
    ref.forward = lambda ids: sizes.append(len(ids)) or forward(ids)  # type: ignore[method-assign]
    ref.run(list(range(1, 24)), n_ubatch=4, n_batch=10)
    assert sizes == [4, 4, 2, 4, 4, 2, 3]


def test_decode_greedy_rows():
    m = model("llama")
    ref = LoopedReference(m, window(m))
    new, logits = ref.decode_greedy(PROMPT[:6], 4, n_ubatch=4)
    assert len(new) == 4 and logits.shape[0] == 10 and ref.n_past == 10
    assert new[0] == int(logits[5].argmax()) and new[3] == int(logits[8].argmax())


def test_moe_routing_frozen_vs_fresh():
    m = model("qwen3moe")
    cfg = window(m)
    frozen = LoopedReference(m, cfg.with_(routing="frozen")).run(PROMPT, 9)
    fresh = LoopedReference(m, cfg.with_(routing="fresh")).run(PROMPT, 9)
    assert (frozen - fresh).abs().max() > 1e-4
    one = cfg.with_(count=1)
    a = LoopedReference(m, one.with_(routing="frozen")).run(PROMPT, 9)
    b = LoopedReference(m, one.with_(routing="fresh")).run(PROMPT, 9)
    assert torch.equal(a, b)
    # the router patch is undone after each batch
    gate = m.model.layers[1].mlp.gate
    assert "forward" not in vars(gate)


def test_frozen_routing_reuses_first_choice():
    m = model("qwen3moe")
    gate = m.model.layers[1].mlp.gate
    calls = []
    original = type(gate).forward

    def counting(self, x):
        calls.append(x.shape[0])
        return original(self, x)

    type(gate).forward = counting
    try:
        LoopedReference(m, window(m).with_(routing="frozen", count=4)).forward(PROMPT)
        frozen_calls = len(calls)
        calls.clear()
        LoopedReference(m, window(m).with_(routing="fresh", count=4)).forward(PROMPT)
    finally:
        type(gate).forward = original
    n = m.config.get_text_config().num_hidden_layers
    assert frozen_calls == n  # every layer's router ran once
    assert len(calls) == n - 2 + 2 * 4


def test_invalid_setups_are_refused():
    m = model("llama")
    with pytest.raises(LoopConfigError, match="out of range"):
        LoopedReference(m, LoopConfig(start=1, end=m.config.num_hidden_layers + 1))
    with pytest.raises(LoopConfigError, match="model.model.layers"):
        LoopedReference(torch.nn.Linear(2, 2), None)
    with pytest.raises(ValueError, match=r"\[1, n\]"):
        LoopedReference(m, None).forward(torch.zeros((2, 3), dtype=torch.long))


def test_package_import_does_not_import_torch():
    code = "import sys, loopcpp, loopcpp.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# -- decoders beyond the seven tiny families: the model's own forward, intercepted ------------

_COMMON_SMALL = dict(
    hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, vocab_size=97, max_position_embeddings=128, num_hidden_layers=4,
)
#: HF class -> (config class, overrides): sliding windows (Mistral, Gemma2 with soft-capping,
#: Cohere2's layer_types), chunked attention and NoPE layers (Llama 4), MoE routers under
#: other names and shapes (Qwen2-MoE with a shared expert, Mixtral, GPT-OSS, Llama 4).
OTHER_DECODERS = {
    "MistralForCausalLM": ("MistralConfig", dict(sliding_window=3)),
    "Gemma2ForCausalLM": ("Gemma2Config", dict(
        sliding_window=3, final_logit_softcapping=5.0, attn_logit_softcapping=10.0,
        query_pre_attn_scalar=8)),
    "Cohere2ForCausalLM": ("Cohere2Config", dict(
        sliding_window=3, layer_types=["sliding_attention"] * 3 + ["full_attention"])),
    "Llama4ForCausalLM": ("Llama4TextConfig", dict(
        attention_chunk_size=3, num_local_experts=2, intermediate_size_mlp=64,
        interleave_moe_layer_step=2, no_rope_layers=[1, 1, 1, 0])),
    "Qwen2MoeForCausalLM": ("Qwen2MoeConfig", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=16)),
    "MixtralForCausalLM": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "GptOssForCausalLM": ("GptOssConfig", dict(
        num_local_experts=4, num_experts_per_tok=2, sliding_window=3,
        layer_types=["sliding_attention", "full_attention"] * 2)),
}
SMALL_PROMPT = [5, 17, 3, 44, 9, 60, 2, 31, 70, 11, 8]


def other_decoder(name: str):
    import transformers

    cfg_name, overrides = OTHER_DECODERS[name]
    cls = getattr(transformers, name, None)
    if cls is None or not hasattr(transformers, cfg_name):
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    config = getattr(transformers, cfg_name)(**{**_COMMON_SMALL, **overrides})
    torch.manual_seed(0)
    m = cls._from_config(config, dtype=torch.float32, attn_implementation="eager")
    return m.eval()


@pytest.mark.parametrize("name", list(OTHER_DECODERS))
def test_other_decoders_match_their_own_forward(name):
    """Any HF decoder: stock = its forward with a cache; K = 1 identical; a loop moves it."""
    m = other_decoder(name)
    want = hf_logits(m, SMALL_PROMPT, 4)
    got = LoopedReference(m, None).run(SMALL_PROMPT, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    one = LoopedReference(m, LoopConfig(1, 3, count=1)).run(SMALL_PROMPT, 4)
    assert torch.equal(one, got)
    looped = LoopedReference(m, LoopConfig(1, 3, count=3, anchor=0.5, kv="refined"))
    assert (looped.run(SMALL_PROMPT, 4) - got).abs().max() > 1e-3
    assert looped.kv_length(2) == len(SMALL_PROMPT)
    ref = LoopedReference(m)
    moe = "Moe" in name or name in ("MixtralForCausalLM", "GptOssForCausalLM", "Llama4ForCausalLM")
    assert any(r is not None for r in ref.routers) == moe
    if moe:
        layer = next(i for i, r in enumerate(ref.routers) if r is not None)
        w = LoopConfig(layer, layer + 1, count=3)
        frozen = LoopedReference(m, w).run(SMALL_PROMPT, 4)
        fresh = LoopedReference(m, w.with_(routing="fresh")).run(SMALL_PROMPT, 4)
        assert (frozen - fresh).abs().max() > 1e-5


@pytest.mark.parametrize("name", ["MistralForCausalLM", "Llama4ForCausalLM"])
def test_other_decoder_whole_model_loop_matches_recomputation(name):
    """Euler over the whole stack on one batch = damped sub-steps of plain HF forwards.

    Sliding (Mistral) and chunked (Llama 4) masks come from the model's own mask code.
    """
    m = other_decoder(name)
    cfg = LoopConfig(0, m.config.num_hidden_layers, count=3, routing="fresh")  # Llama 4 has MoE
    got = LoopedReference(m, cfg).forward(SMALL_PROMPT)
    norm = m.model.norm
    m.model.norm = torch.nn.Identity()
    try:
        with torch.no_grad():
            x = m.model.embed_tokens(torch.tensor([SMALL_PROMPT]))
            for _ in range(3):
                x = x + (1 / 3) * (m.model(inputs_embeds=x, use_cache=False).last_hidden_state - x)
            want = m.lm_head(norm(x))[0]
    finally:
        m.model.norm = norm
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# -- version 2, recomputed from the contract's formulas with plain HF calls ------------------


def _v2_recomputed(method: str, count: int, g, x0, **kw):
    """LOOPING.md v2 written out directly (double-precision scalars; round-off differs)."""
    h = kw.get("step") or 1.0 / count
    beta = kw.get("anchor", 0.0)
    norm = lambda y: y.norm(dim=-1, keepdim=True)  # noqa: E731
    to = lambda y, t: y * (t / norm(y).clamp_min(1e-6))  # noqa: E731
    nat = g(x0)
    f = lambda z: g(z) - z  # noqa: E731
    x = x0
    if method == "euler":
        for k in range(1, count + 1):
            x = x + h * ((nat if k == 1 else g(x)) - x)
            if kw.get("norm") == "interp" and k < count:
                x = to(x, norm(x0) + (norm(nat) - norm(x0)) * k / count)
    elif method == "midpoint":
        for _ in range(count):
            x = x + h * f(x + h / 2 * f(x))
    elif method == "heun":
        for _ in range(count):
            k1 = f(x)
            x = x + h / 2 * (k1 + f(x + h * k1))
    elif method == "rk4":
        for _ in range(count):
            k1 = f(x)
            k2 = f(x + h / 2 * k1)
            k3 = f(x + h / 2 * k2)
            k4 = f(x + h * k3)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    elif method == "residual":
        y = x0
        for _ in range(count):
            y = g(y)
        x = x0 + h * (y - x0)
    elif method == "input_anchor":
        for _ in range(count):
            x = h * g(x) + (1 - h) * x0
    elif method == "heavy_ball":
        mu, prev = kw.get("momentum", 0.3), x0
        for _ in range(count):
            x, prev = x + h * (g(x) - x) + mu * (x - prev), x
    elif method == "norm_stab":
        for _ in range(count):
            x = to(x + h * (g(x) - x), norm(x0))
    x = beta * nat + (1 - beta) * x
    return to(x, norm(nat)) if kw.get("anchor_norm") else x


@pytest.mark.parametrize(
    "method,kw",
    [
        ("euler", dict(anchor=0.5)),
        ("euler", dict(anchor=0.5, norm="interp")),
        ("euler", dict(step=0.4, anchor_norm=True)),
        ("midpoint", {}),
        ("heun", dict(step=0.6)),
        ("rk4", dict(anchor=0.3)),
        ("residual", {}),
        ("input_anchor", dict(step=0.7)),
        ("heavy_ball", dict(momentum=0.6)),
        ("norm_stab", dict(anchor=0.25)),
    ],
)
def test_whole_model_v2_matches_the_formulas(method, kw):
    """One batch, the window = the whole stack: each G is a plain HF forward (block mode)."""
    m = model("llama")
    n, count = m.config.get_text_config().num_hidden_layers, 3
    got = LoopedReference(m, LoopConfig(0, n, count=count, method=method, **kw)).forward(PROMPT)
    norm = m.model.norm
    m.model.norm = torch.nn.Identity()
    try:
        with torch.no_grad():
            x0 = m.model.embed_tokens(torch.tensor([PROMPT]))

            def g(x):
                return m.model(inputs_embeds=x, use_cache=False).last_hidden_state

            want = m.lm_head(norm(_v2_recomputed(method, count, g, x0, **kw)))[0]
    finally:
        m.model.norm = norm
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_uniform_running_means():
    """uniform: window layer j hands on the mean of its outputs so far; K = 1 is stock."""
    m = model("llama")
    layers = m.model.layers
    stock = LoopedReference(m, None).forward(PROMPT)
    one = LoopedReference(m, LoopConfig(1, 3, count=1, method="uniform")).forward(PROMPT)
    assert torch.equal(one, stock)
    seen = []
    hooks = [layers[i].register_forward_hook(lambda mod, a, out, i=i: seen.append((i, a[0], out)))
             for i in (1, 2, 3)]
    try:
        LoopedReference(m, LoopConfig(1, 3, count=3, method="uniform")).forward(PROMPT)
    finally:
        for hk in hooks:
            hk.remove()
    outs = {1: [], 2: []}
    for i, inp, out in seen:
        if i in outs:
            outs[i].append((inp, out))
    # hooks also see the model's own calls: layer 1's first (its input handed on), layer 2's
    # last (the window's output)
    assert outs[1][0][1] is outs[1][0][0]
    torch.testing.assert_close(outs[2][-1][1], seen[-1][1], rtol=0, atol=0)
    outs = {1: outs[1][1:], 2: outs[2][:-1]}
    assert len(outs[1]) == len(outs[2]) == 3
    x0 = outs[1][0][0]
    for k in range(3):
        assert torch.equal(outs[1][k][0], x0)  # the window's input at every pass
        mean1 = torch.stack([o for _, o in outs[1][: k + 1]]).mean(0)
        torch.testing.assert_close(outs[2][k][0], mean1, rtol=0, atol=1e-6)
    final = torch.stack([o for _, o in outs[2]]).mean(0)
    torch.testing.assert_close(seen[-1][1], final, rtol=0, atol=1e-6)  # layer 3's input


@pytest.mark.parametrize("mode", ["block", "layer"])
def test_kv_refined_is_written_from_the_window_output(mode):
    """kv = refined: the window's first layer persists K computed from what layer b receives."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    m = model("llama")
    cfg = LoopConfig(1, 3, count=3, mode=mode, anchor=0.5, kv="refined")
    ref = LoopedReference(m, cfg)
    received = []
    hook = m.model.layers[3].register_forward_pre_hook(lambda mod, a: received.append(a[0]))
    try:
        ref.forward(PROMPT)
    finally:
        hook.remove()
    x = received[-1]
    layer = m.model.layers[1]
    pos = torch.arange(len(PROMPT))[None]
    with torch.no_grad():
        k = layer.self_attn.k_proj(layer.input_layernorm(x))
        k = k.view(1, len(PROMPT), -1, m.config.get_text_config().head_dim).transpose(1, 2)
        cos, sin = m.model.rotary_emb(x, pos)
        k = apply_rotary_pos_emb(k, k, cos, sin)[0]
    torch.testing.assert_close(ref.past_k[1], k, rtol=0, atol=1e-5)
    assert ref.last_evals[1] == 3 + 1 and ref.last_evals[0] == 1
    last = LoopedReference(m, cfg.with_(kv="last"))
    last.forward(PROMPT)
    assert (last.past_k[1] - k).abs().max() > 1e-3


def test_apply_first_counter():
    """D7 in the reference: prompt ubatches set the count to 0, decodes count, unset blocks."""
    m = model("llama")
    cfg = window(m).with_(apply="first", apply_n=2)
    ref = LoopedReference(m, cfg)
    assert ref.n_dec is None and not ref.loops(1) and ref.loops(2)
    ref.run(PROMPT[:11], 5)  # 5 + 5 + 1: the one-token tail counts as a decode
    assert ref.n_dec == 1
    ref.forward([5])
    assert ref.n_dec == 2 and ref.last_evals[cfg.start] == cfg.count
    ref.forward([6])
    assert ref.n_dec == 3 and ref.last_evals[cfg.start] == 1
    ref.truncate(8)
    assert ref.n_dec == 3 and ref.n_past == 8 and ref.kv_length(0) == 8
    other = LoopedReference(m, cfg).copy_from(ref)
    assert other.n_dec == 3 and other.n_past == 8
    ref.forget()
    ref.forward([7])
    assert ref.n_dec is None and ref.n_past == 9
    ref.forward([8, 9])
    assert ref.n_dec == 0
