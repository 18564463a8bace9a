"""The libraries the project builds run on the machine that built them.

ggml's native build compiles AMX tile code wherever the CPU advertises AMX; on
virtual machines that advertise it without enabling its register state (seen
here: Firecracker) the first matrix product dies at ``ldtilecfg``. The builder
compiles with ``-mno-amx-*`` (loopcpp.build.COMPILER_FLAGS); this checks the
installed wheel's CPU backend holds no AMX tile instruction, and that the flags
reach every compile and the cache key.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from loopcpp import build


def _cpu_backend() -> Path:
    import llama_cpp

    lib = Path(llama_cpp.__file__).parent / "lib"
    found = sorted(lib.glob("libggml-cpu*.so*"))
    if not found:
        pytest.skip(f"no libggml-cpu in {lib}")
    return found[0]


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) not installed")
def test_installed_cpu_backend_has_no_amx_tile_instructions():
    text = subprocess.run(["objdump", "-d", str(_cpu_backend())], capture_output=True,
                          text=True, check=True).stdout
    assert "ldtilecfg" not in text, "the wheel was built with AMX: rebuild with loopcpp.build"


def test_compiler_flags_reach_every_compile_and_the_key(monkeypatch):
    monkeypatch.setenv("CFLAGS", "-O2")
    monkeypatch.delenv("CXXFLAGS", raising=False)
    env = build.build_env()
    assert env["CFLAGS"] == f"-O2 {build.COMPILER_FLAGS}"
    assert env["CXXFLAGS"] == build.COMPILER_FLAGS
    key = build.build_key(build.BASE_CMAKE_ARGS)
    monkeypatch.setattr(build, "COMPILER_FLAGS", "-mno-amx-tile")
    assert build.build_key(build.BASE_CMAKE_ARGS) != key
