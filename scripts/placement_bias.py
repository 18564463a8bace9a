"""A model against a byte-identical copy of itself: the bias of where weights sit in memory.

Copies the model file, then times the original and the copy side by side
with `loopcpp bench`'s workers, once for each way a worker can hold the
weights (--weights of `loopcpp bench`): mapped from the file (llama.cpp's
default), read into 4 KiB pages, read into transparent huge pages. The two
files are the same bytes, so every ratio should be 1. Prints the paired
copy/original time ratios (median [95 % interval]) and the spread of single
runs, and writes them as JSON.

With mapped files, both are served from the page cache, each placed once for
as long as it stays cached: the copy can run a few percent faster or slower
than the original in every round, a bias that more rounds do not remove.
That is why `loopcpp bench` reads the weights into each process.

With --library the model stays one file and the stock library is timed
against a byte-identical copy of its folder instead: the same question for
the code, which is always mapped.

    .venv/bin/python scripts/placement_bias.py [--model gemma3-270m] [--rounds 8] \
        [--threads 1] [--library] [-o placement.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loopcpp import build
from loopcpp.bench import WEIGHTS, Variant, measure, paired_ratios, ratio_interval
from loopcpp.models import fetch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--weights", nargs="+", choices=WEIGHTS, default=["mmap", "read", "hugepages"])
    ap.add_argument("--library", action="store_true",
                    help="copy the stock library's folder instead of the model")
    ap.add_argument("-o", "--out", type=Path, help="write the figures here as JSON")
    args = ap.parse_args()

    model = fetch(args.model)
    report: dict[str, dict[str, object]] = {}
    what = "the stock library" if args.library else model.name
    with tempfile.TemporaryDirectory(dir=model.parent) as tmp:
        if args.library:
            lib = build.stock_lib()
            copy = Path(tmp) / "lib"
            shutil.copytree(lib, copy, symlinks=True)
            variants = [Variant("original", lib, model), Variant("copy", copy, model)]
        else:
            copy = Path(tmp) / model.name
            shutil.copyfile(model, copy)
            variants = [Variant("original", None, model), Variant("copy", None, copy)]
        for weights in args.weights:
            print(f"timing the original and its copy, weights: {weights}", flush=True)
            res = measure(variants, rounds=args.rounds, n_prompt=args.prompt,
                          n_decode=args.decode, threads=args.threads, weights=weights,
                          fresh_libs=not args.library)  # --library: each folder in place
            report[weights] = {
                "same_logits": res["original"].logits_sha == res["copy"].logits_sha,
                **{
                    f"copy_over_original_{phase}": [
                        round(x, 3) for x in ratio_interval(
                            paired_ratios(res["copy"], res["original"], phase))
                    ]
                    for phase in ("prefill", "decode")
                },
                # run-to-run spread of one file's decode speed: stdev / mean
                "decode_spread": round(
                    statistics.stdev(res["original"].decode_tps)
                    / statistics.mean(res["original"].decode_tps), 3
                ) if args.rounds > 1 else None,
                "decode_tps": round(statistics.median(res["original"].decode_tps), 1),
            }

    table = Table(title=f"{what} against a copy of itself: paired time ratios copy / "
                        f"original, median [95 % interval], {args.rounds} rounds, "
                        f"{args.threads} threads")
    for col in ("weights", "prefill", "decode", "decode spread", "decode tok/s", "same logits"):
        table.add_column(col)
    for weights, r in report.items():
        cells = [
            "{1:.3f} [{0:.3f}, {2:.3f}]".format(*r[f"copy_over_original_{p}"])  # type: ignore[misc]
            for p in ("prefill", "decode")
        ]
        table.add_row(weights, *cells, f"{r['decode_spread']}", f"{r['decode_tps']}",
                      str(r["same_logits"]))
    Console(width=150).print(table)
    if args.out:
        args.out.write_text(json.dumps({
            "model": model.name, "copied": what, "rounds": args.rounds, "prompt": args.prompt,
            "decode": args.decode, "threads": args.threads, "results": report,
        }, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
