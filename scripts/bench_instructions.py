"""Deterministic cost ratios of a loop: instructions counted by valgrind's callgrind.

Wall-clock ratios on a shared two-core machine scatter by several percent; an
instruction count does not (the same binary, inputs and settings count the same
on a loaded or an idle machine). Each variant runs once in its own process
under ``valgrind --tool=callgrind``, counting only inside ``llama_decode`` and
dumping after every call, so one run gives a warm-up call, the prompt (one
ubatch) and every decoded token separately. One thread; the library is the
patched tree built without AVX-512 (valgrind does not decode it), once, cached.

    .venv/bin/python scripts/bench_instructions.py smollm2-135m-instruct \
        [--prompt 64] [--decode 8] [--json docs/results/instructions/smollm2.json]

Variants: the model with no loop (stock graph), the loop, the loop with
``kv = refined``, and frankenmerges storing the window as many times as the loop
and the refined loop evaluate it (the stock graph of the same layer
evaluations). The loop defaults to the authors' ``paper`` recipe of
docs/LOOPING.md v2; ``--set FIELD=VALUE`` changes any field of it.
Printed: instructions per prompt token and per decoded token, and the ratios
issue 13 asks for (loop prefill / frankenmerge, loop decode / stock,
refined prefill / frankenmerge of its layer evaluations and / its ideal ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from loopcpp import build
from loopcpp.config import ALIASES, FIELD, LoopConfig, LoopConfigError
from loopcpp.frankenmerge import frankenmerge
from loopcpp.gguf_io import read_model, write_text_atomic
from loopcpp.models import resolve_model

#: the CPU features the count build uses: AVX2 and FMA, no AVX-512 (valgrind 3.19 has none)
COUNT_FLAGS = ["-DLLAMA_CURL=OFF", "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON",
               "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON", "-DGGML_AVX512=OFF"]

WORKER = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
spec = json.loads(sys.argv[1])
llm = Llama(spec["model"], n_ctx=spec["n_ctx"], n_batch=spec["n_prompt"],
            n_ubatch=spec["n_prompt"], n_threads=1, n_threads_batch=1, verbose=False,
            seed=0, kv_overrides=spec["overrides"] or None, logits_all=False)
vocab = llm.n_vocab()
prompt = [(7 * i + 11) % (vocab - 100) + 50 for i in range(spec["n_prompt"])]
llm.eval(prompt[:4])  # call 1: warm-up (graph allocation)
llm.reset()
llm.eval(prompt)      # call 2: the prompt, one ubatch
for _ in range(spec["n_decode"]):  # calls 3..: one token each
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))
    llm.eval([int(np.argmax(logits))])
"""


def count_lib() -> Path:
    """libllama of the patched dev tree, built without AVX-512 (cached beside the dev build)."""
    tree = build.dev_tree()
    out = tree / "build-callgrind"
    lib = out / "bin"
    if not (lib / "libllama.so").exists():
        build._cmake_build(tree, out, ["llama"], COUNT_FLAGS)
    return lib


def paper_loop(n_layer: int) -> LoopConfig:
    """The authors' ``paper`` recipe (docs/LOOPING.md v2): a 4-layer window ending at the
    middle layer (n_layer/8 wide, at least 2, under 24 layers), block, euler, K = 6,
    anchor 0.5, kv first, apply prefill."""
    width = 4 if n_layer >= 24 else max(2, round(n_layer / 8))
    end = n_layer // 2
    return LoopConfig(end - width, end, count=6, mode="block", method="euler", anchor=0.5,
                      kv="first", apply="prefill")


