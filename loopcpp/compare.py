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
