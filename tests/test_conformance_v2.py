"""Conformance of LOOPING.md version 2: the patched llama.cpp against the PyTorch reference.

Tiny random f32 checkpoints of all seven families (llama, qwen2, qwen3, gemma3,
qwen3moe, olmoe, deepseek2), the window [1, 3) with K = 3, a 12-token prompt
split into ubatches of 5 (5 + 5 + 2) as llama.cpp splits it, then 16 greedy
decoded tokens, f32 KV cache, every logit compared; tolerances are version 1's
(conftest.TINY_ATOL).

The factors: the version-2 setting (``SETTINGS``: each new method at its
defaults, and each new key: anchor, step, norm interp, anchor_norm, momentum,
plus two combinations), the mode (block, layer), the kv policy (last, first,
refined), the apply policy (all, prefill, first with apply_n = 2) and, for the
MoE families, the routing (frozen, fresh).

Design (the full product is 7 x 14 x 2 x 3 x 3 x 2 loops, too slow):

* ``test_full_cross_llama``: on llama, the full cross setting x mode x kv x
  apply (uniform runs in block mode only: LOOPING.md D8), 243 loops.
* ``test_all_pairs[<family>]``: on the six other families, an all-pairs design
  (``conftest.all_pairs``, greedy, deterministic) over family x setting x mode
  x kv x apply x routing, with the constraints uniform => block and routing =
  frozen on the dense families (they ignore it): every pair of levels of any
  two factors is run at least once (so every setting on every family, with
  both modes, every kv and every apply policy). Pairs involving llama are
  covered by its full cross.
* ``test_moe_recipe``: the authors' MoE recipe (layer, euler, K = 6, anchor 0.5,
  norm interp, routing frozen, kv first, apply all) and its variants with kv
  refined, block mode and fresh routing on the three MoE families.
* ``test_apply_first_*`` and ``test_counter_*``: the per-sequence decode count of
  ``apply = first`` (D7): a one-token prompt tail, a second prompt mid-stream,
  and what ``llama_memory_seq_rm`` (all / part), ``llama_memory_seq_cp``, a state
  save/load and a run-time policy switch do to it, through llama-cpp-python,
  against the reference's ``forget`` / ``truncate`` / ``copy_from``.

llama.cpp and torch run single-threaded (see test_conformance_moe).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import (
    TINY_ATOL,
    all_pairs,
    compare_with_reference,
    llama_greedy,
    load_deterministic,
    one_torch_thread,
    require_patched,
)

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from loopcpp import LoopConfig  # noqa: E402
from loopcpp.config import APPLIES, KV_POLICIES, MODES, ROUTINGS  # noqa: E402

DENSE = ("llama", "qwen2", "qwen3", "gemma3")
MOE = ("qwen3moe", "olmoe", "deepseek2")
WINDOW = (1, 3)
COUNT = 3
N_UBATCH = 5
PROMPT_LEN = 12
N_DECODE = 16
APPLY_N = 2

#: The version-2 settings: each new method at its defaults, each new key on a method
#: that takes it, and two combinations (the authors' anchored chain with norm
#: interpolation; a Runge-Kutta method with a step, an anchor and anchor_norm).
SETTINGS: dict[str, dict] = {
    "midpoint": dict(method="midpoint"),
    "heun": dict(method="heun"),
    "rk4": dict(method="rk4"),
    "residual": dict(method="residual"),
    "input_anchor": dict(method="input_anchor"),
    "heavy_ball": dict(method="heavy_ball"),
    "norm_stab": dict(method="norm_stab"),
    "uniform": dict(method="uniform"),
    "anchor": dict(method="euler", anchor=0.5),
    "step": dict(method="euler", step=0.4),
    "norm_interp": dict(method="euler", norm="interp"),
    "anchor_norm": dict(method="rk3", anchor_norm=True),
    "momentum": dict(method="heavy_ball", momentum=0.6, step=0.5, anchor=0.25),
    "anchored_rk4": dict(method="rk4", step=0.7, anchor=0.3, anchor_norm=True),
}


def loop_of(row: dict) -> LoopConfig:
    """The LoopConfig of a design row (apply first takes apply_n = APPLY_N)."""
    apply_n = APPLY_N if row["apply"] == "first" else 0
    return LoopConfig(
        *WINDOW, count=COUNT, mode=row["mode"], kv=row["kv"], apply=row["apply"],
        apply_n=apply_n, routing=row.get("routing", "frozen"), **SETTINGS[row["setting"]],
    )


def _allowed(row: dict) -> bool:
    if SETTINGS[row["setting"]]["method"] == "uniform" and row["mode"] != "block":
        return False
    return row["arch"] in MOE or row["routing"] == "frozen"


FULL_CROSS = [
    dict(setting=s, mode=m, kv=kv, apply=ap)
    for s in SETTINGS for m in MODES for kv in KV_POLICIES for ap in APPLIES
    if _allowed(dict(setting=s, mode=m, arch="llama", routing="frozen"))
]
PAIRWISE = all_pairs(
    dict(
        arch=DENSE[1:] + MOE, setting=tuple(SETTINGS), mode=MODES, kv=KV_POLICIES,
        apply=APPLIES, routing=ROUTINGS,
    ),
    _allowed,
)

_pairs: dict[str, tuple] = {}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield
    for _, llm, _ in _pairs.values():
        llm.close()
    _pairs.clear()


def _pair(arch: str) -> tuple:
    """``(reference, stock-loaded llama, prompt)`` of a tiny family, built once per module."""
    if arch not in _pairs:
        require_patched()
        from loopcpp.reference import LoopedReference, emulate_ggml_cpu_gelu
        from loopcpp.tiny import load_hf_model, tiny_checkpoint

        hf_dir, gguf = tiny_checkpoint(arch)
        model = load_hf_model(hf_dir)
        emulate_ggml_cpu_gelu(model)  # gemma3's GELU as ggml's CPU backend computes it
        prompt = list(range(100, 100 + PROMPT_LEN))
        _pairs[arch] = (LoopedReference(model), load_deterministic(gguf, n_ubatch=N_UBATCH), prompt)
    return _pairs[arch]


def _check(arch: str, loops: list[LoopConfig]) -> dict[str, float]:
    ref, llm, prompt = _pair(arch)
    errors = {
        loop.describe(): compare_with_reference(ref, llm, prompt, loop, N_DECODE, N_UBATCH)
        for loop in loops
    }
    worst = max(errors, key=errors.get)
    print(f"{arch}: {len(errors)} loops, max abs logit error {errors[worst]:.2e} ({worst})")
    bad = {k: v for k, v in errors.items() if not v < TINY_ATOL[arch]}
    assert not bad, (
        f"{arch}: {len(bad)} of {len(errors)} loops off (atol {TINY_ATOL[arch]}), worst "
        f"{worst}: {errors[worst]:.2e}; all off: {bad}"
    )
    return errors


def test_design_covers_every_pair():
    """The pairwise design holds every allowed pair; the full cross every combination."""
    assert len(FULL_CROSS) == len(SETTINGS) * 2 * 3 * 3 - 3 * 3  # uniform in layer mode: none
    seen = {(a, repr(r[a]), b, repr(r[b])) for r in PAIRWISE for a in r for b in r if a < b}
    for arch in DENSE[1:] + MOE:
        for s in SETTINGS:
            for m in MODES:
                if _allowed(dict(arch=arch, setting=s, mode=m, routing="frozen")):
                    assert ("arch", repr(arch), "mode", repr(m)) in seen
                    assert ("mode", repr(m), "setting", repr(s)) in seen
            for kv in KV_POLICIES:
                assert ("kv", repr(kv), "setting", repr(s)) in seen
            for ap in APPLIES:
                assert ("apply", repr(ap), "setting", repr(s)) in seen
            assert ("arch", repr(arch), "setting", repr(s)) in seen
    for arch in MOE:
        for r in ROUTINGS:
            assert ("arch", repr(arch), "routing", repr(r)) in seen
    assert len(PAIRWISE) < 120, len(PAIRWISE)


def test_full_cross_llama():
    _check("llama", [loop_of(row) for row in FULL_CROSS])


@pytest.mark.parametrize("arch", DENSE[1:] + MOE)
def test_all_pairs(arch):
    _check(arch, [loop_of(row) for row in PAIRWISE if row["arch"] == arch])


#: The authors' MoE recipe (LOOPING.md v2 "paper-moe") on the tiny window, and variants.
MOE_RECIPE = LoopConfig(
    *WINDOW, count=6, mode="layer", method="euler", anchor=0.5, norm="interp",
    routing="frozen", kv="first", apply="all",
)


@pytest.mark.parametrize("arch", MOE)
def test_moe_recipe(arch):
    _check(arch, [
        MOE_RECIPE,
        MOE_RECIPE.with_(kv="refined"),
        MOE_RECIPE.with_(mode="block", anchor_norm=True),
        MOE_RECIPE.with_(routing="fresh", apply="first", apply_n=APPLY_N),
    ])


def test_every_setting_changes_the_logits():
    """No setting is a no-op in llama.cpp: each moves the logits away from its base loop."""
    ref, llm, prompt = _pair("llama")
    base = LoopConfig(*WINDOW, count=COUNT)
    bases = {
        "momentum": base.with_(method="heavy_ball", step=0.5, anchor=0.25),
        "anchor_norm": base.with_(method="rk3"),
        "anchored_rk4": base.with_(method="rk4"),
    }
    for name, setting in SETTINGS.items():
        loop = base.with_(**setting)
        llm.set_loop(bases.get(name, base))
        _, want = llama_greedy(llm, prompt, 2)
        llm.set_loop(loop)
        _, got = llama_greedy(llm, prompt, 2)
        assert np.abs(got - want).max() > 1e-3, f"{name} has no effect in llama.cpp"


# -- apply = first: the per-sequence decode count (LOOPING.md D7) ---------------------------

COUNTED = LoopConfig(*WINDOW, count=COUNT, anchor=0.5, apply="first", apply_n=APPLY_N)


def _step(ref, llm, tokens: list[int]) -> float:
    """One llama_decode of ``tokens`` (one ubatch) in both; the max abs logit error."""
    llm.eval(tokens)
    got = np.array(llm.scores[llm.n_tokens - len(tokens) : llm.n_tokens], dtype=np.float32)
    want = ref.forward(tokens).numpy()
    return float(np.abs(got - want).max())


def _start(arch: str, loop: LoopConfig = COUNTED, llm=None) -> tuple:
    """Both engines with ``loop`` and the prompt prefilled (the count is 0 after it)."""
    ref, stock_llm, prompt = _pair(arch)
    llm = llm or stock_llm
    llm.set_loop(loop)
    ref.set_loop(loop)
    ref.reset()
    llm.reset()
    llm.eval(prompt)
    ref.run(prompt, N_UBATCH)
    return ref, llm


def _step_against(ref, llm, tokens: list[int], wrong) -> float:
    """``_step``, having first checked that it can fail.

    ``wrong(other)`` puts a copy of the reference into the state a wrong count
    would give (e.g. set instead of unset); its logits must differ from the
    right ones by far more than the tolerance.
    """
    from loopcpp.reference import LoopedReference

    other = LoopedReference(ref.model, ref.loop).copy_from(ref)
    wrong(other)
    want = ref.forward(tokens)
    diff = float((other.forward(tokens) - want).abs().max())
    assert diff > 100 * TINY_ATOL["llama"], f"the check cannot fail: only {diff:.2e} apart"
    llm.eval(tokens)
    got = np.array(llm.scores[llm.n_tokens - len(tokens) : llm.n_tokens], dtype=np.float32)
    return float(np.abs(got - want.numpy()).max())


@pytest.mark.parametrize("apply_n", [1, 2, 3])
def test_apply_first_decodes(apply_n):
    """Exactly the first apply_n decodes after the prompt loop (the reference counts them)."""
    ref, llm = _start("llama", COUNTED.with_(apply_n=apply_n))
    evals = []
    for t in (5, 900, 31, 77, 1000):
        assert _step(ref, llm, [t]) < TINY_ATOL["llama"]
        evals.append(ref.last_evals[WINDOW[0]])
    assert evals == [COUNT] * apply_n + [1] * (5 - apply_n)


def test_apply_first_one_token_tail_counts_as_a_decode():
    """A prompt of 11 = 5 + 5 + 1: the one-token tail is a single-token ubatch (D7)."""
    ref, llm, _ = _pair("llama")
    prompt = list(range(200, 211))
    for loop in (COUNTED, COUNTED.with_(apply="prefill", apply_n=0)):
        err = compare_with_reference(ref, llm, prompt, loop, N_DECODE, N_UBATCH)
        assert err < TINY_ATOL["llama"], f"{loop.describe()}: {err:.2e}"
    ref.set_loop(COUNTED)
    ref.reset()
    ref.run(prompt, N_UBATCH)
    assert ref.n_dec == 1


@pytest.mark.parametrize("arch", ["llama", "qwen3moe"])
def test_apply_first_second_prompt_rearms(arch):
    """A multi-token ubatch mid-stream (a second chat turn) sets the count back to 0."""
    ref, llm = _start(arch, COUNTED.with_(apply_n=1, kv="refined"))
    for tokens in ([5], [900], [31], [7, 8, 9], [77], [1000], [3, 4], [12]):
        err = _step(ref, llm, tokens)
        assert err < TINY_ATOL[arch], f"{tokens}: {err:.2e}"


def test_counter_seq_rm_all_unsets():
    """seq_rm of all of a sequence's cells: the count is unset (no decode loops until a prompt)."""
    ref, llm = _start("llama")
    assert _step(ref, llm, [5]) < TINY_ATOL["llama"]  # loops, count 1
    llm._ctx.kv_cache_seq_rm(0, -1, -1)
    llm.n_tokens = 0
    ref.reset()
    assert _step_against(ref, llm, [42], lambda o: setattr(o, "n_dec", 1)) < TINY_ATOL["llama"]
    for tokens in ([43], [44], [45, 46], [47], [48], [49]):
        err = _step(ref, llm, tokens)
        assert err < TINY_ATOL["llama"], f"{tokens}: {err:.2e}"


