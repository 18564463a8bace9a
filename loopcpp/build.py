"""Build the patched llama-cpp-python wheel (and llama.cpp's own tools) from the
pinned source release plus ``cpp_patch/*.patch``.

Everything is cached under ``$LOOPCPP_CACHE`` (default ``~/.cache/loopcpp``),
keyed by the hash of (source sha256, patch contents, build flags), so an
unchanged patch series never rebuilds:

- ``src/llama_cpp_python-0.3.36.tar.gz``  the verified source release
- ``wheels/<key>/*.whl``                  patched wheels
- ``stock/<key>/lib``                     an unpatched libllama for side-by-side checks
- ``dev/``                                a persistent, incrementally rebuilt patched tree
  (``dev/llama.cpp/build`` for the CPU backend, ``build-<backend>`` for the others)
- ``vulkan-deps/``                         newer Vulkan/SPIR-V headers (scripts/vulkan_deps.sh)

Every build takes ``--backend cpu|vulkan|cuda|metal`` (:data:`BACKENDS`). The
backend's ggml flags (:func:`backend_cmake_args`) are part of the cache key,
the CPU backend adds none, so the CPU key is the one of a plain build; where
the toolchain was found (:func:`toolchain_cmake_args`) is not. A missing
toolchain or SDK is reported by name before cmake runs.

Run ``python -m loopcpp.build --help``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
#: Bump when the builder's own steps change the produced wheel.
BUILDER_VERSION = "2"
#: Local version label of the patched wheel: 0.3.36+loopcpp.<series>.<hash8>
SERIES = "1"

#: The patch series as package data: in a checkout ``loopcpp/_data/cpp_patch`` is a
#: symlink to ``cpp_patch/`` (the files in git), in an installed wheel a copy of it.
PATCH_DIR = Path(__file__).resolve().parent / "_data" / "cpp_patch"

#: CMake flags of every build: CPU only, no multimodal library.
BASE_CMAKE_ARGS = ["-DLLAVA_BUILD=OFF", "-DLLAMA_CURL=OFF"]
#: Compiler flags of every build (CFLAGS/CXXFLAGS, which CMake takes as its initial C/C++
#: flags): no AMX. ggml's native build uses AMX tiles wherever the CPU advertises them,
#: and some virtual machines (Firecracker, seen here) advertise AMX without enabling its
#: register state, so the first matrix product dies with SIGILL/SIGSEGV at ldtilecfg.
#: Explicit -mno-* flags win over -march=native whatever their order; AVX-512 stays on.
COMPILER_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def build_env() -> dict[str, str]:
    """The environment of every compile: this process's, with COMPILER_FLAGS added."""
    env = dict(os.environ)
    for var in ("CFLAGS", "CXXFLAGS"):
        env[var] = f"{env.get(var, '')} {COMPILER_FLAGS}".strip()
    return env


#: The ggml backends a build can have; "cpu" is the default everywhere.
BACKENDS = ("cpu", "vulkan", "cuda", "metal")

#: Symbols of vulkan_core.h that the vendored ggml-vulkan uses unconditionally;
#: headers without them (Debian 12's 1.3.239, Debian 13's 1.4.309) cannot build
#: it, 1.4.363 (Debian sid) can. scripts/vulkan_deps.sh unpacks such headers.
VULKAN_REQUIRED_SYMBOLS = (
    "VK_KHR_INTERNALLY_SYNCHRONIZED_QUEUES_EXTENSION_NAME",
    "VK_VALVE_shader_mixed_float_dot_product",
    "VK_NV_cooperative_matrix_decode_vector",
    "VK_EXT_layer_settings",
)


#: Where the system's Vulkan headers/SPIR-V headers and loader are looked for (after
#: $VULKAN_SDK and the cache's vulkan-deps), and the CUDA toolkit (after $CUDAToolkit_ROOT,
#: $CUDA_PATH, $CUDA_HOME and nvcc's own folder).
VULKAN_SYSTEM_PREFIXES = (Path("/usr/local"), Path("/usr"))
VULKAN_LIB_DIRS = (
    Path("/usr/lib/x86_64-linux-gnu"),
    Path("/usr/lib/aarch64-linux-gnu"),
    Path("/usr/lib64"),
    Path("/usr/lib"),
    Path("/usr/local/lib"),
)
CUDA_DEFAULT_ROOTS = (Path("/usr/local/cuda"), Path("/usr"))


