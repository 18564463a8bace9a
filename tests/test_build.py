"""The wheel builder: cache keys, patch application errors, the installed build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loopcpp import build


def test_key_depends_on_patches_and_flags(tmp_path):
    for p in build.patches():
        shutil.copy(p, tmp_path / p.name)
    k0 = build.build_key(build.BASE_CMAKE_ARGS, tmp_path)
    assert k0 == build.build_key(build.BASE_CMAKE_ARGS, build.PATCH_DIR)
    assert k0 != build.build_key(build.BASE_CMAKE_ARGS + ["-DGGML_RPC=ON"], tmp_path)
    last = sorted(tmp_path.glob("*.patch"))[-1]
    last.write_text(last.read_text() + "\n")
    assert k0 != build.build_key(build.BASE_CMAKE_ARGS, tmp_path)
    assert build.build_key(build.BASE_CMAKE_ARGS, stock=True) != k0


def test_local_version_label():
    key = build.build_key(build.BASE_CMAKE_ARGS)
    assert build.local_version(key) == f"0.3.36+loopcpp.{build.SERIES}.{key[:8]}"


def test_missing_patch_dir_is_an_error(tmp_path):
    with pytest.raises(build.BuildError, match="no patches found"):
        build.patches(tmp_path)


def test_bad_hunk_names_patch_and_file(tmp_path):
    tree = tmp_path / "llama.cpp"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "llama-graph.cpp").write_text("int main() { return 0; }\n")
    pdir = tmp_path / "patches"
    pdir.mkdir()
    (pdir / "0001-broken.patch").write_text(
        "--- a/src/llama-graph.cpp\n+++ b/src/llama-graph.cpp\n@@ -1,1 +1,1 @@\n"
        "-int main() { return 1; }\n+int main() { return 2; }\n"
    )
    with pytest.raises(build.BuildError) as e:
        build.apply_patches(tree, pdir)
    msg = str(e.value)
    assert "0001-broken.patch" in msg and "src/llama-graph.cpp" in msg


def test_series_applies_to_the_pinned_source(tmp_path):
    archive = build.source_archive()
    src = build._extract(archive, tmp_path)
    vendor = src / "vendor" / "llama.cpp"
    build.apply_patches(vendor)
    assert "llama_set_loop" in (vendor / "include" / "llama.h").read_text()


def test_cached_wheel_is_reused_fast():
    t0 = time.perf_counter()
    wheel = build.build_wheel()
    assert time.perf_counter() - t0 < 30
    assert wheel.exists() and "+loopcpp." in wheel.name
    key = build.build_key(build.BASE_CMAKE_ARGS)
    assert key in str(wheel)


def test_installed_llama_cpp_is_the_patched_build():
    import importlib.metadata

    version = importlib.metadata.version("llama-cpp-python")
    assert version == build.local_version(build.build_key(build.BASE_CMAKE_ARGS))
    from loopcpp import engine

    assert engine.lib().llama_loop_default_params().count == 1


def test_stock_install_is_refused_at_import(tmp_path):
    """A stock llama-cpp-python makes `import loopcpp` fail with the fix in the message."""
    site = tmp_path / "site"
    dist = site / "llama_cpp_python-0.3.36.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: llama_cpp_python\nVersion: 0.3.36\n"
    )
    repo = Path(__file__).resolve().parent.parent
    code = "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import loopcpp"

    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(site), str(repo)], capture_output=True, text=True, env=env
    )
    assert proc.returncode != 0
    assert "stock build" in proc.stderr and "loopcpp.build wheel --install" in proc.stderr
