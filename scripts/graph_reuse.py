"""Does llama.cpp reuse the decode graph when a loop is on?

Loads MODEL stock and looped (kv overrides), evaluates a 40-token prompt and
decodes 20 tokens one at a time, and prints llama_perf_context's n_reused for
each: with graph reuse working, all but the first decode step reuse the
previous graph. --apply prefill loops the prompt only.

    .venv/bin/python scripts/graph_reuse.py gemma3-270m --start 8 --end 10 --count 3
    .venv/bin/python scripts/graph_reuse.py smollm2-135m-instruct --start 13 --end 17 \
        --count 4 --apply prefill
"""

from __future__ import annotations

import argparse

import llama_cpp

from loopcpp.config import APPLIES, LoopConfig
from loopcpp.models import fetch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a bundled model name or a GGUF path")
    ap.add_argument("--start", type=int, required=True)
    ap.add_argument("--end", type=int, required=True)
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--apply", choices=APPLIES, default="all")
    args = ap.parse_args()

    path = str(fetch(args.model)) if not args.model.endswith(".gguf") else args.model
    loop = LoopConfig(args.start, args.end, count=args.count, apply=args.apply)
    for name, overrides in (("stock", None), (loop.describe(), loop.to_kv_overrides())):
        llm = llama_cpp.Llama(path, n_ctx=512, n_threads=1, verbose=False,
                              kv_overrides=overrides)
        llm.eval(list(range(100, 140)))
        for t in range(20):
            llm.eval([1000 + t])
        perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
        print(f"{name}: 20 decode steps, graphs reused {perf.n_reused}")


if __name__ == "__main__":
    main()