def test_counter_seq_rm_part_keeps():
    """seq_rm of a sequence's tail: the count is unchanged."""
    ref, llm = _start("llama")
    assert _step(ref, llm, [5]) < TINY_ATOL["llama"]  # count 1
    keep = PROMPT_LEN - 2
    assert llm._ctx.kv_cache_seq_rm(0, keep, -1)
    llm.n_tokens = keep
    ref.truncate(keep)
    assert ref.n_dec == 1
    assert _step_against(ref, llm, [900], lambda o: o.forget()) < TINY_ATOL["llama"]  # loops
    assert _step_against(ref, llm, [31], lambda o: setattr(o, "n_dec", 0)) < TINY_ATOL["llama"]
    for tokens in ([77], [1000]):  # stock
        err = _step(ref, llm, tokens)
        assert err < TINY_ATOL["llama"], f"{tokens}: {err:.2e}"


def test_counter_seq_cp_copies(monkeypatch):
    """seq_cp(src, dst): dst takes src's count (copied 0 -> 1, 0 removed, copied back)."""
    import llama_cpp.llama_cpp as C

    from loopcpp.tiny import tiny_checkpoint

    default = C.llama_context_default_params

    def two_sequences():
        params = default()
        params.n_seq_max = 2
        params.kv_unified = True
        return params

    monkeypatch.setattr(C, "llama_context_default_params", two_sequences)
    llm = load_deterministic(tiny_checkpoint("llama")[1], n_ubatch=N_UBATCH)
    monkeypatch.undo()
    try:
        ref, llm = _start("llama", llm=llm)
        assert _step(ref, llm, [5]) < TINY_ATOL["llama"]  # count 1
        llm._ctx.kv_cache_seq_cp(0, 1, -1, -1)
        assert llm._ctx.kv_cache_seq_rm(0, -1, -1)  # seq 0: no cells, count unset
        llm._ctx.kv_cache_seq_cp(1, 0, -1, -1)  # seq 0 takes seq 1's cells and count (1)
        assert llm._ctx.kv_cache_seq_rm(1, -1, -1)
        assert _step_against(ref, llm, [900], lambda o: o.forget()) < TINY_ATOL["llama"]
        for tokens in ([31], [77]):  # stock (count 2)
            err = _step(ref, llm, tokens)
            assert err < TINY_ATOL["llama"], f"{tokens}: {err:.2e}"
    finally:
        llm.close()


