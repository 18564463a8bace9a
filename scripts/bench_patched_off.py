"""Patched build with no loop vs the stock build, side by side in one run.

Prints prefill and decode time ratios (patched / stock) on SmolLM2 Q4_1, the
same ratio for the stock build against itself (the noise floor of the run), and
whether the logits of the prompt and every decoded token are bit-identical.
The ratios are paired round by round: [95 % low, median, 95 % high].

    .venv/bin/python scripts/bench_patched_off.py [--rounds 5] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from loopcpp import build
from loopcpp.bench import Variant, measure, paired_ratios, ratio_interval, table
from loopcpp.models import fetch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=1, help="timings per run; the fastest counts")
    args = ap.parse_args()

    model = fetch(args.model)
    stock = build.stock_lib()
    # the same stock build twice: its ratio is the noise floor of this machine and run
    variants = [
        Variant("stock", stock, model),
        Variant("stock again (A/A)", stock, model),
        Variant("patched, no loop", None, model),
    ]
    res = measure(variants, rounds=args.rounds, n_prompt=args.prompt, n_decode=args.decode,
                  repeat=args.repeat)
    rows = table(res, "stock")
    t = Table(
        title=f"{args.model}: prompt {args.prompt}, decode {args.decode}, "
        f"median of {args.rounds} interleaved rounds"
    )
    cols = ("variant", "prefill_tps", "decode_tps", "prefill_ratio", "decode_ratio",
            "state_bytes", "huge_page_mib", "logits_sha")
    for col in cols:
        t.add_column(col.replace("_", " "))
    for r in rows:
        t.add_row(*(str(r[c]) for c in cols))
    Console(width=150).print(t)
    same = res["stock"].logits_sha == res["patched, no loop"].logits_sha

    def paired(name: str, phase: str) -> list[float]:
        return [round(x, 3) for x in ratio_interval(paired_ratios(res[name], res["stock"], phase))]

    print(
        json.dumps(
            {
                "logits_bit_identical": same,
                "paired_time_ratios_low_median_high": {
                    "patched_over_stock_prefill": paired("patched, no loop", "prefill"),
                    "patched_over_stock_decode": paired("patched, no loop", "decode"),
                    "noise_floor_stock_again_over_stock_prefill": paired(
                        "stock again (A/A)", "prefill"
                    ),
                    "noise_floor_stock_again_over_stock_decode": paired(
                        "stock again (A/A)", "decode"
                    ),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