def run_counted(lib: Path, model: Path, overrides: dict[str, Any], n_prompt: int,
                n_decode: int) -> list[int]:
    """Instructions of each llama_decode call of WORKER under callgrind."""
    with tempfile.TemporaryDirectory(prefix="loopcpp-cg-") as tmp:
        spec = {"model": str(model), "n_ctx": n_prompt + n_decode + 16, "n_prompt": n_prompt,
                "n_decode": n_decode, "overrides": overrides}
        env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(lib),
               "LD_LIBRARY_PATH": f"{lib}:{os.environ.get('LD_LIBRARY_PATH', '')}",
               "OMP_NUM_THREADS": "1"}
        cmd = ["valgrind", "--tool=callgrind", "--toggle-collect=llama_decode",
               "--dump-after=llama_decode", f"--callgrind-out-file={tmp}/cg.out",
               sys.executable, "-c", WORKER, json.dumps(spec)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"callgrind run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        counts = []
        for path in sorted(Path(tmp).glob("cg.out.*"), key=lambda p: int(p.suffix[1:])):
            m = re.search(r"^totals:\s+(\d+)", path.read_text(errors="replace"), re.M)
            counts.append(int(m.group(1)) if m else 0)
    calls = [c for c in counts if c > 0]
    if len(calls) != 2 + n_decode:
        raise SystemExit(f"expected {2 + n_decode} llama_decode dumps, got {len(counts)}")
    return calls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="bundled model name or GGUF path")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens (one ubatch)")
    ap.add_argument("--decode", type=int, default=8, help="decoded tokens")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="change a field of the recipe (e.g. count=4)")
    ap.add_argument("--json", type=Path, help="write the counts and ratios here")
    args = ap.parse_args(argv)

    model = Path(resolve_model(args.model))
    n = read_model(model).n_layer
    loop = paper_loop(n)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in ALIASES:
            raise SystemExit(f"unknown loop field {key!r}: use one of {', '.join(FIELD)}")
        try:
            loop = loop.with_(**{ALIASES[key]: FIELD[ALIASES[key]].parse(value)})
        except LoopConfigError as e:
            raise SystemExit(str(e)) from None
    loop.check(n)
    refined = loop.with_(kv="refined")
    lib = count_lib()
    merge_dir = build.cache_dir() / "bench"
    merge_dir.mkdir(parents=True, exist_ok=True)

    def merged(copies: int) -> Path:
        path = merge_dir / f"{model.stem}.fm{loop.start}-{loop.end}x{copies}.gguf"
        if not path.exists():
            frankenmerge(model, path, loop.start, loop.end, copies)
        return path

    evals_loop = loop.layer_evals(n)
    evals_refined = refined.layer_evals(n)
    copies = 1 + (evals_loop - n) // loop.width
    variants = [
        ("stock", model, {}, n),
        ("loop", model, loop.to_kv_overrides(), evals_loop),
        (f"frankenmerge x{copies}", merged(copies), {}, evals_loop),
        ("loop kv=refined", model, refined.to_kv_overrides(), evals_refined),
        (f"frankenmerge x{copies + 1}", merged(copies + 1), {}, evals_refined),
    ]
    rows = {}
    for name, path, overrides, evals in variants:
        print(f"[count] {name} ({evals} layer evaluations per token) ...", file=sys.stderr,
              flush=True)
        calls = run_counted(lib, path, overrides, args.prompt, args.decode)
        rows[name] = {"layer_evals": evals, "prefill_per_token": calls[1] / args.prompt,
                      "decode_per_token": sum(calls[2:]) / args.decode}
    st, lp, rf = rows["stock"], rows["loop"], rows["loop kv=refined"]
    fm, fm1 = rows[f"frankenmerge x{copies}"], rows[f"frankenmerge x{copies + 1}"]
    ratios = {
        "loop prefill / frankenmerge (<= 1.03)": lp["prefill_per_token"] / fm["prefill_per_token"],
        "loop decode / stock, apply=prefill (<= 1.02)" if loop.apply == "prefill"
        else "loop decode / stock": lp["decode_per_token"] / st["decode_per_token"],
        "refined prefill / frankenmerge of its evaluations (<= 1.03)":
            rf["prefill_per_token"] / fm1["prefill_per_token"],
        "refined prefill / loop prefill": rf["prefill_per_token"] / lp["prefill_per_token"],
        "ideal refined / loop (layer evaluations)": evals_refined / evals_loop,
    }
    print(f"{model.name}: {n} layers, loop {loop.describe()}, prompt {args.prompt}, "
          f"decode {args.decode}, 1 thread, instructions counted by callgrind")
    width = max(len(k) for k in rows)
    for name, r in rows.items():
        print(f"  {name:<{width}}  evals {r['layer_evals']:>3}  prefill "
              f"{r['prefill_per_token']:>14,.0f}/token  "
              f"decode {r['decode_per_token']:>14,.0f}/token")
    for key, value in ratios.items():
        print(f"  {key}: {value:.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = {"model": model.name, "n_layer": n, "loop": loop.to_dict(),
                "prompt_tokens": args.prompt, "decode_tokens": args.decode, "rows": rows,
                "ratios": ratios, "valgrind": shutil.which("valgrind")}
        write_text_atomic(args.json, json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
