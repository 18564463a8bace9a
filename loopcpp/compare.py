"""Paired comparison of two ``loopcpp eval --json`` results on the same questions.

Two accuracies measured on the same few hundred questions differ by a few
points by chance. Pairing them question by question is sharper: only the
questions one model gets right and the other wrong carry information, and the
exact two-sided sign test (McNemar's exact test) on those says how surprising
the split is if neither model were better. The mean log-probability of the
right answer is compared per question too (difference and its standard error).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class CompareError(ValueError):
    """Two result files that cannot be compared; the message names the fix."""


@dataclass(frozen=True)
class EvalRun:
    """One ``loopcpp eval --json`` file: what ran, and every question's scores."""

    path: Path
    task: str
    label: str
    items: dict[str, dict[str, Any]]  # id -> {"gold", "pred", "pred_norm", "logprobs"}


def sign_test(gained: int, lost: int) -> float:
    """Exact two-sided p-value of a ``gained`` / ``lost`` split under p = 1/2."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2**n
    return min(1.0, 2 * tail)


def load_run(path: Path) -> EvalRun:
    """Read an eval JSON, refusing files that are not one (with what to run instead)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CompareError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompareError(f"{path} is not JSON ({e}); give files written by "
                           "`loopcpp eval ... --json FILE`") from None
    if not isinstance(data, dict) or "task" not in data:
        raise CompareError(f"{path} is not a `loopcpp eval --json` result")
    if "items" not in data:
        raise CompareError(
            f"{path} has no per-question items ({data['task']}: perplexity results are not "
            "paired by question); compare their ppl values directly")
    loop = data.get("loop")
    if loop:
        label = (f"[{loop['start']}, {loop['end']}) K={loop['count']} {loop['method']}"
                 + ("" if loop.get("mode", "block") == "block" else f" {loop['mode']}"))
    else:
        label = "no loop"
    items = {it["id"]: it for it in data["items"]}
    return EvalRun(Path(path), data["task"], label, items)


def paired(base: EvalRun, other: EvalRun) -> dict[str, Any]:
    """``other`` against ``base``, question by question."""
    if base.task != other.task:
        raise CompareError(f"{base.path} is {base.task} but {other.path} is {other.task}: "
                           "compare results of the same --task")
    if base.items.keys() != other.items.keys():
        only = len(base.items.keys() - other.items.keys()) + len(
            other.items.keys() - base.items.keys())
        raise CompareError(f"{base.path} and {other.path} scored different questions "
                           f"({only} not in both): run both with the same --task and --limit")
    ids = list(base.items)
    out: dict[str, Any] = {"task": base.task, "n": len(ids), "base": base.label,
                           "other": other.label}
    for key, pred in (("acc", "pred"), ("acc_norm", "pred_norm")):
        right_a = [base.items[i][pred] == base.items[i]["gold"] for i in ids]
        right_b = [other.items[i][pred] == other.items[i]["gold"] for i in ids]
        gained = sum(b and not a for a, b in zip(right_a, right_b, strict=True))
        lost = sum(a and not b for a, b in zip(right_a, right_b, strict=True))
        out[key] = {
            "base": sum(right_a) / len(ids), "other": sum(right_b) / len(ids),
            "gained": gained, "lost": lost, "p": sign_test(gained, lost),
        }
    diffs = []
    for i in ids:
        a, b = base.items[i], other.items[i]
        if a["gold"] != b["gold"]:
            raise CompareError(f"question {i} has a different answer key in {base.path} and "
                               f"{other.path}: the files come from different data")
        diffs.append(b["logprobs"][b["gold"]] - a["logprobs"][a["gold"]])
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) if len(diffs) > 1 else 0.0
    out["gold_logprob"] = {
        "base": sum(base.items[i]["logprobs"][base.items[i]["gold"]] for i in ids) / len(ids),
        "other": sum(other.items[i]["logprobs"][other.items[i]["gold"]] for i in ids) / len(ids),
        "delta": mean,
        "delta_stderr": math.sqrt(var / len(diffs)),
        "higher": sum(d > 0 for d in diffs),
        "lower": sum(d < 0 for d in diffs),
    }
    return out


# --------------------------------------------------------------------------- suites

#: The normal quantile of a two-sided 95 % interval.
Z95 = 1.959963984540054