class BuildError(RuntimeError):
    """A build step failed; the message says which and what to do."""


class ToolchainError(BuildError):
    """The backend's compiler, SDK or headers are missing (found before cmake runs)."""


def backend_cmake_args(backend: str = "cpu", cuda_arch: str | None = None) -> list[str]:
    """The ggml flags that select ``backend``: part of the cache key.

    ``cpu`` adds nothing, so its key is that of a plain build; on macOS llama.cpp
    (and llama-cpp-python, which forces it) builds Metal in by default, and no
    backend here turns it off. ``cuda`` builds one architecture (``cuda_arch``,
    default ``native``: the GPU of the building machine) without the flash-attention
    kernels for every quantisation pair (``GGML_CUDA_FA_ALL_QUANTS=OFF``).
    """
    if backend not in BACKENDS:
        raise BuildError(f"unknown backend {backend!r}; pick one of {', '.join(BACKENDS)}")
    if cuda_arch is not None and backend != "cuda":
        raise BuildError("--cuda-arch goes with --backend cuda")
    if backend == "cpu":
        return []
    if backend == "vulkan":
        return ["-DGGML_VULKAN=ON"]
    if backend == "cuda":
        arch = cuda_arch or "native"
        one = r"[0-9]+[a-z]?(-(real|virtual))?"
        if not re.fullmatch(rf"native|all|all-major|{one}(;{one})*", arch):
            raise BuildError(
                f"--cuda-arch {arch!r} is not a CMake CUDA architecture "
                "(e.g. 90, 89, 86;80, native)"
            )
        return [
            "-DGGML_CUDA=ON",
            f"-DCMAKE_CUDA_ARCHITECTURES={arch}",
            "-DGGML_CUDA_FA_ALL_QUANTS=OFF",
        ]
    return ["-DGGML_METAL=ON", "-DGGML_METAL_EMBED_LIBRARY=ON"]  # metal


def _vulkan_header_version(core_h: Path) -> str:
    m = re.search(r"#define\s+VK_HEADER_VERSION\s+(\d+)", core_h.read_text(errors="replace"))
    return m.group(1) if m else "?"


def _vulkan_toolchain(env: dict[str, str], which) -> list[str]:
    sdk = Path(env["VULKAN_SDK"]) if env.get("VULKAN_SDK") else None
    deps = cache_dir() / "vulkan-deps" / "usr"
    # glslc: the shader compiler ggml-vulkan's build runs
    glslc = None
    if sdk and (sdk / "bin" / "glslc").exists():
        glslc = str(sdk / "bin" / "glslc")
    glslc = glslc or which("glslc")
    if not glslc:
        raise ToolchainError(
            "the Vulkan backend needs glslc (the GLSL-to-SPIR-V shader compiler), not found on "
            "PATH: `apt-get install glslc` (Debian/Ubuntu), or install the LunarG Vulkan SDK "
            "and set VULKAN_SDK"
        )
    # headers: the SDK's, then scripts/vulkan_deps.sh's, then the system's
    prefixes = [p for p in (sdk, deps, *VULKAN_SYSTEM_PREFIXES) if p is not None]
    seen: list[str] = []
    prefix = None
    for pre in prefixes:
        core = pre / "include" / "vulkan" / "vulkan_core.h"
        if not core.exists() or not (pre / "include" / "vulkan" / "vulkan.hpp").exists():
            continue
        text = core.read_text(errors="replace")
        missing = [s for s in VULKAN_REQUIRED_SYMBOLS if s not in text]
        if not missing:
            prefix = pre
            break
        seen.append(f"{pre / 'include'} (VK_HEADER_VERSION {_vulkan_header_version(core)}, "
                    f"lacks {missing[0]})")
    if prefix is None:
        found = ("; found " + ", ".join(seen)) if seen else ""
        raise ToolchainError(
            "the Vulkan backend needs Vulkan headers (vulkan_core.h and vulkan.hpp) recent enough "
            f"for the vendored ggml-vulkan (1.4.363 works){found}. Run "
            f"`bash scripts/vulkan_deps.sh` (unpacks newer Debian headers into {deps.parent}), "
            "or install the LunarG Vulkan SDK and set VULKAN_SDK"
            + ("" if seen else "; Debian/Ubuntu: apt-get install libvulkan-dev")
        )
    # SPIR-V headers (a CMake package): next to the Vulkan headers first
    spirv = None
    for pre in [prefix] + [p for p in prefixes if p != prefix]:
        for sub in ("share/cmake/SPIRV-Headers", "lib/cmake/SPIRV-Headers",
                    "lib/x86_64-linux-gnu/cmake/SPIRV-Headers"):
            if (pre / sub / "SPIRV-HeadersConfig.cmake").exists():
                spirv = pre / sub
                break
        if spirv:
            break
    if spirv is None:
        raise ToolchainError(
            "the Vulkan backend needs SPIRV-Headers (its CMake package SPIRV-HeadersConfig.cmake): "
            "`apt-get install spirv-headers`, `bash scripts/vulkan_deps.sh`, or the Vulkan SDK"
        )
    # the loader library to link against
    lib = None
    lib_dirs = ([sdk / "lib"] if sdk else []) + list(VULKAN_LIB_DIRS)
    for d in lib_dirs:
        for name in ("libvulkan.so", "libvulkan.so.1", "libvulkan.dylib", "libvulkan.1.dylib"):
            if (d / name).exists():
                lib = d / name
                break
        if lib:
            break
    if lib is None:
        raise ToolchainError(
            "the Vulkan backend needs the Vulkan loader (libvulkan): "
            "`apt-get install libvulkan-dev` (plus a driver to run on: mesa-vulkan-drivers), "
            "or the Vulkan SDK"
        )
    return [
        f"-DVulkan_INCLUDE_DIR={prefix / 'include'}",
        f"-DVulkan_LIBRARY={lib}",
        f"-DVulkan_GLSLC_EXECUTABLE={glslc}",
        f"-DSPIRV-Headers_DIR={spirv}",
    ]


