"""The figures of docs/RESULTS.md "GPU backends": max |Vulkan - CPU| of the logits per family.

Runs tests/test_vulkan.py's comparison (the same subprocess, loops and placements) on
each tiny checkpoint with the patched Vulkan dev build, writes one JSON line per
family (with its wall time) and prints the table: stock and worst loop, full offload
and the window split between Vulkan and the CPU.

    bash scripts/vulkan_deps.sh && .venv/bin/python -m loopcpp.build dev --backend vulkan
    .venv/bin/python scripts/vulkan_figures.py --out docs/results/vulkan/lavapipe.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import test_vulkan as tv  # noqa: E402


def measure(family: str, env: dict[str, str]) -> dict:
    from loopcpp.tiny import tiny_checkpoint

    gguf_path = tiny_checkpoint(family)[1]
    loops, split_ngl = tv._loops(tv._n_layer(gguf_path))
    job = {"gguf": str(gguf_path), "loops": loops, "split_ngl": split_ngl}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", tv.SCRIPT, json.dumps(job)], env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"{family}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["family"] = family
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def table(rows: list[dict]) -> str:
    lines = [
        "| family | max abs logit | stock, Vulkan | stock, split | worst loop, Vulkan "
        "| worst loop, split | worst / stock | state bytes = stock | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        names = [k[: -len(" effect")] for k in r if k.endswith(" effect")]
        worst = {p: max(names, key=lambda n, p=p: r[f"{n} {p}"]) for p in ("vk", "split")}
        ratio = max(r[f"{worst[p]} {p}"] / r[f"stock {p}"] for p in ("vk", "split"))
        same = all(r[f"{n} {p} state"][0] == r[f"{n} {p} state"][1]
                   for n in names for p in ("vk", "split"))
        wv, ws = worst["vk"], worst["split"]
        lines.append(
            f"| {r['family']} | {r['max |logit|']:.2f} | {r['stock vk']:.1e} | "
            f"{r['stock split']:.1e} | {r[wv + ' vk']:.1e} ({wv}) | "
            f"{r[ws + ' split']:.1e} ({ws}) | {ratio:.1f} | "
            f"{'yes' if same else 'NO'} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("families", nargs="*", default=list(tv.FAMILIES))
    ap.add_argument("--out", type=Path, help="write the JSON lines here")
    ap.add_argument("--table", type=Path, help="only print the table of a JSON lines file")
    args = ap.parse_args()
    if args.table:
        rows = [json.loads(line) for line in args.table.read_text().splitlines() if line.strip()]
        print(table(rows))
        return
    env = {
        **os.environ,
        "LLAMA_CPP_LIB_PATH": str(tv._lib_dir()),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    env.setdefault("GGML_VK_VISIBLE_DEVICES", "0")
    rows = []
    for family in args.families:
        rows.append(measure(family, env))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(table(rows))


if __name__ == "__main__":
    main()
