"""PNG figures of sweeps, calibrations and benchmarks (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loopcpp.evaluate import metric_value
from loopcpp.sweep import SweepResult

_METHOD_STYLE = {"naive": ("tab:red", "o"), "euler": ("tab:blue", "s"), "rk3": ("tab:green", "^")}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    """Save whole or not at all."""
    from loopcpp.atomic import atomic_output

    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    return path


def _label(metric: str) -> str:
    return {"acc": "accuracy", "acc_norm": "accuracy (length-normalised)",
            "logprob": "mean log-likelihood", "ppl": "perplexity"}.get(metric, metric)


def main_centre(centres: Sequence[float]) -> float:
    """The centre a metric-vs-K figure shows: the one nearest half depth."""
    return min(centres, key=lambda c: (abs(c - 0.5), c))


def metric_vs_k(sweep: SweepResult, metric: str, path: Path, title: str) -> Path:
    """The paper's Figure 3: the metric against K per method, the stock model as a line."""
    plt = _pyplot()
    centre = main_centre(sorted({r.point.centre for r in sweep.runs}))
    modes = sorted({r.point.loop.mode for r in sweep.runs})
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
    stock = metric_value(sweep.stock, metric)
    for ax, mode in zip(axes[0], modes, strict=True):
        runs = [r for r in sweep.runs if r.point.centre == centre and r.point.loop.mode == mode]
        window = ""
        for method in sorted({r.point.loop.method for r in runs}, key=list(_METHOD_STYLE).index):
            pts = sorted((r.point.loop.count, metric_value(r.result, metric))
                         for r in runs if r.point.loop.method == method)
            color, marker = _METHOD_STYLE.get(method, ("black", "x"))
            ax.plot([k for k, _ in pts], [v for _, v in pts], marker=marker, color=color,
                    label=method)
            window = f"[{runs[0].point.loop.start}, {runs[0].point.loop.end})"
        ax.axhline(stock, color="gray", linestyle="--", label="stock")
        ax.set_xlabel("loop count K")
        ax.set_ylabel(_label(metric))
        ax.set_xticks(sorted({r.point.loop.count for r in runs}))
        ax.set_title(f"{mode} mode, window {window} (centre {centre:g})")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return _save(fig, path)


def metric_vs_centre(sweep: SweepResult, metric: str, path: Path, title: str) -> Path:
    """The metric against the window centre, one line per method and K (first mode)."""
    plt = _pyplot()
    mode = sorted({r.point.loop.mode for r in sweep.runs})[0]
    runs = [r for r in sweep.runs if r.point.loop.mode == mode and not r.point.loop.is_identity()]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    counts = sorted({r.point.loop.count for r in runs})
    styles = ["-", "--", ":", "-."]
    for method in sorted({r.point.loop.method for r in runs}, key=list(_METHOD_STYLE).index):
        color, marker = _METHOD_STYLE.get(method, ("black", "x"))
        for i, k in enumerate(counts):
            pts = sorted((r.point.centre, metric_value(r.result, metric)) for r in runs
                         if r.point.loop.method == method and r.point.loop.count == k)
            if pts:
                ax.plot([c for c, _ in pts], [v for _, v in pts], marker=marker, color=color,
                        linestyle=styles[i % len(styles)], label=f"{method} K={k}")
    ax.axhline(metric_value(sweep.stock, metric), color="gray", linestyle="--", label="stock")
    ax.set_xlabel("window centre (fraction of depth)")
    ax.set_ylabel(_label(metric))
    ax.set_title(f"{title} ({mode} mode)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    return _save(fig, path)


def heatmap(
    values: dict[tuple[float, int], float],
    path: Path,
    title: str,
    xlabel: str = "loop count K",
    ylabel: str = "window centre (fraction of depth)",
    colorbar: str = "mean log-likelihood minus stock",
) -> Path:
    """A centre x K grid of values (missing cells blank), diverging around 0."""
    import numpy as np

    plt = _pyplot()
    centres = sorted({c for c, _ in values})
    counts = sorted({k for _, k in values})
    grid = np.full((len(centres), len(counts)), np.nan)
    for (c, k), v in values.items():
        grid[centres.index(c), counts.index(k)] = v
    span = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
    fig, ax = plt.subplots(figsize=(1.2 * len(counts) + 3, 0.6 * len(centres) + 2))
    im = ax.imshow(grid, cmap="RdBu", vmin=-span or -1, vmax=span or 1, aspect="auto",
                   origin="lower")
    ax.set_xticks(range(len(counts)), [str(k) for k in counts])
    ax.set_yticks(range(len(centres)), [f"{c:g}" for c in centres])
    for i in range(len(centres)):
        for j in range(len(counts)):
            if np.isfinite(grid[i, j]):
                dark = abs(grid[i, j]) > 0.6 * span
                ax.text(j, i, f"{grid[i, j]:+.3f}", ha="center", va="center", fontsize=8,
                        color="white" if dark else "black")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=colorbar)
    return _save(fig, path)