def _cuda_toolchain(env: dict[str, str], which, cuda_arch: str | None) -> list[str]:
    roots = [Path(env[k]) for k in ("CUDAToolkit_ROOT", "CUDA_PATH", "CUDA_HOME") if env.get(k)]
    nvcc = None
    if env.get("CUDACXX") and Path(env["CUDACXX"]).exists():
        nvcc = Path(env["CUDACXX"])
    for r in roots:
        if nvcc is None and (r / "bin" / "nvcc").exists():
            nvcc = r / "bin" / "nvcc"
    if nvcc is None and which("nvcc"):
        nvcc = Path(which("nvcc"))
    for r in CUDA_DEFAULT_ROOTS:
        if nvcc is None and (r / "bin" / "nvcc").exists():
            nvcc = r / "bin" / "nvcc"
    if nvcc is None:
        raise ToolchainError(
            "the CUDA backend needs nvcc (the CUDA toolkit's compiler), not found on PATH nor in "
            "CUDAToolkit_ROOT/CUDA_PATH or /usr/local/cuda: install the CUDA toolkit (with "
            "cuBLAS) and put its bin/ on PATH"
        )
    roots += [nvcc.parent.parent, nvcc.resolve().parent.parent, *CUDA_DEFAULT_ROOTS]
    root = None
    for r in roots:
        libs = [r / "lib64", r / "lib", r / "lib" / "x86_64-linux-gnu", r / "lib" / "x64",
                *sorted((r / "targets").glob("*/lib"))]
        incs = [r / "include", *sorted((r / "targets").glob("*/include"))]
        has_lib = any(list(d.glob("libcublas.so*")) or (d / "cublas.lib").exists()
                      for d in libs if d.is_dir())
        has_inc = any((d / "cublas_v2.h").exists() for d in incs)
        if has_lib and has_inc:
            root = r
            break
    if root is None:
        raise ToolchainError(
            f"the CUDA backend needs cuBLAS (libcublas and cublas_v2.h), not found with nvcc at "
            f"{nvcc} (looked in {', '.join(str(r) for r in dict.fromkeys(roots))}): install the "
            "toolkit's cuBLAS (e.g. the distribution's libcublas-dev / cuda-libraries-dev "
            "package) or set CUDAToolkit_ROOT"
        )
    if (cuda_arch or "native") == "native" and not which("nvidia-smi"):
        raise ToolchainError(
            "--cuda-arch native needs the GPU on this machine (nvidia-smi not found); name the "
            "architecture instead, e.g. --cuda-arch 90 (H100/H200), 89 (RTX 40xx), 86 (RTX 30xx)"
        )
    return [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCUDAToolkit_ROOT={root}"]


def _metal_toolchain(platform: str, which, run) -> list[str]:
    if platform != "darwin":
        raise ToolchainError(
            f"the Metal backend builds on macOS only (this is {platform}); pick --backend cpu, "
            "vulkan or cuda"
        )
    if not which("xcrun"):
        raise ToolchainError(
            "the Metal backend needs Xcode or its Command Line Tools (xcrun not found): "
            "`xcode-select --install`"
        )
    proc = run(["xcrun", "--sdk", "macosx", "--show-sdk-path"], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise ToolchainError(
            "the Metal backend needs the macOS SDK (`xcrun --sdk macosx --show-sdk-path` failed): "
            "install Xcode or run `xcode-select --install`"
        )
    return []


def toolchain_cmake_args(
    backend: str,
    cuda_arch: str | None = None,
    *,
    platform: str | None = None,
    env: dict[str, str] | None = None,
    which=shutil.which,
    run=subprocess.run,
) -> list[str]:
    """Check the backend's toolchain; the flags that point cmake at it (not in the key).

    Raises :class:`ToolchainError` naming what is missing, before any cmake run.
    """
    platform = platform or sys.platform
    env = dict(os.environ) if env is None else env
    if backend == "vulkan":
        return _vulkan_toolchain(env, which)
    if backend == "cuda":
        return _cuda_toolchain(env, which, cuda_arch)
    if backend == "metal":
        return _metal_toolchain(platform, which, run)
    if backend != "cpu":
        raise BuildError(f"unknown backend {backend!r}; pick one of {', '.join(BACKENDS)}")
    if platform == "darwin":
        _log("macOS: llama.cpp builds Metal in by default and this build keeps it "
             "(n_gpu_layers=0 runs on the CPU)")
    return []


def build_dir_name(backend: str = "cpu") -> str:
    """The dev tree's build folder of a backend: ``build`` (CPU), ``build-<backend>``."""
    backend_cmake_args(backend)  # validates the name
    return "build" if backend == "cpu" else f"build-{backend}"


def cache_dir() -> Path:
    """``$LOOPCPP_CACHE`` or ``~/.cache/loopcpp``: every cache of the project lives below it."""
    env = os.environ.get("LOOPCPP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loopcpp"


def _log(msg: str) -> None:
    print(f"[loopcpp.build] {msg}", file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def patches(patch_dir: Path = PATCH_DIR) -> list[Path]:
    """The patch series, in order."""
    found = sorted(patch_dir.glob("*.patch"))
    if not found:
        raise BuildError(f"no patches found in {patch_dir}")
    return found


def build_key(cmake_args: list[str], patch_dir: Path = PATCH_DIR, stock: bool = False) -> str:
    """Hash of everything that determines the built artefact."""
    h = hashlib.sha256()
    h.update(f"{SDIST_SHA256}\n{BUILDER_VERSION}\n{SERIES}\n{COMPILER_FLAGS}\n".encode())
    h.update(("\0".join(cmake_args) + "\n").encode())
    if stock:
        h.update(b"stock\n")
    else:
        for p in patches(patch_dir):
            h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def local_version(key: str) -> str:
    return f"{VERSION}+loopcpp.{SERIES}.{key[:8]}"


# -- source ----------------------------------------------------------------


def source_archive() -> Path:
    """The verified source release, downloaded with pip on first use."""
    dest = cache_dir() / "src" / SDIST
    if dest.exists() and _sha256(dest) == SDIST_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{PACKAGE}=={VERSION} --hash=sha256:{SDIST_SHA256}\n")
        _log(f"downloading {PACKAGE}=={VERSION} source release with pip")
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--require-hashes",
                "-r",
                str(req),
                "-d",
                tmp,
            ],
            capture_output=True,
            text=True,
        )
        got = Path(tmp) / SDIST
        if proc.returncode != 0 and not got.exists():
            raise BuildError(
                f"pip could not download {PACKAGE}=={VERSION}:\n{proc.stderr[-2000:]}\n"
                "Check that PyPI is reachable, or place the file at " + str(dest)
            )
        digest = _sha256(got)
        if digest != SDIST_SHA256:
            raise BuildError(
                f"{SDIST} has sha256 {digest}, expected {SDIST_SHA256}: the download is corrupt "
                "or the release changed; delete it and retry"
            )
        os.replace(got, dest)
    return dest


def _extract(archive: Path, into: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / SDIST.removesuffix(".tar.gz")


def apply_patches(llama_cpp_dir: Path, patch_dir: Path = PATCH_DIR) -> None:
    """Apply the series in order; a hunk that does not apply stops with the patch and file."""
    for p in patches(patch_dir):
        check = subprocess.run(
            ["git", "apply", "--check", "--verbose", str(p)],
            cwd=llama_cpp_dir,
            capture_output=True,
            text=True,
        )
        if check.returncode != 0:
            failed = [ln for ln in check.stderr.splitlines() if ln.startswith("error")]
            raise BuildError(
                f"patch {p.name} does not apply to the vendored llama.cpp:\n  "
                + "\n  ".join(failed or check.stderr.splitlines()[-5:])
                + f"\nRebase {p.name} on llama-cpp-python {VERSION} (see cpp_patch/README.md)"
            )
        subprocess.run(["git", "apply", str(p)], cwd=llama_cpp_dir, check=True)


def vendored_llama_cpp() -> Path:
    """The patched llama.cpp tree of the source release (converter, gguf-py, tools)."""
    root = cache_dir() / "src" / f"patched-{build_key(BASE_CMAKE_ARGS)}"
    tree = root / SDIST.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    if tree.is_dir():
        return tree
    archive = source_archive()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".extract-"))
    try:
        src = _extract(archive, tmp)
        apply_patches(src / "vendor" / "llama.cpp")
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return tree


# -- wheel -----------------------------------------------------------------


def _stamp_version(src: Path, version: str) -> None:
    init = src / "llama_cpp" / "__init__.py"
    text = init.read_text()
    stamped = text.replace(f'__version__ = "{VERSION}"', f'__version__ = "{version}"')
    if stamped == text:
        raise BuildError(f"could not find the version string in {init}")
    init.write_text(stamped)


def build_wheel(
    extra_cmake_args: list[str] | None = None,
    force: bool = False,
    backend: str = "cpu",
    cuda_arch: str | None = None,
) -> Path:
    """The patched wheel, from the cache when the key matches."""
    cmake_args = BASE_CMAKE_ARGS + backend_cmake_args(backend, cuda_arch) + list(
        extra_cmake_args or []
    )
    key = build_key(cmake_args)
    out_dir = cache_dir() / "wheels" / key
    cached = sorted(out_dir.glob("*.whl")) if out_dir.is_dir() else []
    if cached and not force:
        _log(f"cached wheel {cached[0].name} (key {key})")
        return cached[0]

    where = toolchain_cmake_args(backend, cuda_arch)
    archive = source_archive()
    work = Path(tempfile.mkdtemp(prefix="loopcpp-build-"))
    try:
        src = _extract(archive, work)
        apply_patches(src / "vendor" / "llama.cpp")
        _stamp_version(src, local_version(key))
        env = build_env()
        env["CMAKE_ARGS"] = " ".join(cmake_args + where)
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        _log(f"building wheel {local_version(key)} (a few minutes; flags: {env['CMAKE_ARGS']})")
        dist = work / "dist"
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(src)],
            env=env,
        )
        wheels = sorted(dist.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise BuildError("pip wheel failed; the compiler output is above")
        tmp_out = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".wheel-"))
        shutil.copy2(wheels[0], tmp_out / wheels[0].name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp_out, out_dir)
        _log(f"built {out_dir / wheels[0].name}")
        return out_dir / wheels[0].name
    finally:
        shutil.rmtree(work, ignore_errors=True)


