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


# -- backends: cache keys, generated flags, missing toolchains --------------


def test_cpu_backend_keeps_the_plain_key():
    """The CPU backend adds no flag, so the cached CPU wheel (and main's dev build) stay valid."""
    assert build.backend_cmake_args("cpu") == []
    plain = build.build_key(build.BASE_CMAKE_ARGS)
    assert build.build_key(build.BASE_CMAKE_ARGS + build.backend_cmake_args("cpu")) == plain
    assert build.build_dir_name("cpu") == "build"


def test_each_backend_has_its_own_key_and_build_folder():
    keys = {
        build.build_key(build.BASE_CMAKE_ARGS + build.backend_cmake_args(b))
        for b in build.BACKENDS
    }
    assert len(keys) == len(build.BACKENDS)
    cuda90 = build.build_key(build.BASE_CMAKE_ARGS + build.backend_cmake_args("cuda", "90"))
    cuda89 = build.build_key(build.BASE_CMAKE_ARGS + build.backend_cmake_args("cuda", "89"))
    assert cuda90 != cuda89  # the architecture is part of the key
    stock = {
        build.build_key(build.BASE_CMAKE_ARGS + build.backend_cmake_args(b), stock=True)
        for b in build.BACKENDS
    }
    assert len(stock) == len(build.BACKENDS) and not stock & keys
    assert {build.build_dir_name(b) for b in build.BACKENDS} == {
        "build", "build-vulkan", "build-cuda", "build-metal"
    }


def test_backend_flags():
    assert build.backend_cmake_args("vulkan") == ["-DGGML_VULKAN=ON"]
    assert build.backend_cmake_args("cuda", "90") == [
        "-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90", "-DGGML_CUDA_FA_ALL_QUANTS=OFF"
    ]
    assert "-DCMAKE_CUDA_ARCHITECTURES=native" in build.backend_cmake_args("cuda")
    assert "-DCMAKE_CUDA_ARCHITECTURES=86;89-real" in build.backend_cmake_args("cuda", "86;89-real")
    assert build.backend_cmake_args("metal") == ["-DGGML_METAL=ON", "-DGGML_METAL_EMBED_LIBRARY=ON"]
    for b in build.BACKENDS:  # nothing ever turns llama.cpp's Metal default off on macOS
        assert not any("GGML_METAL=OFF" in f for f in build.backend_cmake_args(b))
    with pytest.raises(build.BuildError, match="unknown backend 'rocm'"):
        build.backend_cmake_args("rocm")
    with pytest.raises(build.BuildError, match="--cuda-arch goes with --backend cuda"):
        build.backend_cmake_args("vulkan", "90")
    with pytest.raises(build.BuildError, match="not a CMake CUDA architecture"):
        build.backend_cmake_args("cuda", "sm_90; rm -rf /")