def bench_ratios(rows: list[dict[str, Any]], path: Path, clock: str, title: str) -> Path:
    """Time ratios against the stock model per variant (prefill, decode, and the ideal).

    ``clock``: "wall" plots the elapsed-time ratios, "cpu" the CPU-time ones.
    """
    import numpy as np

    plt = _pyplot()
    names = [r["variant"] for r in rows]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names)), 4))
    key = "" if clock == "wall" else "_cpu"
    ax.bar(x - 0.2, [r[f"prefill{key}_ratio"] for r in rows], 0.4,
           label=f"prefill {clock} time / stock")
    ax.bar(x + 0.2, [r[f"decode{key}_ratio"] for r in rows], 0.4,
           label=f"decode {clock} time / stock")
    ideal = [r.get("ideal_ratio") for r in rows]
    if any(v is not None for v in ideal):
        ax.scatter(x, [np.nan if v is None else v for v in ideal], color="black", marker="_",
                   s=400, zorder=3, label="layer evaluations / stock")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("time ratio vs stock (lower is faster)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


_CONFIG_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def suite_deltas(table: dict[str, Any], path: Path, title: str) -> Path:
    """The paper's Figure 1: per-task accuracy change against the base, one panel per model.

    ``table`` is :func:`loopcpp.compare.suite_table`'s result. Bars are the
    paired deltas in percentage points with their 95 % intervals; the last
    group is the mean over the suite.
    """
    import numpy as np

    plt = _pyplot()
    models = list(table["models"])
    fig, axes = plt.subplots(len(models), 1, figsize=(12, 3.2 * len(models)), squeeze=False)
    for ax, model in zip(axes[:, 0], models, strict=True):
        configs = table["models"][model]
        tasks = sorted({t["task"] for c in configs.values() for t in c["tasks"]})
        labels = [*tasks, "mean"]
        x = np.arange(len(labels))
        width = 0.8 / len(configs)
        for j, (name, res) in enumerate(configs.items()):
            by_task = {t["task"]: t for t in res["tasks"]}
            rows = [by_task.get(t) for t in tasks] + [res["mean"]]
            delta = np.array([np.nan if r is None else 100 * r["delta"] for r in rows])
            low = np.array([np.nan if r is None else 100 * (r["delta"] - r["ci95"][0])
                            for r in rows])
            high = np.array([np.nan if r is None else 100 * (r["ci95"][1] - r["delta"])
                             for r in rows])
            ax.bar(x + (j - (len(configs) - 1) / 2) * width, delta, width,
                   yerr=[low, high], capsize=2, color=_CONFIG_COLORS[j % len(_CONFIG_COLORS)],
                   label=f"{name}: {res['label']}")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.axvline(len(tasks) - 0.5, color="gray", linestyle=":", linewidth=0.8)
        ax.set_xticks(x, [t.replace("mmlu_", "mmlu:\n") for t in labels], rotation=45,
                      ha="right", fontsize=8)
        n = sorted({t["n"] for c in configs.values() for t in c["tasks"]})
        per_task = f"{n[0]}" if len(n) == 1 else f"{n[0]}-{n[-1]}"
        ax.set_ylabel(f"{table['metric']} change (points)")
        ax.set_title(f"{model} vs {table['base']} ({per_task} questions per task, 95 % "
                     "paired intervals)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