def install_wheel(wheel: Path, python: str = sys.executable) -> None:
    """Install the wheel unless that exact version is already installed."""
    wanted = wheel.name.split("-")[1]
    probe = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('llama-cpp-python'))"],
        capture_output=True,
        text=True,
    )
    if probe.returncode == 0 and probe.stdout.strip() == wanted:
        _log(f"llama-cpp-python {wanted} already installed")
        return
    # the wheel itself without dependencies, then llama-cpp-python's runtime dependencies
    subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--force-reinstall", "-q", str(wheel)],
        check=True,
    )
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "numpy", "typing-extensions", "diskcache", "jinja2"],
        check=True,
    )


# -- libraries built with cmake (stock reference, dev loop, C++ tools) ------


def configure_command(src: Path, build: Path, cmake_args: list[str]) -> list[str]:
    """The cmake configure command line of a stock, dev or tools build."""
    return [
        "cmake",
        "-S",
        str(src),
        "-B",
        str(build),
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=ON",
        "-DLLAMA_BUILD_TESTS=OFF",
        f"-DCMAKE_C_FLAGS={COMPILER_FLAGS}",
        f"-DCMAKE_CXX_FLAGS={COMPILER_FLAGS}",
        *cmake_args,
    ]


def _cmake_build(
    src: Path, build: Path, targets: list[str], cmake_args: list[str], reconfigure: bool = False
) -> None:
    stamp = build / ".loopcpp-configure"
    wanted = "\n".join(cmake_args)
    if stamp.exists() and stamp.read_text() != wanted:
        reconfigure = True  # another backend's or tool's flags: configure again
    cache = build / "CMakeCache.txt"
    # a folder configured before COMPILER_FLAGS existed is configured again
    stale = cache.exists() and COMPILER_FLAGS not in cache.read_text(errors="replace")
    if reconfigure or stale or not cache.exists():
        proc = subprocess.run(
            configure_command(src, build, cmake_args), stdout=subprocess.DEVNULL
        )
        if proc.returncode != 0:
            raise BuildError(f"cmake configure of {build} failed (output above)")
        build.mkdir(parents=True, exist_ok=True)
        stamp.write_text(wanted)
    jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 2)
    proc = subprocess.run(["cmake", "--build", str(build), "-j", jobs, "--target", *targets])
    if proc.returncode != 0:
        raise BuildError(f"cmake build of {', '.join(targets)} in {build} failed (output above)")


