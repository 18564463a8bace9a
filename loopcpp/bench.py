"""Side-by-side speed, memory and logit measurements of llama.cpp builds.

Every variant runs in its own subprocess (a fresh process per run, so each
loads the library it is given through ``LLAMA_CPP_LIB_PATH``), variants are
interleaved round by round, and ratios are taken between medians measured in
the same invocation. Inside a run the prompt and the decode are timed
``repeat`` times and the fastest counts (timing noise only ever adds time).
Target ratios are *paired*: taken round by round between runs that sat next
to each other, so slow drifts in machine load cancel, and reported as their
geometric mean with a 95 % interval, which narrows as rounds are added.
Nothing here is a unit test: scripts print the numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loopcpp.config import LoopConfig


@dataclass
class Variant:
    """One thing to measure: a library, a model file and kv overrides."""

    name: str
    lib: Path | None  # None: the installed llama-cpp-python's own library
    model: Path
    overrides: dict[str, int | str] = field(default_factory=dict)
    layer_evals: int | None = None  # per token, for the ideal time ratio (None: unknown)


@dataclass
class Result:
    name: str
    prefill_tps: list[float] = field(default_factory=list)  # tokens per wall-clock second
    decode_tps: list[float] = field(default_factory=list)
    prefill_cpu_tps: list[float] = field(default_factory=list)  # per CPU second of the process
    decode_cpu_tps: list[float] = field(default_factory=list)
    state_bytes: int = 0
    rss_mib: float = 0.0
    logits_sha: str = ""
    weight_bytes: int = 0

    @property
    def prefill(self) -> float:
        return statistics.median(self.prefill_tps)

    @property
    def decode(self) -> float:
        return statistics.median(self.decode_tps)


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs inside the subprocess: load, prefill, greedy decode, report."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(
        spec["model"],
        n_ctx=spec["n_ctx"],
        n_batch=spec["n_prompt"],
        n_ubatch=spec["n_prompt"],
        n_threads=spec["threads"],
        n_threads_batch=spec["threads"],
        verbose=False,
        seed=0,
        kv_overrides=spec["overrides"] or None,
        logits_all=False,
    )
    vocab = llm.n_vocab()
    prompt = [(7 * i + 11) % (vocab - 100) + 50 for i in range(spec["n_prompt"])]
    llm.eval(prompt[:8])  # warm up

    def last_logits() -> np.ndarray:
        # llama-cpp-python keeps no scores without logits_all: read llama_get_logits
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,)).copy()

    prefill_s, decode_s, prefill_cpu, decode_cpu, digests = [], [], [], [], set()
    for _ in range(spec.get("repeat", 1)):
        llm.reset()
        digest = hashlib.sha256()
        c0, t0 = time.process_time(), time.perf_counter()
        llm.eval(prompt)
        t1, c1 = time.perf_counter(), time.process_time()
        logits = last_logits()
        digest.update(logits.tobytes())
        # the decode clock leaves out the logits copy of the prompt's last token
        c2, t2 = time.process_time(), time.perf_counter()
        for _ in range(spec["n_decode"]):
            token = int(np.argmax(logits))
            llm.eval([token])
            logits = last_logits()
            digest.update(logits.tobytes())
        t3, c3 = time.perf_counter(), time.process_time()
        prefill_s.append(t1 - t0)
        decode_s.append(t3 - t2)
        prefill_cpu.append(c1 - c0)
        decode_cpu.append(c3 - c2)
        digests.add(digest.hexdigest())
    import llama_cpp

    state = int(llama_cpp.llama_state_get_size(llm._ctx.ctx))
    return {
        "prefill_tps": spec["n_prompt"] / min(prefill_s),
        "decode_tps": spec["n_decode"] / min(decode_s),
        "prefill_cpu_tps": spec["n_prompt"] / min(prefill_cpu),
        "decode_cpu_tps": spec["n_decode"] / min(decode_cpu),
        "state_bytes": state,
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "logits_sha": digests.pop() if len(digests) == 1 else "nondeterministic",
    }


def run_variant(
    v: Variant,
    n_prompt: int,
    n_decode: int,
    threads: int,
    n_ctx: int | None = None,
    repeat: int = 1,
) -> dict[str, Any]:
    if n_ctx is None:
        n_ctx = max(512, n_prompt + n_decode + 8)
    spec = {
        "model": str(v.model),
        "overrides": v.overrides,
        "n_prompt": n_prompt,
        "n_decode": n_decode,
        "threads": threads,
        "n_ctx": n_ctx,
        "repeat": repeat,
    }
    env = dict(os.environ)
    env.pop("LLAMA_CPP_LIB_PATH", None)
    if v.lib is not None:
        env["LLAMA_CPP_LIB_PATH"] = str(v.lib)
    proc = subprocess.run(
        [sys.executable, "-m", "loopcpp.bench", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark of {v.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(
    variants: list[Variant],
    rounds: int = 3,
    n_prompt: int = 256,
    n_decode: int = 48,
    threads: int = 2,
    progress: bool = True,
    repeat: int = 1,
) -> dict[str, Result]:
    """Interleave the variants for ``rounds`` rounds (forwards, then backwards); medians.

    Each run times the prompt and the decode ``repeat`` times and keeps the fastest.
    """
    from rich.progress import Progress

    results = {v.name: Result(v.name, weight_bytes=v.model.stat().st_size) for v in variants}
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("benchmark", total=rounds * len(variants))
        for i in range(rounds):
            # every other round runs backwards, so a steady drift in the machine's
            # speed does not always favour the earlier of two neighbours
            for v in variants if i % 2 == 0 else variants[::-1]:
                bar.update(task, description=f"benchmark {v.name}")
                out = run_variant(v, n_prompt, n_decode, threads, repeat=repeat)
                r = results[v.name]
                for key in ("prefill_tps", "decode_tps", "prefill_cpu_tps", "decode_cpu_tps"):
                    getattr(r, key).append(out[key])
                r.state_bytes = out["state_bytes"]
                r.rss_mib = max(r.rss_mib, out["rss_mib"])
                if r.logits_sha and r.logits_sha != out["logits_sha"]:
                    r.logits_sha = "nondeterministic"
                elif not r.logits_sha:
                    r.logits_sha = out["logits_sha"]
                bar.advance(task)
    return results


def _median_ratio(base: Result, r: Result, phase: str) -> float:
    """Time ratio r / base from the medians of ``phase`` (prefill, decode, *_cpu)."""
    return statistics.median(getattr(base, f"{phase}_tps")) / statistics.median(
        getattr(r, f"{phase}_tps")
    )


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
                "prefill_cpu_ratio": round(_median_ratio(base, r, "prefill_cpu"), 3),
                "decode_cpu_ratio": round(_median_ratio(base, r, "decode_cpu"), 3),
                **ideal,
                "weight_mib": round(r.weight_bytes / 2**20, 1),
                "state_bytes": r.state_bytes,
                "peak_rss_mib": round(r.rss_mib, 1),
                "logits_sha": r.logits_sha[:12],
            }
        )
    return rows


CLOCKS = ("wall", "cpu")


def paired_ratios(a: Result, b: Result, phase: str) -> list[float]:
    """Round-by-round time ratios of ``a`` over ``b`` for ``phase``.

    ``phase``: prefill or decode (wall clock), prefill_cpu or decode_cpu (CPU time).
    """
    speed_a, speed_b = getattr(a, f"{phase}_tps"), getattr(b, f"{phase}_tps")
    return [vb / va for va, vb in zip(speed_a, speed_b, strict=True)]


# two-sided 95 % quantiles of Student's t by degrees of freedom (1.96 beyond 30)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131,
         16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}


def ratio_interval(ratios: Sequence[float]) -> tuple[float, float, float]:
    """(low, estimate, high): the geometric mean of ``ratios`` with its 95 % interval.

    Ratios are averaged as logarithms (a ratio and its inverse weigh the same)
    with a Student-t interval, which narrows as rounds are added. One ratio
    has no interval: (r, r, r) is refused as evidence by :func:`verdict`.
    """
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), math.exp(mean), math.exp(mean)
    df = len(logs) - 1
    t = _T975.get(df) or (_T975[max(k for k in _T975 if k <= df)] if df < 30 else 1.96)
    half = t * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean - half), math.exp(mean), math.exp(mean + half)


def verdict(low: float, high: float, limit: float | None, n: int = 2) -> str:
    """met: the whole interval is at or below ``limit``; not met: all of it above;
    else "inside the noise". Without a limit the target is "no difference from
    1": met when 1.0 lies inside the interval. One round (n < 2) proves nothing.
    """
    if n < 2:
        return "inside the noise"
    if limit is None:
        return "met" if low <= 1.0 <= high else "not met"
    if high <= limit:
        return "met"
    return "not met" if low > limit else "inside the noise"


def targets(
    results: dict[str, Result], variants: Sequence[Variant], clock: str = "wall"
) -> list[dict[str, Any]]:
    """The cost targets, from the variants of :func:`loop_variants` that were measured.

    ``clock`` is "wall" (elapsed time) or "cpu" (the process's CPU time, which
    leaves out the time other processes and the hypervisor take from it).

    Each time target is a paired ratio (:func:`paired_ratios`) reported as its
    geometric mean with a 95 % interval (:func:`ratio_interval`):

    - the patched build with the loop off within noise of stock (1.0 inside the
      interval), prefill and decode;
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
        ratio("loop off / stock: within noise", "loop off", "stock", phase, None)
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
    that stores the window as many times as the loop evaluates it (K, or 3K
    for rk3; skipped when ``merge_dir`` is None), run by the stock library and
    by the patched one.
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
    if merge_dir is not None and stock_lib is not None:
        merge_dir.mkdir(parents=True, exist_ok=True)
    for k in counts:
        cfg = loop.with_(count=k)
        variants.append(
            Variant(f"K={k}", None, model, cfg.to_kv_overrides(), layer_evals=cfg.layer_evals(n))
        )
        copies = k * len(loop.stages)
        if merge_dir is None or stock_lib is None or copies == 1:
            continue  # no frankenmerges asked for; or one copy, the stock model
        merged = merge_dir / f"{model.stem}.fm{loop.start}-{loop.end}x{copies}.gguf"
        if not merged.exists():
            log(f"writing the frankenmerge {merged.name}")
            frankenmerge(model, merged, loop.start, loop.end, copies)
        evals = n + (copies - 1) * loop.width
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
    merge_dir = build.cache_dir() / "bench" if frankenmerges and stock else None
    variants = loop_variants(
        model, loop, counts, stock_lib=stock_lib, merge_dir=merge_dir, log=log
    )
    results = measure(variants, rounds=rounds, n_prompt=n_prompt, n_decode=n_decode,
                      threads=threads, progress=progress, repeat=repeat)
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
        "prompt_tokens": n_prompt,
        "decode_tokens": n_decode,
        "threads": threads,
        "rows": rows,
        "clock": clock,
        "targets": targets(results, variants, clock),
        # every run's tokens per second, round by round, to recompute any ratio
        "runs": {
            r.name: {
                key: [round(x, 3) for x in getattr(r, key)]
                for key in ("prefill_tps", "decode_tps", "prefill_cpu_tps", "decode_cpu_tps")
            }
            for r in results.values()
        },
    }


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
