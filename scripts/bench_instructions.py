"""Deterministic cost ratios of a loop: instructions counted by valgrind's callgrind.

Wall-clock ratios on a shared two-core machine scatter by several percent; an
instruction count does not (the same binary, inputs and settings count the same
on a loaded or an idle machine). Each variant runs once in its own process
under ``valgrind --tool=callgrind``, counting only inside ``llama_decode`` (its
method ``COUNTED``) and dumping after every call, so one run gives a warm-up call, the prompt (one
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
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from loopcpp import build
from loopcpp.atomic import write_text_atomic
from loopcpp.config import ALIASES, FIELD, LoopConfig, LoopConfigError
from loopcpp.frankenmerge import frankenmerge
from loopcpp.gguf_io import read_model
from loopcpp.models import resolve_model

#: the CPU features the count build uses: AVX2 and FMA, no AVX-512 (valgrind 3.19 has none)
COUNT_FLAGS = ["-DLLAMA_CURL=OFF", "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON",
               "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON", "-DGGML_AVX512=OFF"]

#: the function counted, once per llama_decode call: llama_decode itself is a tail call
#: into it (the C symbol never shows in callgrind's call graph, so toggling on it counts
#: nothing); callgrind's name of the method, exact (a wildcard would also match the
#: llama_batch_ext overload it calls, and toggle the collection off inside)
COUNTED = "llama_context::decode(llama_batch const&)"

WORKER = r"""
import json, sys
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
for i in range(spec["n_decode"]):  # calls 3..: one fixed token each (the same in every variant)
    llm.eval([(13 * i + 5) % (vocab - 100) + 50])