def stock_lib(backend: str = "cpu", cuda_arch: str | None = None) -> Path:
    """An unpatched libllama built from the same source and flags (LLAMA_CPP_LIB_PATH dir)."""
    flags = backend_cmake_args(backend, cuda_arch)
    key = build_key(BASE_CMAKE_ARGS + flags, stock=True)
    root = cache_dir() / "stock" / key
    lib = root / "build" / "bin"
    if (lib / "libllama.so").exists() or (lib / "libllama.dylib").exists():
        return lib
    where = toolchain_cmake_args(backend, cuda_arch)
    archive = source_archive()
    root.mkdir(parents=True, exist_ok=True)
    src = root / "src" / SDIST.removesuffix(".tar.gz")
    if not src.exists():
        _extract(archive, root / "src")
    _log(f"building the stock (unpatched) libllama ({backend}) for side-by-side checks")
    args = ["-DLLAMA_CURL=OFF", *flags, *where]
    _cmake_build(src / "vendor" / "llama.cpp", root / "build", ["llama"], args)
    return lib


def fixture_tool() -> Path:
    """llama.cpp's own ``test-llama-archs`` (unpatched, the stock build's source and folder).

    It writes a small random GGUF of any architecture it knows (``-a ARCH -s SEED -o DIR``):
    the tiny checkpoints of the architectures that have no transformers class
    (:func:`loopcpp.tiny.fixture_checkpoint`).
    """
    lib = stock_lib()
    tool = lib / "test-llama-archs"
    if tool.exists():
        return tool
    root = lib.parent.parent
    src = root / "src" / SDIST.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    _log("building llama.cpp's test-llama-archs (random tiny GGUFs of every architecture)")
    # the stock folder's own flags plus the tests: only common and the tool are new objects
    args = ["-DLLAMA_CURL=OFF", *backend_cmake_args("cpu"), "-DLLAMA_BUILD_TESTS=ON"]
    _cmake_build(src, root / "build", ["test-llama-archs"], args)
    return tool


