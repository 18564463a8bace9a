"""llama-cpp-python's own test suite guards the patched wheel (issue 14).

The pinned sdist's ``tests/`` (and the vocabulary-only GGUFs under
``vendor/llama.cpp/models`` that they read) are extracted into a temporary
folder and run by pytest in a process of their own against the installed
llama-cpp-python (the patched wheel; or ``LLAMA_CPP_LIB_PATH``'s library),
offline: tests/lcp_suite_plugin.py turns the suite's Hugging Face downloads
into the bundled models below, and skips, naming the model, every test whose
model has no substitute here (mamba, Falcon-H1, bge). Then the prompt-cache
tests run again on a looped SmolLM2 (loop keys written into a copy of the
file), comparing greedy tokens of a cached run with a fresh one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import require_patched

from loopcpp import build
from loopcpp.config import LoopConfig
from loopcpp.convert import write_loop_metadata
from loopcpp.gguf_io import read_model
from loopcpp.models import fetch

HERE = Path(__file__).resolve().parent

#: The suite's hub downloads and the bundled model standing in for each.
QWEN35 = "lmstudio-community/Qwen3.5-0.8B-GGUF/Qwen3.5-0.8B-Q8_0.gguf"
STORIES = "ggml-org/models/tinyllamas/stories15M-q4_0.gguf"

#: Tests whose assertions are the original model's own numbers.
MODEL_SPECIFIC = {
    "test_real_model": "asserts Qwen3.5-0.8B's token ids for 'Hello, world!' (the hub model "
    "is not available offline; no bundled model shares its vocabulary)",
}

#: The models no registry here has: their tests are skipped by the plugin.
UNAVAILABLE = ("mamba-130m", "Falcon-H1", "bge-small")

#: The prompt-cache tests (the transformer case of each), rerun on a looped model.
PROMPT_CACHE = (
    "test_exact_cached_prompt_reuse_matches_fresh",
    "test_loaded_exact_cached_prompt_reuse_matches_fresh",
    "test_ram_cache_exact_prompt_hit_matches_fresh",
    "test_shorter_prompt_prefix_reuse_matches_fresh",
)


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist's tests/ and vocabulary GGUFs, extracted (nothing else of the source)."""
    require_patched()
    pytest.importorskip("scipy", reason="llama-cpp-python's tests import scipy")
    archive = build.cache_dir() / "src" / build.SDIST
    if not archive.is_file():
        pytest.skip(f"{archive} is missing: run `make setup` (it downloads the source release)")
    root = tmp_path_factory.mktemp("llama-cpp-python")
    top = build.SDIST.removesuffix(".tar.gz")
    with tarfile.open(archive) as tar:
        members = [
            m for m in tar.getmembers()
            if m.isfile() and (
                m.name.startswith(f"{top}/tests/")
                or (m.name.startswith(f"{top}/vendor/llama.cpp/models/ggml-vocab-")
                    and m.name.endswith(".gguf"))
            )
        ]
        tar.extractall(root, members=members, filter="data")
    return root / top


def _run_suite(suite: Path, models: dict[str, str], *args: str) -> dict[str, tuple[str, str]]:
    """Run the suite; ``{test id: (outcome, message)}`` from its JUnit XML report."""
    report = suite / f"report-{len(list(suite.glob('report-*.xml')))}.xml"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({
        "PYTHONPATH": str(HERE),  # the plugin only: llama_cpp is the installed package
        "HF_HUB_OFFLINE": "1",
        "LOOPCPP_SUITE_MODELS": json.dumps(models),
        "LOOPCPP_SUITE_SKIP": json.dumps(MODEL_SPECIFIC),
    })
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "lcp_suite_plugin", "-p", "no:cacheprovider",
         f"--junitxml={report}", "-o", "junit_family=xunit2", "tests", *args],
        cwd=suite, env=env, capture_output=True, text=True, timeout=1800, check=False,
    )
    if not report.exists():
        pytest.fail(f"llama-cpp-python's suite did not run ({proc.returncode}):\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    outcomes: dict[str, tuple[str, str]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                message = (child.get("message") or "") + "\n" + (child.text or "")
                break
        outcomes[name] = (outcome, message)
    bad = {k: v[1][-1500:] for k, v in outcomes.items() if v[0] in ("failed", "error")}
    assert not bad, f"llama-cpp-python's own tests failed:\n{json.dumps(bad, indent=1)}"
    return outcomes


def test_the_suite_passes_offline_on_the_bundled_models(suite: Path, smollm2_path: Path) -> None:
    qwen = fetch("qwen2.5-coder-0.5b-instruct", progress=False)
    outcomes = _run_suite(suite, {QWEN35: str(qwen), STORIES: str(smollm2_path)})
    passed = sorted(k for k, (o, _) in outcomes.items() if o == "passed")
    skipped = {k: m for k, (o, m) in outcomes.items() if o == "skipped"}
    for name, message in skipped.items():
        # only for a model that is not here, or for the original model's own numbers
        assert any(m in message for m in UNAVAILABLE) or name.endswith("::test_real_model"), (
            name, message)
    for test in ("test_llama_cpp_tokenization", "test_real_llama",
                 "test_real_llama_repeated_prompt_cache", *PROMPT_CACHE):
        assert any(p.split("::")[1].startswith(test) for p in passed), (test, passed)
    assert len(passed) >= 14, passed


@pytest.fixture(scope="module")
def looped_smollm2(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("looped") / "smollm2-loop.gguf"
    write_loop_metadata(smollm2_path, out, LoopConfig(13, 17, count=2))
    assert read_model(out).loop == LoopConfig(13, 17, count=2)
    return out


def test_the_prompt_cache_tests_pass_on_a_looped_model(
    suite: Path, looped_smollm2: Path
) -> None:
    select = " or ".join(PROMPT_CACHE)
    outcomes = _run_suite(suite, {STORIES: str(looped_smollm2)}, "tests/test_llama.py", "-k",
                          f"({select}) and transformer")
    passed = sorted(k for k, (o, _) in outcomes.items() if o == "passed")
    assert len(passed) == len(PROMPT_CACHE), outcomes
    for test in PROMPT_CACHE:
        assert any(p.split("::")[1].startswith(test) for p in passed), (test, passed)
