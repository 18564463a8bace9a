"""Conformance of LOOPING.md version 2: the patched llama.cpp against the reference.

On the tiny f32 checkpoints of all seven families (each loaded once), every
version-2 setting (the new methods, step, anchor, norm interp, anchor_norm,
momentum) is run in both modes with every kv policy (refined included), the
apply policy rotating over all, prefill and first with apply_n = 2; the anchored
euler recipe also over the full kv x apply grid. The MoE families also run the
authors' MoE recipe (layer, anchor, norm interp) with frozen and fresh routing.
Prompt split into ubatches + 16 decoded tokens, f32 cache, the version-1
tolerances of test_conformance / test_conformance_moe.

Besides the reference, a few apply = first / D7 facts are checked inside
llama.cpp alone: which decode steps loop, and what seq_rm, seq_cp and a state
load do to a sequence's decode counter.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_conformance import ATOL as DENSE_ATOL  # noqa: E402
from test_conformance import N_UBATCH, PROMPT_LEN, _compare, _llama_logits  # noqa: E402

from loopcpp import LoopConfig  # noqa: E402
from loopcpp.config import APPLIES, KV_POLICIES, MODES, ROUTINGS  # noqa: E402

ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "qwen3moe", "olmoe", "deepseek2")
MOE = ("qwen3moe", "olmoe", "deepseek2")
ATOL = {**DENSE_ATOL, "olmoe": 1e-4, "deepseek2": 1e-4}
WINDOW = (1, 3)

#: The version-2 settings, each crossed with both modes and every kv policy.
SETTINGS = {
    "midpoint": dict(method="midpoint"),
    "heun": dict(method="heun"),
    "rk4": dict(method="rk4"),
    "rk4-step": dict(method="rk4", step=0.4, anchor=0.3),
    "residual": dict(method="residual"),
    "input-anchor": dict(method="input_anchor", step=0.5),
    "heavy-ball": dict(method="heavy_ball", momentum=0.5),
    "norm-stab": dict(method="norm_stab"),
    "uniform": dict(method="uniform"),
    "euler-anchor": dict(anchor=0.5),
    "euler-step": dict(step=0.5),
    "euler-interp": dict(norm="interp"),
    "euler-interp-anchor": dict(norm="interp", anchor=0.5, anchor_norm=True),
    "rk3-anchor-norm": dict(method="rk3", anchor=0.7, anchor_norm=True),
}


def _apply(i: int) -> dict:
    ap = APPLIES[i % len(APPLIES)]
    return dict(apply=ap, apply_n=2 if ap == "first" else 0)


def _configs(arch: str) -> list[LoopConfig]:
    out = []
    i = 0
    for kw in SETTINGS.values():
        for mode in MODES:
            if kw.get("method") == "uniform" and mode == "layer":
                continue
            for kv in KV_POLICIES:
                out.append(LoopConfig(*WINDOW, count=3, mode=mode, kv=kv, **kw, **_apply(i)))
                i += 1
            i += 1  # shift the apply rotation against the kv one
    # the anchored euler recipe over the full kv x apply grid, both modes
    for mode, kv, ap in itertools.product(MODES, KV_POLICIES, range(len(APPLIES))):
        out.append(LoopConfig(*WINDOW, count=3, mode=mode, kv=kv, anchor=0.5, **_apply(ap)))
    if arch in MOE:
        # the authors' MoE recipe: layer euler, anchor, norm interp, both routings
        for routing, kv in itertools.product(ROUTINGS, KV_POLICIES):
            out.append(LoopConfig(*WINDOW, count=4, mode="layer", anchor=0.5, norm="interp",
                                  routing=routing, kv=kv))
    return out


_pairs: dict[str, tuple] = {}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    for _, _, llm, _ in _pairs.values():
        llm.close()
    _pairs.clear()


def _load(gguf):
    from loopcpp.api import load

    return load(gguf, loop=False, n_ctx=64, n_batch=64, n_ubatch=N_UBATCH, logits_all=True,
                type_k=0, type_v=0, n_threads=1, n_threads_batch=1, seed=0)


def _pair(arch: str) -> tuple:
    if arch not in _pairs:
        from loopcpp.reference import LoopedReference, emulate_ggml_cpu_gelu
        from loopcpp.tiny import load_hf_model, tiny_checkpoint

        hf_dir, gguf = tiny_checkpoint(arch)
        model = load_hf_model(hf_dir)
        emulate_ggml_cpu_gelu(model)
        _pairs[arch] = (arch, LoopedReference(model), _load(gguf),
                        list(range(100, 100 + PROMPT_LEN)))
    return _pairs[arch]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_v2_setting(arch):
    arch, ref, llm, prompt = _pair(arch)
    errors = {loop.describe(): _compare(ref, llm, prompt, loop) for loop in _configs(arch)}
    worst = max(errors, key=errors.get)
    bad = {k: v for k, v in errors.items() if v >= ATOL[arch]}
    print(f"{arch}: {len(errors)} loops, max abs err {errors[worst]:.2e} ({worst})")
    assert not bad, f"{arch}: {len(bad)} of {len(errors)} off, worst {worst}: {errors[worst]:.2e}"


@pytest.mark.parametrize("arch", ("llama",))
def test_the_v2_settings_change_the_logits(arch):
    """No setting is silently ignored: each differs from its version-1 base."""
    _, _, llm, prompt = _pair(arch)
    base = LoopConfig(*WINDOW, count=3)
    llm.set_loop(base)
    _, want = _llama_logits(llm, prompt, 2)
    for kw in (dict(anchor=0.5), dict(step=0.5), dict(norm="interp"), dict(anchor_norm=True),
               dict(kv="refined"), dict(method="heavy_ball"), dict(method="rk4"),
               dict(method="uniform"), dict(method="residual")):
        llm.set_loop(base.with_(**kw))
        _, got = _llama_logits(llm, prompt, 2)
        assert np.abs(got - want).max() > 1e-3, kw


# -- apply = first and the per-sequence decode counter (D7), inside llama.cpp --------


def _decode_rows(llm, loop, prompt, n, between=None):
    """Logits of n single-token decode steps after the prompt (greedy), with an optional hook."""
    llm.set_loop(loop)
    llm.reset()
    llm.eval(prompt)
    if between:
        between(llm)
    rows = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([token])
        rows.append(np.array(llm.scores[llm.n_tokens - 1]))
    return np.array(rows)


def _same(a, b):
    return float(np.abs(a - b).max()) < 1e-6


def test_apply_first_loops_the_first_n_decode_steps():
    _, _, llm, prompt = _pair("llama")
    first = LoopConfig(*WINDOW, count=3, apply="first", apply_n=2)
    every = _decode_rows(llm, first.with_(apply="all", apply_n=0), prompt, 4)
    pre = _decode_rows(llm, first.with_(apply="prefill", apply_n=0), prompt, 4)
    got = _decode_rows(llm, first, prompt, 4)
    # steps 1 and 2 loop (as apply=all, same cache: the prompt looped in both); 3 and 4 do not
    assert _same(got[0], every[0]) and not _same(got[0], pre[0])
    # a third step's logits depend on the K/V of the looped steps, so compare with a run whose
    # first two decode steps looped too: apply=first with apply_n=3 differs from it at step 3
    got3 = _decode_rows(llm, first.with_(apply_n=3), prompt, 4)
    assert _same(got[:2], got3[:2]) and not _same(got[2], got3[2])


def test_seq_rm_of_every_cell_unsets_the_counter():
    """After reset (seq_rm of all cells) a single-token ubatch does not loop: no prompt yet."""
    _, _, llm, _ = _pair("llama")
    out = {}
    for apply, n in (("first", 2), ("prefill", 0), ("all", 0)):
        llm.set_loop(LoopConfig(*WINDOW, count=3, apply=apply, apply_n=n))
        llm.reset()
        llm.eval([100])
        out[apply] = np.array(llm.scores[0])
    assert _same(out["first"], out["prefill"]) and not _same(out["first"], out["all"])


def test_state_load_unsets_the_counter():
    _, _, llm, prompt = _pair("llama")
    loop = LoopConfig(*WINDOW, count=3, apply="first", apply_n=2)

    def reload(m):
        m.load_state(m.save_state())

    got = _decode_rows(llm, loop, prompt, 1, between=reload)
    pre = _decode_rows(llm, loop.with_(apply="prefill", apply_n=0), prompt, 1)
    looped = _decode_rows(llm, loop, prompt, 1)
    assert _same(got, pre) and not _same(looped, pre)


def test_seq_cp_copies_the_counter_and_partial_seq_rm_keeps_it():
    import llama_cpp

    _, _, llm, prompt = _pair("llama")
    loop = LoopConfig(*WINDOW, count=3, apply="first", apply_n=2)
    mem = lambda m: llama_cpp.llama_get_memory(m._ctx.ctx)  # noqa: E731

    def copy_and_back(m):
        # seq 0 -> 1 copies cells and count; dropping seq 0 entirely unsets 0; copying 1 -> 0
        # brings the count back
        llama_cpp.llama_memory_seq_cp(mem(m), 0, 1, -1, -1)
        llama_cpp.llama_memory_seq_rm(mem(m), 0, -1, -1)
        llama_cpp.llama_memory_seq_cp(mem(m), 1, 0, -1, -1)
        llama_cpp.llama_memory_seq_rm(mem(m), 1, -1, -1)

    def drop_then_copy_back(m):
        llama_cpp.llama_memory_seq_cp(mem(m), 0, 1, -1, -1)
        llama_cpp.llama_memory_seq_rm(mem(m), 1, -1, -1)  # seq 1 unset
        llama_cpp.llama_memory_seq_cp(mem(m), 1, 0, -1, -1)  # nothing to copy; 0 takes unset

    def partial_rm(m):
        # remove the last prompt token and evaluate it again as a single-token ubatch
        llama_cpp.llama_memory_seq_rm(mem(m), 0, len(prompt) - 1, -1)
        m.n_tokens -= 1
        m.eval([prompt[-1]])

    looped = _decode_rows(llm, loop, prompt, 1)
    pre = _decode_rows(llm, loop.with_(apply="prefill", apply_n=0), prompt, 1)
    assert _same(_decode_rows(llm, loop, prompt, 1, between=copy_and_back), looped)
    assert _same(_decode_rows(llm, loop, prompt, 1, between=drop_then_copy_back), pre)
    # partial removal keeps the count (0); the re-evaluated token is decode step 1, the next
    # step 2: both loop, so the next row equals a run where they loop under apply=all
    every = loop.with_(apply="all", apply_n=0)
    assert _same(_decode_rows(llm, loop, prompt, 1, between=partial_rm),
                 _decode_rows(llm, every, prompt, 1, between=partial_rm))
    assert not _same(_decode_rows(llm, loop.with_(apply_n=1), prompt, 1, between=partial_rm),
                     _decode_rows(llm, every, prompt, 1, between=partial_rm))

