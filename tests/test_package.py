"""The loopcpp wheel installs and runs without a checkout (issue 14).

The model manifest and the patch series are package data: in the checkout
``loopcpp/_data/manifest.json`` and ``loopcpp/_data/cpp_patch`` are symlinks to
``models/manifest.json`` and ``cpp_patch/`` (the only copies in git), and the
build puts the files they point to into the wheel. The test builds that wheel
(offline, ``pip wheel --no-build-isolation --no-index``), checks its data files
are byte-identical to the checkout's, installs it with ``--no-deps`` into a
fresh venv next to the patched llama-cpp-python wheel from the build cache, and
runs the ``loopcpp`` entry point from a folder outside the repository with no
PYTHONPATH.

The third-party dependencies (click, numpy, gguf, ...) are not downloaded: the
fresh venv sees this interpreter's site-packages through a ``.pth`` file, after
its own (the same effect as ``--system-site-packages``, for the environment the
tests run in). loopcpp and llama_cpp are regular packages found first in the
fresh venv, which the test checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import SMOLLM2, require_patched

from loopcpp import build, models

REPO = Path(__file__).resolve().parents[1]
DATA = {
    "loopcpp/_data/manifest.json": REPO / "models" / "manifest.json",
    **{
        f"loopcpp/_data/cpp_patch/{p.name}": p
        for p in [*sorted((REPO / "cpp_patch").glob("*.patch")), REPO / "cpp_patch" / "README.md"]
    },
}


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_the_checkout_symlinks_point_at_the_files_in_git() -> None:
    data = REPO / "loopcpp" / "_data"
    assert (data / "manifest.json").resolve() == (REPO / "models" / "manifest.json").resolve()
    assert (data / "cpp_patch").resolve() == (REPO / "cpp_patch").resolve()
    assert models.MANIFEST_PATH.read_bytes() == (REPO / "models" / "manifest.json").read_bytes()
    assert [p.name for p in build.patches()] == [
        p.name for p in sorted((REPO / "cpp_patch").glob("*.patch"))
    ]


@pytest.fixture(scope="module")
def loopcpp_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
          "--no-index", "-w", str(out), str(REPO)], cwd=REPO, env=dict(os.environ), timeout=300)
    wheels = sorted(out.glob("loopcpp-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_the_wheel_carries_the_manifest_and_the_patches(loopcpp_wheel: Path) -> None:
    with zipfile.ZipFile(loopcpp_wheel) as whl:
        names = set(whl.namelist())
        for member, source in DATA.items():
            assert member in names, f"{member} is missing from {loopcpp_wheel.name}"
            assert whl.read(member) == source.read_bytes(), f"{member} differs from {source}"
        assert not any(n.startswith(("tests/", "models/", "cpp_patch/")) for n in names)


@pytest.fixture(scope="module")
def venv(loopcpp_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the loopcpp wheel and the patched llama-cpp-python wheel."""
    require_patched()
    cached = build.cache_dir() / "wheels" / build.build_key(build.BASE_CMAKE_ARGS)
    llama_wheels = sorted(cached.glob("llama_cpp_python-*.whl")) if cached.is_dir() else []
    if not llama_wheels:
        pytest.skip(f"no patched llama-cpp-python wheel in {cached}: run `make setup`")
    root = tmp_path_factory.mktemp("venv") / "env"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=root.parent, env=env)
    python = root / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
          "--no-index", str(loopcpp_wheel), str(llama_wheels[0])], cwd=root.parent, env=env)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run([str(python), "-c", purelib], cwd=root.parent, env=env).strip())
    here = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_loopcpp_test_dependencies.pth").write_text("\n".join(sorted(here)) + "\n")
    return root


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("elsewhere")
    assert REPO not in folder.parents
    return folder


def _env(venv: Path) -> dict[str, str]:
    """No PYTHONPATH; LLAMA_CPP_LIB_PATH passes through (a dev library, as for every test)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    return env


def test_the_installed_package_is_the_wheel(venv: Path, outside: Path) -> None:
    probe = (
        "import json, llama_cpp, loopcpp\n"
        "from loopcpp import build, models\n"
        "print(json.dumps({'loopcpp': loopcpp.__file__, 'llama_cpp': llama_cpp.__file__,\n"
        "  'manifest': str(models.MANIFEST_PATH), 'symlink': models.MANIFEST_PATH.is_symlink(),\n"
        "  'patches': [str(p) for p in build.patches()],\n"
        "  'key': build.build_key(build.BASE_CMAKE_ARGS), 'version': llama_cpp.__version__}))\n"
    )
    got = json.loads(_run([str(venv / "bin" / "python"), "-c", probe], cwd=outside,
                          env=_env(venv)))
    for key in ("loopcpp", "llama_cpp", "manifest"):
        assert Path(got[key]).is_relative_to(venv), (key, got[key])
    assert not got["symlink"]
    assert [Path(p).name for p in got["patches"]] == [p.name for p in build.patches()]
    # the wheel cache key hashes the patch contents: the same from the package data
    assert got["key"] == build.build_key(build.BASE_CMAKE_ARGS)
    assert got["version"] == build.local_version(got["key"])


def test_info_generate_convert_from_outside_the_checkout(venv: Path, outside: Path) -> None:
    models.fetch(SMOLLM2, progress=False)  # the shared cache: the venv finds it there
    env = _env(venv)
    loopcpp = str(venv / "bin" / "loopcpp")

    info = _run([loopcpp, "info", SMOLLM2], cwd=outside, env=env)
    assert "architecture:  llama" in info and "layers:        30" in info, info

    out = json.loads(_run([loopcpp, "generate", SMOLLM2, "-n", "8", "--threads", "2", "--json",
                           "-p", "What is the capital of France?"], cwd=outside, env=env))
    assert out["text"].strip() and 0 < out["n_tokens"] <= 8 and out["loop"]["count"] == 2, out
    assert Path(out["model"]).name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    # the authors' recipe, as a preset, from the installed package
    paper = json.loads(_run([loopcpp, "generate", SMOLLM2, "--recipe", "paper", "-n", "4",
                             "--threads", "2", "--json", "-p", "Hi"], cwd=outside, env=env))
    assert paper["loop"]["count"] == 6 and paper["loop"]["anchor"] == 0.5, paper
    assert (paper["loop"]["start"], paper["loop"]["end"]) == (12, 16), paper

    _run([loopcpp, "convert", SMOLLM2, "-o", "smol-loop.gguf", "--count", "3"], cwd=outside,
         env=env)
    looped = _run([loopcpp, "info", "smol-loop.gguf"], cwd=outside, env=env)
    assert "x K=3" in looped, looped
    assert not list(REPO.glob("smol-loop.gguf"))
