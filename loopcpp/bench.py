"""Side-by-side speed, memory and logit measurements of llama.cpp builds.

Every variant runs in its own subprocess (a fresh process per run, so each
loads the library it is given through ``LLAMA_CPP_LIB_PATH``), variants are
interleaved round by round, and ratios are taken between medians measured in
the same invocation. Nothing here is a unit test: scripts print the numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Variant:
    """One thing to measure: a library, a model file and kv overrides."""

    name: str
    lib: Path | None  # None: the installed llama-cpp-python's own library
    model: Path
    overrides: dict[str, int | str] = field(default_factory=dict)


@dataclass
class Result:
    name: str
    prefill_tps: list[float] = field(default_factory=list)
    decode_tps: list[float] = field(default_factory=list)
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
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    digest = hashlib.sha256()

    def last_logits() -> np.ndarray:
        # llama-cpp-python keeps no scores without logits_all: read llama_get_logits
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,)).copy()

    logits = last_logits()
    digest.update(logits.tobytes())
    t2 = time.perf_counter()
    for _ in range(spec["n_decode"]):
        token = int(np.argmax(logits))
        llm.eval([token])
        logits = last_logits()
        digest.update(logits.tobytes())
    t3 = time.perf_counter()
    import llama_cpp

    state = int(llama_cpp.llama_state_get_size(llm._ctx.ctx))
    return {
        "prefill_tps": spec["n_prompt"] / (t1 - t0),
        "decode_tps": spec["n_decode"] / (t3 - t2),
        "state_bytes": state,
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "logits_sha": digest.hexdigest(),
    }


def run_variant(
    v: Variant, n_prompt: int, n_decode: int, threads: int, n_ctx: int = 512
) -> dict[str, Any]:
    spec = {
        "model": str(v.model),
        "overrides": v.overrides,
        "n_prompt": n_prompt,
        "n_decode": n_decode,
        "threads": threads,
        "n_ctx": n_ctx,
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
) -> dict[str, Result]:
    """Interleave the variants for ``rounds`` rounds; medians per variant."""
    from rich.progress import Progress

    results = {v.name: Result(v.name, weight_bytes=v.model.stat().st_size) for v in variants}
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("benchmark", total=rounds * len(variants))
        for _ in range(rounds):
            for v in variants:
                bar.update(task, description=f"benchmark {v.name}")
                out = run_variant(v, n_prompt, n_decode, threads)
                r = results[v.name]
                r.prefill_tps.append(out["prefill_tps"])
                r.decode_tps.append(out["decode_tps"])
                r.state_bytes = out["state_bytes"]
                r.rss_mib = max(r.rss_mib, out["rss_mib"])
                if r.logits_sha and r.logits_sha != out["logits_sha"]:
                    r.logits_sha = "nondeterministic"
                elif not r.logits_sha:
                    r.logits_sha = out["logits_sha"]
                bar.advance(task)
    return results


def table(results: dict[str, Result], baseline: str) -> list[dict[str, Any]]:
    base = results[baseline]
    rows = []
    for r in results.values():
        rows.append(
            {
                "variant": r.name,
                "prefill_tps": round(r.prefill, 1),
                "decode_tps": round(r.decode, 1),
                "prefill_ratio": round(base.prefill / r.prefill, 3),  # time ratio vs baseline
                "decode_ratio": round(base.decode / r.decode, 3),
                "weight_mib": round(r.weight_bytes / 2**20, 1),
                "state_bytes": r.state_bytes,
                "peak_rss_mib": round(r.rss_mib, 1),
                "logits_sha": r.logits_sha[:12],
            }
        )
    return rows


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
