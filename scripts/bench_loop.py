"""The cost of looping, side by side in one run (issue: loop engine targets).

On SmolLM2-135M Q4_1 with the window [13, 17), K = 3, euler, block:
  - stock:         the stock build, the original GGUF
  - looped:        the patched build, loop via kv overrides (0 extra weights, 0 extra KV)
  - looped/prefill: the same with apply = prefill
  - frankenmerge:  the stock build on a GGUF whose window layers are physically
                   repeated to the same number of layer evaluations (38 layers)
Prints time ratios (prefill 256 tokens, decode 48), weight and KV-state bytes.

    .venv/bin/python scripts/bench_loop.py [--rounds 3] [--start 13 --end 17 --count 3]
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from loopcpp import build
from loopcpp.bench import Variant, measure, table
from loopcpp.build import cache_dir
from loopcpp.config import LoopConfig
from loopcpp.frankenmerge import frankenmerge
from loopcpp.models import fetch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--start", type=int, default=13)
    ap.add_argument("--end", type=int, default=17)
    ap.add_argument("--count", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=48)
    args = ap.parse_args()

    model = fetch(args.model)
    loop = LoopConfig(args.start, args.end, count=args.count)
    merged = cache_dir() / "bench" / f"{model.stem}.fm{args.start}-{args.end}x{args.count}.gguf"
    if not merged.exists():
        merged.parent.mkdir(parents=True, exist_ok=True)
        frankenmerge(model, merged, args.start, args.end, args.count)
    stock = build.stock_lib()
    variants = [
        Variant("stock", stock, model),
        Variant("looped", None, model, loop.to_kv_overrides()),
        Variant("looped apply=prefill", None, model, loop.with_(apply="prefill").to_kv_overrides()),
        Variant("frankenmerge", stock, merged),
    ]
    res = measure(variants, rounds=args.rounds, n_prompt=args.prompt, n_decode=args.decode)
    rows = table(res, "stock")
    t = Table(
        title=f"{args.model} {loop.describe()}; prompt {args.prompt}, decode "
        f"{args.decode}; time ratios vs stock, median of {args.rounds} rounds"
    )
    for col in rows[0]:
        t.add_column(col)
    for r in rows:
        t.add_row(*(str(v) for v in r.values()))
    Console(width=150).print(t)
    lp, fm, pf = res["looped"], res["frankenmerge"], res["looped apply=prefill"]
    st = res["stock"]
    print(
        json.dumps(
            {
                "looped_over_stock_prefill": round(st.prefill / lp.prefill, 3),
                "looped_over_stock_decode": round(st.decode / lp.decode, 3),
                "looped_over_frankenmerge_prefill": round(fm.prefill / lp.prefill, 3),
                "looped_over_frankenmerge_decode": round(fm.decode / lp.decode, 3),
                "prefill_apply_decode_over_stock": round(st.decode / pf.decode, 3),
                "extra_weight_bytes_looped": lp.weight_bytes - st.weight_bytes,
                "extra_weight_bytes_frankenmerge": fm.weight_bytes - st.weight_bytes,
                "extra_kv_state_bytes_looped": lp.state_bytes - st.state_bytes,
                "extra_kv_state_bytes_frankenmerge": fm.state_bytes - st.state_bytes,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