def dev_tree() -> Path:
    """A persistent patched tree; re-applies the patches (as git changes) when they change."""
    root = cache_dir() / "dev"
    tree = root / "llama.cpp"
    if not tree.exists():
        archive = source_archive()
        tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".dev-"))
        src = _extract(archive, tmp)
        vendor = src / "vendor" / "llama.cpp"
        (vendor / ".git").unlink(missing_ok=True)
        git = ["git", "-c", "user.email=build@loopcpp", "-c", "user.name=loopcpp"]
        subprocess.run(git + ["init", "-q"], cwd=vendor, check=True)
        subprocess.run(git + ["add", "-A"], cwd=vendor, check=True)
        subprocess.run(git + ["commit", "-qm", "pristine"], cwd=vendor, check=True)
        subprocess.run(git + ["tag", "pristine"], cwd=vendor, check=True)
        root.mkdir(parents=True, exist_ok=True)
        os.replace(vendor, tree)
        shutil.rmtree(tmp, ignore_errors=True)
    stamp = tree / ".loopcpp-patches"
    key = build_key(BASE_CMAKE_ARGS)
    if not stamp.exists() or stamp.read_text() != key:
        # only files the patches touch change, so the cmake build stays incremental
        subprocess.run(["git", "reset", "-q", "--hard", "pristine"], cwd=tree, check=True)
        subprocess.run(["git", "clean", "-qfd", "--", "src", "include"], cwd=tree, check=True)
        apply_patches(tree)
        stamp.write_text(key)
    return tree