def test_counter_state_load_unsets():
    """After a state load every count is unset: decodes run stock until the next prompt."""
    from loopcpp.reference import LoopedReference

    ref, llm = _start("llama")
    state = llm.save_state()
    snapshot = LoopedReference(ref.model, ref.loop).copy_from(ref)
    assert _step(ref, llm, [5]) < TINY_ATOL["llama"]  # loops, count 1
    llm.load_state(state)
    ref.copy_from(snapshot)
    ref.forget()
    assert _step_against(ref, llm, [900], lambda o: setattr(o, "n_dec", 0)) < TINY_ATOL["llama"]
    for tokens in ([31], [7, 8], [77], [1000], [12]):
        err = _step(ref, llm, tokens)
        assert err < TINY_ATOL["llama"], f"{tokens}: {err:.2e}"


def test_counter_kept_under_every_apply_policy():
    """The count runs under apply = prefill too: a run-time switch to first sees it."""
    from loopcpp import engine

    ref, llm = _start("llama", COUNTED.with_(apply="prefill", apply_n=0))
    assert _step(ref, llm, [5]) < TINY_ATOL["llama"]  # stock, count 1
    engine.set_loop(llm._ctx.ctx, llm._model.model, COUNTED)  # keeps the cache and counts
    ref.set_loop(COUNTED)
    assert ref.n_dec == 1
    assert _step_against(ref, llm, [900], lambda o: o.forget()) < TINY_ATOL["llama"]
    assert _step_against(ref, llm, [31], lambda o: setattr(o, "n_dec", 0)) < TINY_ATOL["llama"]
    assert ref.last_evals[WINDOW[0]] == 1  # the second decode after the switch ran stock
