"""The cost of looping, side by side in one run (issue: loop engine targets).

On SmolLM2-135M Q4_1 with the window [13, 17), K = 3, euler, block
(the same comparison as `loopcpp bench MODEL --counts 3`):
  - stock:          the stock build, the original GGUF
  - loop off:       the patched build without a loop
  - K=3:            the patched build, loop via kv overrides (0 extra weights, 0 extra KV)
  - K=3 apply=prefill: the same with apply = prefill
  - frankenmerge x3: the stock build on a GGUF whose window layers are physically
                    repeated to the same number of layer evaluations (38 layers)
  - frankenmerge x3 (patched build): the same file on the patched build, so the loop's
                    own cost is measured against one binary
Prints time ratios (prefill 256 tokens, decode 128), weight and KV-state bytes.

    .venv/bin/python scripts/bench_loop.py [--rounds 3] [--start 13 --end 17 --count 3]
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from loopcpp.bench import bench_loop
from loopcpp.config import LoopConfig
from loopcpp.models import fetch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--start", type=int, default=13)
    ap.add_argument("--end", type=int, default=17)
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=128)
    args = ap.parse_args()

    model = fetch(args.model)
    loop = LoopConfig(args.start, args.end, count=args.count)
    report = bench_loop(model, loop, [args.count], rounds=args.rounds, n_prompt=args.prompt,
                        n_decode=args.decode)
    rows = {r["variant"]: r for r in report["rows"]}
    t = Table(title=f"{args.model} {loop.describe()}; prompt {args.prompt}, decode "
                    f"{args.decode}; time ratios vs stock, median of {args.rounds} rounds")
    for col in report["rows"][0]:
        t.add_column(col)
    for r in report["rows"]:
        t.add_row(*(str(v) for v in r.values()))
    Console(width=170).print(t)
    k = args.count
    lp, pf = rows[f"K={k}"], rows[f"K={k} apply=prefill"]
    fm = rows[f"frankenmerge x{k}"]
    fm_same = rows[f"frankenmerge x{k} (patched build)"]
    print(json.dumps({
        "looped_over_frankenmerge_same_build_prefill":
            round(lp["prefill_ratio"] / fm_same["prefill_ratio"], 3),
        "looped_over_frankenmerge_same_build_decode":
            round(lp["decode_ratio"] / fm_same["decode_ratio"], 3),
        "looped_over_stock_prefill": lp["prefill_ratio"],
        "looped_over_stock_decode": lp["decode_ratio"],
        "looped_over_frankenmerge_prefill": round(lp["prefill_ratio"] / fm["prefill_ratio"], 3),
        "looped_over_frankenmerge_decode": round(lp["decode_ratio"] / fm["decode_ratio"], 3),
        "prefill_apply_decode_over_stock": pf["decode_ratio"],
        "extra_weight_bytes_looped": lp["extra_weight_bytes"],
        "extra_weight_bytes_frankenmerge": fm["extra_weight_bytes"],
        "extra_kv_state_bytes_looped": lp["extra_state_bytes"],
        "extra_kv_state_bytes_frankenmerge": fm["extra_state_bytes"],
    }, indent=2))


if __name__ == "__main__":
    main()
