"""A grid of loops evaluated on one loaded model (``loopcpp sweep``).

The grid is counts x methods x modes x window centres (each centre becomes a
window through the depth rule, :func:`loopcpp.window.depth_window`). The stock
model runs first; every configuration is then set on the same context with
:meth:`loopcpp.evaluate.Evaluator.set_loop` (no reload), the task's tokens are
prepared once. Configurations that compute exactly the stock model (K = 1 with
naive or euler) reuse its result, and centres that round to the same window are
evaluated once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopcpp.atomic import write_text_atomic
from loopcpp.config import LoopConfig
from loopcpp.evaluate import Advance, Evaluator, Prepared, Result, metric_value
from loopcpp.window import depth_window


@dataclass(frozen=True)
class Point:
    """One grid point: the settings asked for and the loop they give."""

    centre: float
    loop: LoopConfig


def grid(
    n_layer: int,
    counts: Sequence[int],
    methods: Sequence[str],
    modes: Sequence[str],
    centres: Sequence[float],
    width: int | None = None,
    **options: Any,
) -> list[Point]:
    """Every combination, in the order centre, mode, method, count."""
    if not (counts and methods and modes and centres):
        raise ValueError("the sweep grid is empty: give at least one count, method, mode, centre")
    points = []
    for centre in centres:
        start, end, _ = depth_window(n_layer, centre, width)
        for mode in modes:
            for method in methods:
                for count in counts:
                    loop = LoopConfig(start, end, count=count, mode=mode, method=method, **options)
                    points.append(Point(centre, loop.check(n_layer)))
    return points


@dataclass
class Run:
    point: Point
    result: Result
    reused: str = ""  # "stock" or the centre whose identical window was evaluated


@dataclass
class SweepResult:
    task: str
    n_layer: int
    stock: Result
    runs: list[Run] = field(default_factory=list)

    def to_dict(self, metric: str) -> dict[str, Any]:
        return {
            "task": self.task,
            "n_layer": self.n_layer,
            "metric": metric,
            "stock": self.stock.metrics(),
            "runs": [
                {
                    "centre": r.point.centre,
                    "loop": r.point.loop.to_dict(),
                    "layer_evals": r.point.loop.layer_evals(self.n_layer),
                    "reused": r.reused or None,
                    metric: metric_value(r.result, metric),
                    "metrics": r.result.metrics(),
                }
                for r in self.runs
            ],
        }

    def write_json(self, path: Path, metric: str, extra: dict[str, Any] | None = None) -> None:
        data = {**(extra or {}), **self.to_dict(metric)}
        write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def run_sweep(
    ev: Evaluator,
    prepared: Prepared,
    points: Sequence[Point],
    advance_item: Advance | None = None,
    advance_config: Advance | None = None,
    describe: Any = None,
) -> SweepResult:
    """Evaluate the stock model, then every point; the evaluator's loop is restored after."""
    with ev.keeping_loop():
        stock = ev.run_loop(prepared, None, "stock", advance_item, advance_config, describe)
        out = SweepResult(prepared.name, ev.llm.gguf.n_layer, stock)
        done: dict[LoopConfig, tuple[Result, float]] = {}
        for p in points:
            if p.loop.is_identity():
                out.runs.append(Run(p, stock, "stock"))
            elif p.loop in done:
                result, centre = done[p.loop]
                out.runs.append(Run(p, result, f"centre {centre:g}"))
            else:
                label = (f"K={p.loop.count} {p.loop.method}/{p.loop.mode} "
                         f"[{p.loop.start},{p.loop.end})")
                result = ev.run_loop(prepared, p.loop, label, advance_item, None, describe)
                done[p.loop] = (result, p.centre)
                out.runs.append(Run(p, result))
            if advance_config:
                advance_config(1)
        return out


def n_evaluations(points: Sequence[Point]) -> int:
    """How many task runs a sweep takes (stock included)."""
    unique = {p.loop for p in points if not p.loop.is_identity()}
    return 1 + len(unique)