def _no_system(monkeypatch, tmp_path):
    """No system toolchain visible: only what a test puts in tmp_path."""
    monkeypatch.setenv("LOOPCPP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "VULKAN_SYSTEM_PREFIXES", (tmp_path / "sys",))
    monkeypatch.setattr(build, "VULKAN_LIB_DIRS", (tmp_path / "sys" / "lib",))
    monkeypatch.setattr(build, "CUDA_DEFAULT_ROOTS", (tmp_path / "nocuda",))


def _fake_vulkan(prefix: Path, symbols=build.VULKAN_REQUIRED_SYMBOLS, version=363) -> None:
    inc = prefix / "include" / "vulkan"
    inc.mkdir(parents=True)
    body = "".join(f"#define {s} 1\n" for s in symbols)
    (inc / "vulkan_core.h").write_text(f"#define VK_HEADER_VERSION {version}\n{body}")
    (inc / "vulkan.hpp").write_text("\n")
    spirv = prefix / "share" / "cmake" / "SPIRV-Headers"
    spirv.mkdir(parents=True)
    (spirv / "SPIRV-HeadersConfig.cmake").write_text("\n")
    (prefix / "lib").mkdir(exist_ok=True)
    (prefix / "lib" / "libvulkan.so").write_text("")
    (prefix / "bin").mkdir(exist_ok=True)
    (prefix / "bin" / "glslc").write_text("")


def test_vulkan_missing_glslc_is_named(monkeypatch, tmp_path):
    _no_system(monkeypatch, tmp_path)
    with pytest.raises(build.ToolchainError, match="needs glslc .*apt-get install glslc"):
        build.toolchain_cmake_args("vulkan", env={}, which=lambda name: None)


def test_vulkan_headers_too_old_or_absent(monkeypatch, tmp_path):
    _no_system(monkeypatch, tmp_path)
    glslc = lambda name: "/bin/glslc" if name == "glslc" else None  # noqa: E731
    with pytest.raises(build.ToolchainError, match="apt-get install libvulkan-dev"):
        build.toolchain_cmake_args("vulkan", env={}, which=glslc)
    # Debian 12's headers: found, named with their version, and the fix is the deps script
    _fake_vulkan(tmp_path / "sys", symbols=("VK_EXT_layer_settings",), version=239)
    with pytest.raises(build.ToolchainError) as e:
        build.toolchain_cmake_args("vulkan", env={}, which=glslc)
    msg = str(e.value)
    assert "VK_HEADER_VERSION 239" in msg and "INTERNALLY_SYNCHRONIZED" in msg
    assert "scripts/vulkan_deps.sh" in msg and str(tmp_path / "cache") in msg


def test_vulkan_flags_point_at_the_cache_headers(monkeypatch, tmp_path):
    """scripts/vulkan_deps.sh's headers (in the cache) win over old system ones."""
    _no_system(monkeypatch, tmp_path)
    _fake_vulkan(tmp_path / "sys", symbols=(), version=239)
    deps = tmp_path / "cache" / "vulkan-deps" / "usr"
    _fake_vulkan(deps)
    flags = build.toolchain_cmake_args("vulkan", env={}, which=lambda n: f"/usr/bin/{n}")
    assert flags == [
        f"-DVulkan_INCLUDE_DIR={deps / 'include'}",
        f"-DVulkan_LIBRARY={tmp_path / 'sys' / 'lib' / 'libvulkan.so'}",
        "-DVulkan_GLSLC_EXECUTABLE=/usr/bin/glslc",
        f"-DSPIRV-Headers_DIR={deps / 'share' / 'cmake' / 'SPIRV-Headers'}",
    ]
    # a Vulkan SDK comes first, with its own glslc
    sdk = tmp_path / "sdk"
    _fake_vulkan(sdk)
    flags = build.toolchain_cmake_args("vulkan", env={"VULKAN_SDK": str(sdk)}, which=lambda n: None)
    assert f"-DVulkan_INCLUDE_DIR={sdk / 'include'}" in flags
    assert f"-DVulkan_GLSLC_EXECUTABLE={sdk / 'bin' / 'glslc'}" in flags


def _fake_cuda(root: Path, cublas: bool = True) -> Path:
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    if cublas:
        (root / "lib64").mkdir()
        (root / "lib64" / "libcublas.so.13").write_text("")
        (root / "include").mkdir()
        (root / "include" / "cublas_v2.h").write_text("")
    return nvcc


def test_cuda_missing_nvcc_cublas_or_arch(monkeypatch, tmp_path):
    _no_system(monkeypatch, tmp_path)
    with pytest.raises(build.ToolchainError, match="needs nvcc"):
        build.toolchain_cmake_args("cuda", "90", env={}, which=lambda n: None)
    nvcc = _fake_cuda(tmp_path / "cuda", cublas=False)
    env = {"CUDA_PATH": str(tmp_path / "cuda")}
    with pytest.raises(build.ToolchainError, match=r"needs cuBLAS \(libcublas and cublas_v2.h\)"):
        build.toolchain_cmake_args("cuda", "90", env=env, which=lambda n: None)
    shutil.rmtree(tmp_path / "cuda")
    nvcc = _fake_cuda(tmp_path / "cuda")
    with pytest.raises(build.ToolchainError, match="--cuda-arch native needs the GPU"):
        build.toolchain_cmake_args("cuda", None, env=env, which=lambda n: None)
    flags = build.toolchain_cmake_args("cuda", "90", env=env, which=lambda n: None)
    assert flags == [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCUDAToolkit_ROOT={tmp_path / 'cuda'}"]


def test_metal_needs_macos_and_xcode():
    none = lambda n: None  # noqa: E731
    with pytest.raises(build.ToolchainError, match="macOS only .*this is linux"):
        build.toolchain_cmake_args("metal", platform="linux", which=none)
    with pytest.raises(build.ToolchainError, match="xcrun not found.*xcode-select --install"):
        build.toolchain_cmake_args("metal", platform="darwin", which=none)
    failing = lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "no sdk")  # noqa: E731
    with pytest.raises(build.ToolchainError, match="macOS SDK"):
        build.toolchain_cmake_args(
            "metal", platform="darwin", which=lambda n: "/usr/bin/xcrun", run=failing
        )


class _Recorder:
    """Stands in for subprocess.run in the cmake steps: records the commands, runs nothing."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, cmd, *a, **k):
        self.calls.append([str(c) for c in cmd])
        return subprocess.CompletedProcess(cmd, 0, "", "")


def _configure_only(monkeypatch, tmp_path, where: list[str]) -> _Recorder:
    tree = tmp_path / "llama.cpp"
    tree.mkdir()
    monkeypatch.setattr(build, "dev_tree", lambda: tree)
    monkeypatch.setattr(build, "toolchain_cmake_args", lambda backend, arch=None: where)
    rec = _Recorder()
    monkeypatch.setattr(build.subprocess, "run", rec)
    return rec


def test_cuda_configure_command_line(monkeypatch, tmp_path):
    """Configure-only: the cmake command line of a CUDA dev build (no toolkit needed)."""
    where = ["-DCMAKE_CUDA_COMPILER=/opt/cuda/bin/nvcc", "-DCUDAToolkit_ROOT=/opt/cuda"]
    rec = _configure_only(monkeypatch, tmp_path, where)
    lib = build.dev_lib(backend="cuda", cuda_arch="90")
    tree = tmp_path / "llama.cpp"
    assert lib == tree / "build-cuda" / "bin"
    configure, compile_ = rec.calls
    assert configure[:5] == ["cmake", "-S", str(tree), "-B", str(tree / "build-cuda")]
    for flag in ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90",
                 "-DGGML_CUDA_FA_ALL_QUANTS=OFF", "-DBUILD_SHARED_LIBS=ON", *where]:
        assert flag in configure
    assert compile_[:3] == ["cmake", "--build", str(tree / "build-cuda")]
    assert compile_[-2:] == ["--target", "llama"]
    # same flags again: no second configure; another architecture: configure again
    (tree / "build-cuda" / "CMakeCache.txt").write_text(f"CMAKE_C_FLAGS={build.COMPILER_FLAGS}\n")
    build.dev_lib(backend="cuda", cuda_arch="90")
    assert [c[1] for c in rec.calls[2:]] == ["--build"]
    build.dev_lib(backend="cuda", cuda_arch="89")
    assert "-DCMAKE_CUDA_ARCHITECTURES=89" in rec.calls[3]


def test_metal_configure_command_line(monkeypatch, tmp_path):
    """Configure-only: a Metal dev build turns Metal on and never off (macOS default)."""
    rec = _configure_only(monkeypatch, tmp_path, [])
    lib = build.dev_lib(backend="metal", tools=True)
    tree = tmp_path / "llama.cpp"
    assert lib == tree / "build-metal" / "bin"
    configure = rec.calls[0]
    assert "-DGGML_METAL=ON" in configure and "-DGGML_METAL_EMBED_LIBRARY=ON" in configure
    assert not any("GGML_METAL=OFF" in c for c in configure)
    assert "llama-server" in rec.calls[1]
    # the CPU backend on macOS: no backend flag at all, so llama.cpp's Metal default stays
    build.dev_lib(backend="cpu")
    assert not any("METAL" in c for c in rec.calls[2])
    assert rec.calls[2][4] == str(tree / "build")


def test_toolchain_is_checked_before_any_build(monkeypatch, tmp_path):
    """`loopcpp.build wheel --backend metal` on Linux fails at once, naming the SDK."""
    monkeypatch.setenv("LOOPCPP_CACHE", str(tmp_path))
    rec = _Recorder()
    monkeypatch.setattr(build.subprocess, "run", rec)
    if sys.platform == "darwin":
        pytest.skip("Metal is available on macOS")
    for cmd in (["wheel"], ["dev"], ["stock"]):
        assert build.main([*cmd, "--backend", "metal"]) == 1
    assert rec.calls == []  # neither pip nor cmake nor git ran
    assert not (tmp_path / "src").exists()


def test_cached_wheel_per_backend(monkeypatch, tmp_path):
    monkeypatch.setenv("LOOPCPP_CACHE", str(tmp_path))
    key = build.build_key(build.BASE_CMAKE_ARGS + build.backend_cmake_args("vulkan"))
    (tmp_path / "wheels" / key).mkdir(parents=True)
    wheel = tmp_path / "wheels" / key / f"llama_cpp_python-{build.local_version(key)}-x.whl"
    wheel.write_text("")
    assert build.build_wheel(backend="vulkan") == wheel


def test_cli_build_backend_error():
    """`loopcpp build` passes --backend through and exits non-zero with the message."""
    if sys.platform == "darwin":
        pytest.skip("Metal is available on macOS")
    from click.testing import CliRunner

    from loopcpp.cli import cli

    res = CliRunner().invoke(cli, ["build", "dev", "--backend", "metal"])
    assert res.exit_code == 1
    assert "macOS only" in res.output
    res = CliRunner().invoke(cli, ["build", "dev", "--backend", "rocm"])
    assert res.exit_code == 2 and "invalid choice" in res.output
