"""Patched build with no loop vs the stock build, side by side in one run.

Prints prefill and decode time ratios (patched / stock) on SmolLM2 Q4_1, the
same ratio for the stock build against itself (the noise floor of the run), and
whether the logits of the prompt and every decoded token are bit-identical.

    .venv/bin/python scripts/bench_patched_off.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from loopcpp import build
from loopcpp.bench import Variant, measure, table
from loopcpp.models import fetch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=32)
    args = ap.parse_args()

    model = fetch(args.model)
    stock = build.stock_lib()
    # the same stock build twice: its ratio is the noise floor of this machine and run
    variants = [
        Variant("stock", stock, model),
        Variant("stock again (A/A)", stock, model),
        Variant("patched, no loop", None, model),
    ]
    res = measure(variants, rounds=args.rounds, n_prompt=args.prompt, n_decode=args.decode)
    rows = table(res, "stock")
    t = Table(
        title=f"{args.model}: prompt {args.prompt}, decode {args.decode}, "
        f"median of {args.rounds} interleaved rounds"
    )
    for col in rows[0]:
        t.add_column(col)
    for r in rows:
        t.add_row(*(str(v) for v in r.values()))
    Console(width=150).print(t)
    same = res["stock"].logits_sha == res["patched, no loop"].logits_sha
    print(
        json.dumps(
            {
                "logits_bit_identical": same,
                "prefill_time_ratio_patched_over_stock": rows[2]["prefill_ratio"],
                "decode_time_ratio_patched_over_stock": rows[2]["decode_ratio"],
                "noise_floor_prefill_stock_again_over_stock": rows[1]["prefill_ratio"],
                "noise_floor_decode_stock_again_over_stock": rows[1]["decode_ratio"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
