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

#: name, file, original text, perturbed text, tests
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
        "return method().damped ? 1.0f/params.count : 1.0f;",
        "return method().damped ? 1.0f/(params.count + 1) : 1.0f;",
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
]


def tree() -> Path:
    root = build.cache_dir() / "mutation"
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
        [sys.executable, "-m", "pytest", "-q", *tests],
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
    print(f"[baseline] {run_tests(rebuild(src), DENSE)[1]}", flush=True)
    survived = 0
    for name, rel, old, new, tests in MUTATIONS:
        if args.only and name not in args.only:
            continue
        path = src / rel
        text = path.read_text()
        if text.count(old) != 1:
            print(f"[{name}] cannot apply: the patch changed; update the mutation", flush=True)
            survived += 1
            continue
        path.write_text(text.replace(old, new))
        try:
            rc, summary = run_tests(rebuild(src), tests)
        finally:
            path.write_text(text)
        verdict = "caught" if rc != 0 else "SURVIVED"
        survived += rc == 0
        print(f"[{name}] {rel}: {old!r} -> {new!r}: {summary} => {verdict}", flush=True)
    rebuild(src)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