def dev_lib(
    tools: bool = False,
    extra_cmake_args: list[str] | None = None,
    rpc: bool = False,
    backend: str = "cpu",
    cuda_arch: str | None = None,
) -> Path:
    """Incrementally build the dev tree; returns the dir for LLAMA_CPP_LIB_PATH.

    ``rpc`` turns on llama.cpp's RPC backend (``-DGGML_RPC=ON``, re-running the
    configure step of an existing build) and also builds the ``ggml-rpc-server`` tool.
    Each ``backend`` has its own build folder (:func:`build_dir_name`) of the one tree.
    """
    flags = backend_cmake_args(backend, cuda_arch)
    where = toolchain_cmake_args(backend, cuda_arch)
    tree = dev_tree()
    targets = ["llama"] + (["llama-cli", "llama-completion", "llama-server"] if tools else [])
    cmake_args = ["-DLLAMA_CURL=OFF", *flags, *where, *(extra_cmake_args or [])]
    if rpc:
        targets.append("ggml-rpc-server")  # the rpc-server tool (its target name here)
        cmake_args.append("-DGGML_RPC=ON")
    reconfigure = rpc or bool(extra_cmake_args)  # a cached configure would ignore new flags
    build = tree / build_dir_name(backend)
    _cmake_build(tree, build, targets, cmake_args, reconfigure=reconfigure)
    return build / "bin"


def main(argv: list[str] | None = None, prog: str = "python -m loopcpp.build") -> int:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Build the patched llama-cpp-python wheel and llama.cpp tools (cached).",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    def backend_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--backend", choices=BACKENDS, default="cpu",
            help="ggml backend: cpu (default; on macOS it keeps llama.cpp's built-in Metal), "
            "vulkan (AMD/Intel/any Vulkan GPU), cuda (NVIDIA), metal (Apple)",
        )
        p.add_argument(
            "--cuda-arch", default=None, metavar="ARCH",
            help="with --backend cuda: CMAKE_CUDA_ARCHITECTURES, one architecture such as 90 "
            "or 89 (default: native, the GPU of this machine)",
        )

    w = sub.add_parser("wheel", help="build (or reuse) the patched wheel")
    backend_options(w)
    w.add_argument("--install", action="store_true", help="pip install it into this Python")
    w.add_argument("--force", action="store_true", help="rebuild even if cached")
    w.add_argument("--cmake-arg", action="append", default=[], help="extra CMake flag")
    st = sub.add_parser("stock", help="build the unpatched libllama; print its directory")
    backend_options(st)
    d = sub.add_parser("dev", help="incremental patched build; prints LLAMA_CPP_LIB_PATH")
    backend_options(d)
    d.add_argument("--tools", action="store_true", help="also build llama-cli and llama-server")
    d.add_argument(
        "--rpc", action="store_true", help="with the RPC backend (GGML_RPC=ON), and ggml-rpc-server"
    )
    sub.add_parser("source", help="print the patched llama.cpp source tree")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "wheel":
            wheel = build_wheel(
                args.cmake_arg, force=args.force, backend=args.backend, cuda_arch=args.cuda_arch
            )
            if args.install:
                install_wheel(wheel)
            print(wheel)
        elif args.cmd == "stock":
            print(stock_lib(args.backend, args.cuda_arch))
        elif args.cmd == "dev":
            print(dev_lib(tools=args.tools, rpc=args.rpc, backend=args.backend,
                          cuda_arch=args.cuda_arch))
        elif args.cmd == "source":
            print(vendored_llama_cpp())
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