"""


def count_lib() -> Path:
    """libllama of the patched dev tree, built without AVX-512 (cached beside the dev build).

    Built again when the patches applied to the tree differ from those of the last build
    (a stamp of the build key the dev tree is patched to; re-applying the same patches,
    which touches the files, does not count)."""
    tree = build.dev_tree()  # re-applies the patches when they changed
    out = tree / "build-callgrind"
    lib = out / "bin"
    stamp = out / "loopcpp-patch-digest"
    digest = build.build_key(build.BASE_CMAKE_ARGS)  # what dev_tree() stamps the tree with
    if not (lib / "libllama.so").exists() or not stamp.exists() \
            or stamp.read_text().strip() != digest:
        build._cmake_build(tree, out, ["llama"], COUNT_FLAGS)
        stamp.write_text(digest + "\n")
    return lib


def merge_copies(loop: LoopConfig, n_layer: int) -> int:
    """How many times a frankenmerge stores the window to evaluate as many layers per token
    as ``loop`` (``LoopConfig.layer_evals``); LoopConfigError when no count does."""
    extra = loop.layer_evals(n_layer) - n_layer
    if extra < 0 or extra % loop.width:
        raise LoopConfigError(
            f"no frankenmerge of [{loop.start}, {loop.end}) evaluates "
            f"{loop.layer_evals(n_layer)} layers (the loop {loop.describe()})")
    return 1 + extra // loop.width


def parse_dumps(paths: list[Path]) -> list[int]:
    """The ``totals:`` (or ``summary:``) instruction count of each callgrind dump, in dump
    order: ``OUT.1``, ``OUT.2``, ... (``--dump-after``), then ``OUT`` itself (program end)."""
    def order(p: Path) -> int:
        tail = p.name.rpartition(".")[2]
        return int(tail) if tail.isdigit() else 1 << 62
    counts = []
    for path in sorted(paths, key=order):
        text = path.read_text(errors="replace")
        m = re.search(r"^totals:\s+(\d+)", text, re.M) or re.search(r"^summary:\s+(\d+)",
                                                                       text, re.M)
        if m is None:
            raise ValueError(f"{path.name}: no totals: or summary: line (not a callgrind dump?)")
        counts.append(int(m.group(1)))
    return counts


def decode_calls(counts: list[int], n_decode: int) -> list[int]:
    """The per-call counts of the ``2 + n_decode`` llama_decode calls of WORKER.

    Each ``--dump-after`` dump holds one call; the dump callgrind writes at program end
    holds what ran after the last call, outside llama_decode, so 0."""
    calls, rest = counts[:2 + n_decode], counts[2 + n_decode:]
    if len(calls) != 2 + n_decode or any(c <= 0 for c in calls) or any(rest):
        raise ValueError(f"expected {2 + n_decode} llama_decode dumps then zeros, got {counts}")
    return calls


def run_counted(lib: Path, model: Path, overrides: dict[str, Any], n_prompt: int,
                n_decode: int) -> list[int]:
    """Instructions of each llama_decode call of WORKER under callgrind."""
    with tempfile.TemporaryDirectory(prefix="loopcpp-cg-") as tmp:
        spec = {"model": str(model), "n_ctx": n_prompt + n_decode + 16, "n_prompt": n_prompt,
                "n_decode": n_decode, "overrides": overrides}
        env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(lib),
               "LD_LIBRARY_PATH": f"{lib}:{os.environ.get('LD_LIBRARY_PATH', '')}",
               "OMP_NUM_THREADS": "1"}
        cmd = ["valgrind", "--tool=callgrind", f"--toggle-collect={COUNTED}",
               f"--dump-after={COUNTED}", f"--callgrind-out-file={tmp}/cg.out",
               sys.executable, "-c", WORKER, json.dumps(spec)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"callgrind run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        try:
            return decode_calls(parse_dumps(list(Path(tmp).glob("cg.out*"))), n_decode)
        except ValueError as e:
            raise SystemExit(f"callgrind output of {model.name}: {e}") from None


def variants(loop: LoopConfig, n_layer: int) -> list[tuple[str, dict[str, Any], int, int]]:
    """``(name, kv overrides, frankenmerge copies or 0, layer evaluations)`` of each variant:
    stock, the loop, its frankenmerge, the loop with kv = refined and its frankenmerge."""
    refined = loop.with_(kv="refined")
    c_loop, c_refined = merge_copies(loop, n_layer), merge_copies(refined, n_layer)
    return [
        ("stock", {}, 0, n_layer),
        ("loop", loop.to_kv_overrides(), 0, loop.layer_evals(n_layer)),
        (f"frankenmerge x{c_loop}", {}, c_loop, loop.layer_evals(n_layer)),
        ("loop kv=refined", refined.to_kv_overrides(), 0, refined.layer_evals(n_layer)),
        (f"frankenmerge x{c_refined}", {}, c_refined, refined.layer_evals(n_layer)),
    ]


def ratios(rows: dict[str, dict[str, Any]], apply: str) -> dict[str, float]:
    """The ratios of issue 13 from the per-token counts of ``variants``' rows."""
    names = list(rows)
    st, lp, fm, rf, fm1 = (rows[k] for k in names)
    ideal = rf["layer_evals"] / lp["layer_evals"]
    refined_over_loop = rf["prefill_per_token"] / lp["prefill_per_token"]
    return {
        f"loop prefill / {names[2]} (<= 1.03)": lp["prefill_per_token"] / fm["prefill_per_token"],
        ("loop decode / stock, apply=prefill (<= 1.02)" if apply == "prefill"
         else "loop decode / stock"): lp["decode_per_token"] / st["decode_per_token"],
        f"refined prefill / {names[4]}": rf["prefill_per_token"] / fm1["prefill_per_token"],
        "refined prefill / loop prefill": refined_over_loop,
        "ideal refined / loop (layer evaluations)": ideal,
        "refined / loop over its ideal (within 0.97..1.03)": refined_over_loop / ideal,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="bundled model name or GGUF path")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens (one ubatch)")
    ap.add_argument("--decode", type=int, default=8, help="decoded tokens")
    ap.add_argument("--recipe", default="paper", help="the loop preset (default paper)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="change a field of the recipe (e.g. count=4)")
    ap.add_argument("--repeat", metavar="VARIANT",
                    help="count only this variant (stock, loop, ...), twice, and say whether "
                         "the two counts agree (a check that the counts are deterministic)")
    ap.add_argument("--json", type=Path, help="write the counts and ratios here")
    ap.add_argument("--jobs", type=int, default=1,
                    help="variants counted at once (each in its own valgrind process)")
    ap.add_argument("--lib", type=Path,
                    help="a folder holding a libllama (and its libggml*) built from the patched "
                         "tree without AVX-512, instead of building one")
    args = ap.parse_args(argv)

    model = Path(resolve_model(args.model))
    n = read_model(model).n_layer
    try:
        changes = {}
        for item in args.set:
            key, _, value = item.partition("=")
            if key not in ALIASES:
                raise LoopConfigError(f"unknown loop field {key!r}: use one of {', '.join(FIELD)}")
            changes[ALIASES[key]] = FIELD[ALIASES[key]].parse(value)
        loop = LoopConfig.recipe(args.recipe, n, **changes).check(n)
        plan = variants(loop, n)
    except LoopConfigError as e:
        raise SystemExit(str(e)) from None
    lib = args.lib.resolve() if args.lib else count_lib()
    if not (lib / "libllama.so").exists():
        raise SystemExit(f"{lib}: no libllama.so")
    merge_dir = build.cache_dir() / "bench"
    merge_dir.mkdir(parents=True, exist_ok=True)

    def merged(copies: int, evals: int) -> Path:
        path = merge_dir / f"{model.stem}.fm{loop.start}-{loop.end}x{copies}.gguf"
        if not path.exists():
            frankenmerge(model, path, loop.start, loop.end, copies)
        if read_model(path).n_layer != evals:
            raise SystemExit(f"{path}: {read_model(path).n_layer} layers, the loop evaluates "
                             f"{evals} (a stale merge? delete it)")
        return path

    if args.repeat:
        chosen = [v for v in plan if v[0] == args.repeat]
        if not chosen:
            raise SystemExit(f"no variant {args.repeat!r}: use one of "
                             f"{', '.join(v[0] for v in plan)}")
        name, overrides, copies, evals = chosen[0]
        path = merged(copies, evals) if copies else model
        runs = [run_counted(lib, path, overrides, args.prompt, args.decode) for _ in range(2)]
        print(f"{model.name} {name}: per-call instructions\n  run 1 {runs[0]}\n  run 2 {runs[1]}")
        print("  identical" if runs[0] == runs[1] else "  DIFFERENT")
        return 0 if runs[0] == runs[1] else 1

    paths = [merged(copies, evals) if copies else model for _, _, copies, evals in plan]

    def count(i: int) -> list[int]:
        name, overrides, _, evals = plan[i]
        print(f"[count] {name} ({evals} layer evaluations per token) ...", file=sys.stderr,
              flush=True)
        return run_counted(lib, paths[i], overrides, args.prompt, args.decode)

    # counts do not depend on what else runs: the variants may run side by side
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        all_calls = list(pool.map(count, range(len(plan))))
    rows = {}
    for (name, _, _, evals), calls in zip(plan, all_calls, strict=True):
        rows[name] = {"layer_evals": evals, "calls": calls,
                      "prefill_per_token": calls[1] / args.prompt,
                      "decode_per_token": sum(calls[2:]) / args.decode}
    result = ratios(rows, loop.apply)
    print(f"{model.name}: {n} layers, loop {loop.describe()}, prompt {args.prompt}, "
          f"decode {args.decode}, 1 thread, instructions counted by callgrind")
    width = max(len(k) for k in rows)
    for name, r in rows.items():
        print(f"  {name:<{width}}  evals {r['layer_evals']:>3}  prefill "
              f"{r['prefill_per_token']:>14,.0f}/token  "
              f"decode {r['decode_per_token']:>14,.0f}/token")
    for key, value in result.items():
        print(f"  {key}: {value:.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = {"model": model.name, "n_layer": n, "recipe": args.recipe, "loop": loop.to_dict(),
                "prompt_tokens": args.prompt, "decode_tokens": args.decode, "threads": 1,
                "count_flags": COUNT_FLAGS, "lib": str(lib),
                "libllama_sha256": hashlib.sha256((lib / "libllama.so").read_bytes()).hexdigest(),
                "rows": rows, "ratios": result,
                "command": "scripts/bench_instructions.py " + " ".join(
                    [args.model, "--prompt", str(args.prompt), "--decode", str(args.decode),
                     *(["--recipe", args.recipe] if args.recipe != "paper" else []),
                     *[f"--set {x}" for x in args.set]])}
        write_text_atomic(args.json, json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
