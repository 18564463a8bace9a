"""Choose a loop window on calibration data (``loopcpp window MODEL --calibrate ...``).

The search runs centres x widths x K x methods (windows from the depth rule)
on one loaded model and ranks every configuration by the held-in mean
log-likelihood of the calibration data: for a multiple-choice task the mean
log-probability of the correct choice's continuation, for a text the mean token
log-probability. The unlooped model is measured first, on the same data, and
a configuration wins only if it scores strictly higher: when none does, the
answer is "no loop". Ties go to the cheaper configuration (fewer layer
evaluations), then to the earlier one in search order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopcpp.atomic import write_text_atomic
from loopcpp.config import LoopConfig
from loopcpp.evaluate import Advance, Evaluator, Prepared, Result
from loopcpp.window import default_width, depth_window

DEFAULT_CENTRES = (0.3, 0.4, 0.5, 0.6, 0.7)
DEFAULT_COUNTS = (2, 3)
DEFAULT_METHODS = ("euler", "rk3")


def default_widths(n_layer: int) -> list[int]:
    """The depth rule's width and twice it (within the stack)."""
    w = default_width(n_layer)
    return sorted({w, min(2 * w, n_layer)})


@dataclass(frozen=True)
class Candidate:
    centres: tuple[float, ...]  # every asked centre that gives this window
    width: int
    loop: LoopConfig


def candidates(
    n_layer: int,
    centres: Sequence[float],
    widths: Sequence[int],
    counts: Sequence[int],
    methods: Sequence[str],
    mode: str = "block",
) -> list[Candidate]:
    """Distinct loops of the search, in search order (width, centre, method, K)."""
    if not (centres and widths and counts and methods):
        raise ValueError("the search space is empty: give at least one centre, width, K, method")
    found: dict[LoopConfig, Candidate] = {}
    for width in widths:
        for centre in centres:
            start, end, _ = depth_window(n_layer, centre, width)
            for method in methods:
                for count in counts:
                    loop = LoopConfig(start, end, count=count, method=method, mode=mode)
                    if loop.is_identity():
                        continue  # the stock model, measured anyway
                    loop.check(n_layer)
                    if loop in found:
                        c = found[loop]
                        found[loop] = Candidate((*c.centres, centre), width, loop)
                    else:
                        found[loop] = Candidate((centre,), width, loop)
    return list(found.values())


@dataclass
class Row:
    candidate: Candidate
    result: Result
    delta: float  # score minus the stock model's score


@dataclass
class Calibration:
    task: str
    n_layer: int
    stock: Result
    rows: list[Row] = field(default_factory=list)  # in search order

    def ranked(self) -> list[Row]:
        order = {id(r): i for i, r in enumerate(self.rows)}
        return sorted(
            self.rows,
            key=lambda r: (-r.result.score, r.candidate.loop.layer_evals(self.n_layer),
                           order[id(r)]),
        )

    @property
    def best(self) -> Row | None:
        """The winner, or None when no loop beats the stock model on this data."""
        ranked = self.ranked()
        if ranked and ranked[0].result.score > self.stock.score:
            return ranked[0]
        return None

    @property
    def winner(self) -> LoopConfig | None:
        best = self.best
        return best.candidate.loop if best else None

    def heatmap_values(self) -> tuple[dict[tuple[float, int], float], str, int]:
        """Delta score per (centre, K) for the best (method, width); and those two."""
        ranked = self.ranked()
        if not ranked:
            return {}, "", 0
        top = (self.best or ranked[0]).candidate
        method, width = top.loop.method, top.width
        values: dict[tuple[float, int], float] = {}
        for r in self.rows:
            c = r.candidate
            if c.loop.method == method and c.width == width:
                for centre in c.centres:
                    values[(centre, c.loop.count)] = r.delta
        return values, method, width

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "task": self.task,
            "n_layer": self.n_layer,
            "ranked_by": "held-in mean log-likelihood (higher is better)",
            "stock": {"score": self.stock.score, "metrics": self.stock.metrics()},
            "winner": best.candidate.loop.to_dict() if best else None,
            "winner_delta": best.delta if best else None,
            "verdict": verdict(self),
            "ranked": [
                {
                    "loop": r.candidate.loop.to_dict(),
                    "centres": list(r.candidate.centres),
                    "width": r.candidate.width,
                    "layer_evals": r.candidate.loop.layer_evals(self.n_layer),
                    "score": r.result.score,
                    "delta": r.delta,
                    "metrics": r.result.metrics(),
                }
                for r in self.ranked()
            ],
        }

    def write_json(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        write_text_atomic(path, json.dumps({**(extra or {}), **self.to_dict()}, indent=2) + "\n")


def verdict(cal: Calibration) -> str:
    best = cal.best
    if best is None:
        top = cal.ranked()[0] if cal.rows else None
        closest = (
            f"; the closest, {top.candidate.loop.describe()}, scores {top.delta:+.4f}"
            if top else ""
        )
        return (
            f"no loop: none of the {len(cal.rows)} configurations beats the unlooped model "
            f"on this calibration data (stock {cal.stock.score:.4f}{closest})"
        )
    return (
        f"{best.candidate.loop.describe()} scores {best.result.score:.4f}, "
        f"{best.delta:+.4f} over the unlooped model ({cal.stock.score:.4f})"
    )


def calibrate(
    ev: Evaluator,
    prepared: Prepared,
    cands: Sequence[Candidate],
    advance_item: Advance | None = None,
    advance_config: Advance | None = None,
    describe: Any = None,
) -> Calibration:
    """Measure the stock model and every candidate; the evaluator's loop is restored after."""
    progress = (advance_item, advance_config, describe)
    with ev.keeping_loop():
        stock = ev.run_loop(prepared, None, "stock", *progress)
        cal = Calibration(prepared.name, ev.llm.gguf.n_layer, stock)
        for c in cands:
            label = f"[{c.loop.start},{c.loop.end}) K={c.loop.count} {c.loop.method}"
            result = ev.run_loop(prepared, c.loop, label, *progress)
            cal.rows.append(Row(c, result, result.score - stock.score))
        return cal
