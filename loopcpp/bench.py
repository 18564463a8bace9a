"""Side-by-side speed, memory and logit measurements of llama.cpp builds.

Every variant runs in its own resident process (each loads the library it is
given through ``LLAMA_CPP_LIB_PATH`` and its model once;
:mod:`loopcpp.bench_worker`), and the variants take turns round by round,
seconds apart, so every figure is measured side by side in one invocation.
This module is the orchestration (:func:`measure`, :func:`bench_loop`) and the
report (:func:`table`, :func:`targets`); the paired ratios and their intervals
are :mod:`loopcpp.bench_stats`.
Nothing here is a unit test: scripts print the numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loopcpp.bench_stats import (
    CLOCKS,
    MIN_ROUNDS,
    SPEEDS,
    Result,
    median_ratio,
    paired_ratios,
    ratio_interval,
    verdict,
)
from loopcpp.bench_worker import WEIGHTS, Variant, Worker, library_dir, worker_env
from loopcpp.config import LoopConfig

__all__ = [  # the bench's API, wherever its pieces live
    "CLOCKS", "MIN_ROUNDS", "WEIGHTS", "Result", "Variant", "Worker", "bench_loop",
    "library_dir", "loop_variants", "measure", "paired_ratios", "ratio_interval", "run_variant",
    "table", "targets", "verdict", "worker_env",
]


def run_variant(
    v: Variant,
    n_prompt: int,
    n_decode: int,
    threads: int,
    n_ctx: int | None = None,
    repeat: int = 1,
    weights: str = "hugepages",
    fresh_lib: bool = True,
) -> dict[str, Any]:
    """Load ``v`` in a fresh process, time ``repeat`` runs: the fastest, sizes, logits digest."""
    worker = Worker(v, n_prompt, n_decode, threads, n_ctx, weights=weights, fresh_lib=fresh_lib)
    try:
        runs = [worker.run() for _ in range(repeat)]
        final = worker.close()
    finally:
        worker.kill()
    best = {key: max(r[key] for r in runs) for key in SPEEDS}
    return {**best, **final, "logits_sha": _same_digest("", [r["logits_sha"] for r in runs])}


def _same_digest(known: str, digests: Sequence[str]) -> str:
    """The logits digest all runs agree on (``known``: so far, "" for none), else
    "nondeterministic"."""
    for d in digests:
        if known and known != d:
            return "nondeterministic"
        known = d
    return known


def measure(
    variants: list[Variant],
    rounds: int = 3,
    n_prompt: int = 256,
    n_decode: int = 48,
    threads: int = 2,
    progress: bool = True,
    repeat: int = 1,
    reload_every: int = 1,
    weights: str = "hugepages",
    fresh_libs: bool = True,
) -> dict[str, Result]:
    """Load every variant in its own resident process, then time them round by round.

    Rounds alternate direction (forwards, then backwards; loads too), so a
    steady drift in the machine's speed does not favour the earlier of two
    neighbours. In each round a variant runs ``repeat`` times back to back and
    the fastest counts.

    Where the weights sit in physical memory makes a process faster or slower
    for its whole life (page and cache placement; in this machine's
    memory-bound decode, up to 7 % with 4 KiB pages, 2 % with huge pages).
    So each process reads its weights into memory of its own, in transparent
    huge pages by default (``weights``: "hugepages", "read" for 4 KiB pages),
    and all processes are replaced by fresh ones every ``reload_every``
    rounds (default: every round): rounds are then independent draws of the
    placement and the paired interval is honest. Mapped files ("mmap",
    llama.cpp's default) share the page cache, placed once for as long as a
    file stays cached: two files (a model and its frankenmerge) then differ
    by a bias that no number of rounds removes. Code is always mapped, so
    with ``fresh_libs`` each process loads its own copy of its library
    folder, and two libraries (stock, patched) get the same treatment.
    """
    from loopcpp.evaluate import progress_bar  # plain lines when stderr is not a terminal

    if reload_every < 1:
        raise ValueError("reload_every must be 1 or more")
    results = {v.name: Result(v.name, weight_bytes=v.model.stat().st_size) for v in variants}
    workers: dict[str, Worker] = {}

    def close_all() -> None:
        for v in variants:
            if v.name in workers:
                final = workers.pop(v.name).close()
                r = results[v.name]
                r.state_bytes = final["state_bytes"]
                r.rss_mib = max(r.rss_mib, final["rss_mib"])
                huge = final.get("huge_mib")
                if huge is not None:
                    r.huge_mib = huge if r.huge_mib is None else min(r.huge_mib, huge)
                mapped = final.get("model_mapped")
                if mapped is not None:  # None: not known (no /proc)
                    r.model_mapped = bool(r.model_mapped) or mapped

    try:
        with progress_bar(progress) as bar:
            task = bar.add_task("benchmark", total=rounds * len(variants))
            for i in range(rounds):
                order = variants if i % 2 == 0 else variants[::-1]
                if i % reload_every == 0:
                    close_all()
                    # loaded in the round's order too: a process that allocates its
                    # memory after another can be systematically faster or slower
                    for v in order:
                        bar.update(task, description=f"loading {v.name}")
                        workers[v.name] = Worker(v, n_prompt, n_decode, threads,
                                                 weights=weights, fresh_lib=fresh_libs)
                bar.update(task, description=f"round {i + 1} of {rounds}")
                for v in order:
                    runs = [workers[v.name].run() for _ in range(repeat)]
                    r = results[v.name]
                    for key in SPEEDS:
                        getattr(r, key).append(max(run[key] for run in runs))
                    r.logits_sha = _same_digest(r.logits_sha, [run["logits_sha"] for run in runs])
                    bar.advance(task)
        close_all()
    finally:
        for w in workers.values():
            w.kill()
    return results


def table(
    results: dict[str, Result], baseline: str, layer_evals: dict[str, int | None] | None = None
) -> list[dict[str, Any]]:
    """One row per variant; time ratios are baseline speed / variant speed.

    With ``layer_evals`` (per variant), ``ideal_ratio`` is the variant's layer
    evaluations per token over the baseline's: the ratio if time were only layer work.
    """
    base = results[baseline]
    rows = []
    for r in results.values():
        ideal: dict[str, Any] = {}
        if layer_evals is not None:
            mine, theirs = layer_evals.get(r.name), layer_evals.get(baseline)
            ideal["ideal_ratio"] = round(mine / theirs, 3) if mine and theirs else None
        rows.append(
            {
                "variant": r.name,
                "prefill_tps": round(r.prefill, 1),
                "decode_tps": round(r.decode, 1),
                "prefill_ratio": round(base.prefill / r.prefill, 3),  # time ratio vs baseline
                "decode_ratio": round(base.decode / r.decode, 3),
                "prefill_cpu_ratio": round(median_ratio(base, r, "prefill_cpu"), 3),
                "decode_cpu_ratio": round(median_ratio(base, r, "decode_cpu"), 3),
                **ideal,
                "weight_mib": round(r.weight_bytes / 2**20, 1),
                "state_bytes": r.state_bytes,
                "peak_rss_mib": round(r.rss_mib, 1),
                "huge_page_mib": None if r.huge_mib is None else round(r.huge_mib, 1),
                "model_mapped": r.model_mapped,
                "logits_sha": r.logits_sha[:12],
            }
        )
    return rows


def targets(
    results: dict[str, Result], variants: Sequence[Variant], clock: str = "wall"
) -> list[dict[str, Any]]:
    """The cost targets, from the variants of :func:`loop_variants` that were measured.

    ``clock`` is "wall" (elapsed time) or "cpu" (the process's CPU time, which
    leaves out the time other processes and the hypervisor take from it).

    Each time target is a paired ratio (:func:`paired_ratios`) reported as its
    median with a 95 % interval (:func:`ratio_interval`):

    - the patched build with the loop off no slower than stock (1.0 inside the
      interval, or all of it below), prefill and decode;
    - each loop within 3 % of every frankenmerge with the same layer
      evaluations (the stock build's and the patched build's);
    - apply=prefill decode within 2 % of stock;
    - 0 extra weight and KV-state bytes for every loop.
    """
    if clock not in CLOCKS:
        raise ValueError(f"unknown clock {clock!r}: use {' or '.join(CLOCKS)}")
    rows: list[dict[str, Any]] = []
    base = "stock" if "stock" in results else "loop off"

    def ratio(name: str, a: str, b: str, phase: str, limit: float | None) -> None:
        if a not in results or b not in results:
            return
        key = phase if clock == "wall" else f"{phase}_cpu"
        paired = paired_ratios(results[a], results[b], key)
        low, mid, high = ratio_interval(paired)
        rows.append({
            "target": name, "phase": phase, "clock": clock, "rounds": len(paired),
            "ratio": round(mid, 3), "ci95": [round(low, 3), round(high, 3)],
            "limit": limit, "verdict": verdict(low, high, limit, len(paired)),
        })

    for phase in ("prefill", "decode"):
        ratio("loop off / stock: no slower", "loop off", "stock", phase, None)
    loops = [v for v in variants if v.name.startswith("K=")]
    merges = [v for v in variants if v.name.startswith("frankenmerge")]
    for v in loops:
        if v.name.endswith("apply=prefill"):
            ratio(f"{v.name} / {base}: decode within 2 %", v.name, base, "decode", 1.02)
            continue
        for fm in merges:
            if fm.layer_evals == v.layer_evals:
                for phase in ("prefill", "decode"):
                    ratio(f"{v.name} / {fm.name}: within 3 %", v.name, fm.name, phase, 1.03)
    for v in loops:
        extra_weight = results[v.name].weight_bytes - results[base].weight_bytes
        extra_state = results[v.name].state_bytes - results[base].state_bytes
        rows.append({
            "target": f"{v.name}: 0 extra weight and KV bytes", "phase": "memory",
            "extra_weight_bytes": extra_weight, "extra_state_bytes": extra_state,
            "verdict": "met" if extra_weight == extra_state == 0 else "not met",
        })
    return rows


def loop_variants(
    model: Path,
    loop: LoopConfig,
    counts: Sequence[int],
    *,
    stock_lib: Path | None,
    merge_dir: Path | None,
    log: Callable[[str], None] = lambda msg: None,
) -> list[Variant]:
    """The comparison of ``loopcpp bench``, every variant on the same weights.

    stock (the unpatched library; skipped when ``stock_lib`` is None), the
    patched library with no loop, the largest K of ``counts`` with
    apply=prefill, then ``loop`` with each K, each followed by a frankenmerge
    that stores the window as many times as the loop evaluates it
    (``LoopConfig.layer_evals``: K, 3K for rk3, K + 1 with kv=refined; skipped when
    ``merge_dir`` is None), run by the stock library and by the patched one
    (the patched one only, when ``stock_lib`` is None).
    """
    from loopcpp.frankenmerge import frankenmerge
    from loopcpp.gguf_io import read_model

    info = read_model(model)
    n = info.n_layer
    loop.check(n)
    if not counts:
        raise ValueError("give at least one loop count to benchmark (--counts 2,3,4)")
    off: dict[str, int | str] = {}
    if info.loop is not None:  # the file loops: K=1 euler computes the stock model
        off = LoopConfig(info.loop.start, info.loop.end, count=1).to_kv_overrides()
    # the order is the order of measurement: what a target compares sits side by side
    # (apply=prefill near stock, each loop next to its frankenmerges), because the
    # machine's speed drifts within a round more than between neighbouring runs
    variants = []
    if stock_lib is not None:
        variants.append(Variant("stock", stock_lib, model, layer_evals=n))
    variants.append(Variant("loop off", None, model, off, layer_evals=n))
    top = loop.with_(count=max(counts), apply="prefill")
    variants.append(
        Variant(f"K={top.count} apply=prefill", None, model, top.to_kv_overrides(),
                layer_evals=top.layer_evals(n))
    )
    if merge_dir is not None:
        merge_dir.mkdir(parents=True, exist_ok=True)
    for k in counts:
        cfg = loop.with_(count=k)
        variants.append(
            Variant(f"K={k}", None, model, cfg.to_kv_overrides(), layer_evals=cfg.layer_evals(n))
        )
        # the window stored as often as the loop evaluates it (K x evaluations per step,
        # one more for kv=refined's pass): the same layer evaluations in the stock graph
        extra = cfg.layer_evals(n) - n
        copies = 1 + extra // loop.width
        if merge_dir is None or copies == 1 or extra % loop.width:
            continue  # no frankenmerges asked for; one copy, the stock model; or none fits
        merged = merge_dir / f"{model.stem}.fm{loop.start}-{loop.end}x{copies}.gguf"
        if not merged.exists():
            log(f"writing the frankenmerge {merged.name}")
            frankenmerge(model, merged, loop.start, loop.end, copies)
        evals = n + (copies - 1) * loop.width
        if stock_lib is not None:
            variants.append(Variant(f"frankenmerge x{copies}", stock_lib, merged,
                                    layer_evals=evals))
        # the same file on the patched build (no loop keys: the stock graph), so the
        # loop's own cost is measured against one binary
        variants.append(Variant(f"frankenmerge x{copies} (patched build)", None, merged,
                                layer_evals=evals))
    return variants


def bench_loop(
    model: Path,
    loop: LoopConfig,
    counts: Sequence[int],
    *,
    rounds: int = 3,
    n_prompt: int = 256,
    n_decode: int = 48,
    threads: int = 2,
    repeat: int = 1,
    reload_every: int = 1,
    weights: str = "hugepages",
    fresh_libs: bool = True,
    clock: str = "wall",
    stock: bool = True,
    frankenmerges: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Measure :func:`loop_variants` side by side.

    The report: rows against the first variant (medians) and :func:`targets`
    (paired ratios).
    """
    from loopcpp import build

    if min(rounds, n_prompt, n_decode, repeat) < 1:
        raise ValueError("rounds, repeat, prompt and decode lengths must be 1 or more")
    stock_lib = build.stock_lib() if stock else None
    merge_dir = build.cache_dir() / "bench" if frankenmerges else None
    variants = loop_variants(
        model, loop, counts, stock_lib=stock_lib, merge_dir=merge_dir, log=log
    )
    results = measure(variants, rounds=rounds, n_prompt=n_prompt, n_decode=n_decode,
                      threads=threads, progress=progress, repeat=repeat,
                      reload_every=reload_every, weights=weights, fresh_libs=fresh_libs)
    baseline = variants[0].name
    rows = table(results, baseline, {v.name: v.layer_evals for v in variants})
    base = results[baseline]
    for row, v in zip(rows, variants, strict=True):
        r = results[v.name]
        row["extra_weight_bytes"] = r.weight_bytes - base.weight_bytes
        row["extra_state_bytes"] = r.state_bytes - base.state_bytes
    return {
        "model": str(model),
        "loop": loop.to_dict(),
        "baseline": baseline,
        "rounds": rounds,
        "repeat": repeat,
        "reload_every": reload_every,
        "weights": weights,
        "fresh_libs": fresh_libs,
        "prompt_tokens": n_prompt,
        "decode_tokens": n_decode,
        "threads": threads,
        "rows": rows,
        "clock": clock,
        "targets": targets(results, variants, clock),
        # every run's tokens per second, round by round, to recompute any ratio
        "runs": {
            r.name: {key: [round(x, 3) for x in getattr(r, key)] for key in SPEEDS}
            for r in results.values()
        },
    }