def paired_delta(base: EvalRun, other: EvalRun, metric: str = "acc") -> dict[str, Any]:
    """``other - base`` accuracy on the same questions, with a paired 95 % interval.

    ``delta`` is (gained - lost) / n, the mean of the per-question differences
    right(other) - right(base). Its interval is Agresti and Min's (2005) for a
    paired difference of proportions: half a question added to each cell of
    the 2 x 2 table, d' = (gained - lost) / (n + 2),
    se = sqrt(((gained + lost + 1) / (n + 2) - d'^2) / (n + 2)), d' ± 1.96 se.
    Unlike the plain Wald interval it is not of zero width when no question
    changed. ``gained``/``lost`` and the sign-test ``p`` are those of :func:`paired`.
    """
    if metric not in ("acc", "acc_norm"):
        raise CompareError(f"metric {metric!r}: use acc or acc_norm")
    pair = paired(base, other)
    m = pair[metric]
    n, gained, lost = pair["n"], m["gained"], m["lost"]
    adj = (gained - lost) / (n + 2)
    se = math.sqrt(max(0.0, ((gained + lost + 1) / (n + 2) - adj**2) / (n + 2)))
    return {
        "task": base.task, "n": n, "base": m["base"], "other": m["other"],
        "delta": (gained - lost) / n, "delta_stderr": se,
        "ci95": [adj - Z95 * se, adj + Z95 * se],
        "gained": gained, "lost": lost, "p": m["p"],
        "gold_logprob_delta": pair["gold_logprob"]["delta"],
        "gold_logprob_delta_stderr": pair["gold_logprob"]["delta_stderr"],
    }


def suite_delta(
    base: dict[str, EvalRun], other: dict[str, EvalRun], metric: str = "acc"
) -> dict[str, Any]:
    """Per-task paired deltas of ``other`` against ``base`` and their mean over the tasks.

    ``base`` and ``other`` map task names to runs of the same questions. The
    mean delta is the unweighted mean of the per-task deltas (each task
    counts once, as a macro average); the tasks' questions are disjoint, so
    its standard error is sqrt(sum of the per-task variances) / tasks, and
    its interval the mean ± 1.96 of those.
    """
    if base.keys() != other.keys():
        only = sorted(base.keys() ^ other.keys())
        raise CompareError(f"the two suites hold different tasks ({', '.join(only)} not in "
                           "both): finish both runs, or compare the tasks both have")
    if not base:
        raise CompareError("no tasks to compare: the folders hold no eval JSON files")
    tasks = [paired_delta(base[t], other[t], metric) for t in sorted(base)]
    k = len(tasks)
    mean = sum(t["delta"] for t in tasks) / k
    se = math.sqrt(sum(t["delta_stderr"] ** 2 for t in tasks)) / k
    gained = sum(t["gained"] for t in tasks)
    lost = sum(t["lost"] for t in tasks)
    return {
        "metric": metric, "tasks": tasks,
        "mean": {
            "n_tasks": k, "n_questions": sum(t["n"] for t in tasks),
            "base": sum(t["base"] for t in tasks) / k,
            "other": sum(t["other"] for t in tasks) / k,
            "delta": mean, "delta_stderr": se, "ci95": [mean - Z95 * se, mean + Z95 * se],
            "gained": gained, "lost": lost, "p": sign_test(gained, lost),
        },
    }


def load_suite(folder: Path) -> dict[str, EvalRun]:
    """The eval JSON files of one suite run (``eval --suite --out FOLDER``), by task."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CompareError(f"{folder} is not a folder of `loopcpp eval --suite` results")
    runs = {}
    for path in sorted(folder.glob("*.json")):
        run = load_run(path)
        if run.task in runs:
            raise CompareError(f"{folder} holds two results for {run.task}: keep one")
        runs[run.task] = run
    return runs


def suite_table(root: Path, base: str = "stock", metric: str = "acc") -> dict[str, Any]:
    """Every ``ROOT/<model>/<config>/`` against ``ROOT/<model>/<base>/``.

    Returns ``{"base", "metric", "models": {model: {config: suite_delta}}}``;
    a model without a ``base`` folder is an error, tasks missing from either
    side are left out of that comparison (and listed under ``missing``).
    """
    root = Path(root)
    if not root.is_dir():
        raise CompareError(f"{root} is not a folder: give the ROOT of ROOT/<model>/<config>/")
    models: dict[str, Any] = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        configs = sorted(p for p in model_dir.iterdir() if p.is_dir() and p.name != base)
        if not configs:
            continue
        base_dir = model_dir / base
        if not base_dir.is_dir():
            raise CompareError(f"{model_dir} has no {base}/ folder to compare against: run "
                               f"the base configuration or pick another with --base")
        base_runs = load_suite(base_dir)
        out = {}
        for cfg in configs:
            other = load_suite(cfg)
            common = base_runs.keys() & other.keys()
            if not common:
                continue
            result = suite_delta({t: base_runs[t] for t in common},
                                 {t: other[t] for t in common}, metric)
            result["missing"] = sorted(base_runs.keys() ^ other.keys())
            result["label"] = next(iter(other.values())).label
            out[cfg.name] = result
        if out:
            models[model_dir.name] = out
    if not models:
        raise CompareError(f"{root} holds no ROOT/<model>/<config>/ folders beside a {base}/ "
                           "folder: run `loopcpp eval --suite ... --out ROOT/MODEL/CONFIG`")
    return {"base": base, "metric": metric, "models": models}
