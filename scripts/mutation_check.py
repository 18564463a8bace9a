"""Perturb the patch one rule at a time and show that the conformance suite fails.

Each mutation edits one line of the patched llama.cpp (an integrator
coefficient, the sub-step size, the kv policy, the routing rule, the apply
policy), rebuilds libllama incrementally in a private tree
(``$LOOPCPP_CACHE/mutation``, first build a few minutes), runs the conformance
tests against it through LLAMA_CPP_LIB_PATH, and restores the line. A
mutation the suite does not catch is printed as SURVIVED.

    .venv/bin/python scripts/mutation_check.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from loopcpp import build

REPO = Path(__file__).resolve().parent.parent
DENSE = ["tests/test_conformance.py", "-k", "every_loop"]
MOE = ["tests/test_conformance_moe.py", "-k", "every_loop or frozen"]
# the pairwise rows of one dense and one MoE family (every v2 setting, kv and apply policy on
# each) and the apply-first / decode-count tests; the full cross on llama adds nothing to
# what these catch and costs ten times more
V2 = ["tests/test_conformance_v2.py", "-k", "all_pairs and qwen3 or apply_first or counter"]

#: name, file, original text, perturbed text, tests; the original text may be a list of
#: (original, perturbed) pairs applied together (the perturbed text is then None)
MUTATIONS = [
    (
        "rk3-alpha",
        "src/llama-loop.cpp",
        "{ 0.0f, 0.75f, 1.0f/3.0f }",
        "{ 0.0f, 0.70f, 1.0f/3.0f }",
        DENSE,
    ),
    (
        "rk3-beta",
        "src/llama-loop.cpp",
        "{ 1.0f, 0.25f, 2.0f/3.0f }",
        "{ 1.0f, 0.25f, 0.66f }",
        DENSE,
    ),
    (
        "euler-step",
        "src/llama-loop.cpp",
        "return params.step > 0.0f ? params.step : 1.0f/params.count;",
        "return params.step > 0.0f ? params.step : 1.0f/(params.count + 1);",
        DENSE,
    ),
    (
        "kv-first-ignored",
        "src/llama-graph.cpp",
        "if (loop_first_eval && loop.params.kv == LLAMA_LOOP_KV_FIRST) {",
        "if (false) {",
        DENSE,
    ),
    (
        "kv-last-from-first",
        "src/llama-graph.cpp",
        "if (loop_first_eval && loop.params.kv == LLAMA_LOOP_KV_FIRST) {",
        "if (loop_first_eval) {",
        DENSE,
    ),
    (
        "routing-frozen-ignored",
        "src/llama-graph.cpp",
        "if (!loop_active || loop.params.routing != LLAMA_LOOP_ROUTING_FROZEN ||",
        "if (true || !loop_active || loop.params.routing != LLAMA_LOOP_ROUTING_FROZEN ||",
        MOE,
    ),
    (
        "apply-prefill-ignored",
        "src/llama-loop.cpp",
        "    if (params.apply == LLAMA_LOOP_APPLY_ALL) {",
        "    if (true) {",
        DENSE,
    ),
    # version 2
    (
        "anchor-weight",
        "src/llama-graph.cpp",
        "ggml_scale(ctx0, nat, p.anchor), ggml_scale(ctx0, x, 1.0f - p.anchor)",
        "ggml_scale(ctx0, nat, 0.9f*p.anchor), ggml_scale(ctx0, x, 1.0f - p.anchor)",
        V2,
    ),
    (
        "norm-target-one-step-off",
        "src/llama-graph.cpp",
        "const float t = (float) (k + 1)/K;",
        "const float t = (float) (k + 2)/K;",
        V2,
    ),
    (
        "refined-from-last-input",
        "src/llama-graph.cpp",
        [
            # remember the input of the loop's last evaluation, and start the refined pass there
            ("    for (int il0 = p.start; il0 < p.end; il0 += n_span) {\n",
             "    ggml_tensor * last_in = cur;\n"
             "    for (int il0 = p.start; il0 < p.end; il0 += n_span) {\n"),
            ("ggml_tensor * g = build_loop_eval(y, il0, n_span, nat == nullptr, build_layer);",
             "last_in = y; "
             "ggml_tensor * g = build_loop_eval(y, il0, n_span, nat == nullptr, build_layer);"),
            ("build_loop_eval(cur, p.start, p.end - p.start, false, build_layer);",
             "build_loop_eval(last_in, p.start, p.end - p.start, false, build_layer);"),
        ],
        None,
        V2,
    ),
    (
        "apply-n-off-by-one",
        "src/llama-loop.cpp",
        "n_dec[s] >= 0 && n_dec[s] < params.apply_n) {",
        "n_dec[s] >= 0 && n_dec[s] <= params.apply_n) {",
        V2,
    ),
    (
        "rk4-weight",
        "src/llama-loop.cpp",
        "{ 1.0f/6.0f, 1.0f/3.0f, 1.0f/3.0f, 1.0f/6.0f }",
        "{ 1.0f/6.0f, 1.0f/3.0f, 0.30f, 1.0f/6.0f }",
        V2,
    ),
    (
        "midpoint-stage",
        "src/llama-loop.cpp",
        "{ BU, 2, true,  {}, {}, { {}, { 0.5f } },",
        "{ BU, 2, true,  {}, {}, { {}, { 0.45f } },",
        V2,
    ),
]


def tree() -> Path:
    # one tree per patch series: a changed series gets a fresh (full) build
    root = build.cache_dir() / f"mutation-{build.build_key(build.BASE_CMAKE_ARGS)}"
    src = root / "llama.cpp"
    if not src.exists():
        tmp = Path(tempfile.mkdtemp(dir=build.cache_dir(), prefix=".mutation-"))
        extracted = build._extract(build.source_archive(), tmp)
        vendor = extracted / "vendor" / "llama.cpp"
        build.apply_patches(vendor)
        root.mkdir(parents=True, exist_ok=True)
        os.replace(vendor, src)
        shutil.rmtree(tmp, ignore_errors=True)
    return src


def rebuild(src: Path) -> Path:
    build._cmake_build(src, src / "build", ["llama"], ["-DLLAMA_CURL=OFF"])
    return src / "build" / "bin"


def run_tests(lib: Path, tests: list[str]) -> tuple[int, str]:
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(lib))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", *tests],  # -x: a caught mutation stops early
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    summary = [ln for ln in proc.stdout.splitlines() if " passed" in ln or " failed" in ln]
    return proc.returncode, summary[-1] if summary else proc.stdout[-300:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="mutation names to run")
    args = ap.parse_args()
    src = tree()
    lib = rebuild(src)
    chosen = [m for m in MUTATIONS if not args.only or m[0] in args.only]
    for tests in dict.fromkeys(tuple(m[4]) for m in chosen):
        print(f"[baseline] {' '.join(tests)}: {run_tests(lib, list(tests))[1]}", flush=True)
    survived = 0
    for name, rel, old, new, tests in MUTATIONS:
        if args.only and name not in args.only:
            continue
        path = src / rel
        text = path.read_text()
        edits = old if isinstance(old, list) else [(old, new)]
        if any(text.count(o) != 1 for o, _ in edits):
            print(f"[{name}] cannot apply: the patch changed; update the mutation", flush=True)
            survived += 1
            continue
        mutated = text
        for o, n in edits:
            mutated = mutated.replace(o, n)
        path.write_text(mutated)
        try:
            rc, summary = run_tests(rebuild(src), tests)
        finally:
            path.write_text(text)
        verdict = "caught" if rc != 0 else "SURVIVED"
        survived += rc == 0
        shown = f"{old!r} -> {new!r}" if new is not None else f"{len(edits)} edits"
        print(f"[{name}] {rel}: {shown}: {summary} => {verdict}", flush=True)
    rebuild(src)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
