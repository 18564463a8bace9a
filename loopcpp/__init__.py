"""loopcpp: training-free looped transformers for llama.cpp.

``import loopcpp`` is light: it refuses a stock llama-cpp-python, and imports
nothing else until a name is used, so that the command line can turn a Ctrl-C
during its start into a quiet exit; llama-cpp-python is loaded by
:func:`load`, and torch only by :mod:`loopcpp.reference`.
"""

import sys as _sys


def _abort_start(signum: int, frame: object) -> None:
    """SIGINT while the command line starts: its "Aborted!" and status 1, no traceback."""
    _sys.stderr.write("\nAborted!\n")
    raise SystemExit(1)


def _command_line_starting() -> bool:
    """True when this import is the start of ``python -m loopcpp`` or the ``loopcpp`` script
    (not of a program that imports loopcpp, nor of ``python -m loopcpp.<module>``)."""
    if _sys.argv[:1] == ["-m"]:  # runpy sets argv[0] to "-m" while it imports the package
        argv = list(getattr(_sys, "orig_argv", []))
        for i, arg in enumerate(argv[1:], 1):
            if arg == "-m":
                return argv[i + 1:i + 2] == ["loopcpp"]
            if arg.startswith("-m"):
                return arg == "-mloopcpp"
        return False
    name = _sys.argv[0].replace("\\", "/").rsplit("/", 1)[-1] if _sys.argv else ""
    return name in ("loopcpp", "loopcpp.exe")


# A Ctrl-C during the imports of the command line's start (this package's, then the
# command line's own) ends it quietly; loopcpp.__main__ hands SIGINT back to Python (the
# KeyboardInterrupt click reports) as soon as the command line is imported.
if _command_line_starting():
    import _signal  # built in, at once (``signal`` itself takes a while: its enums)

    if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
        _signal.signal(_signal.SIGINT, _abort_start)

__version__ = "0.1.0"
__all__ = ["LoopConfig", "LoopConfigError", "load", "__version__"]

def _check_llama_cpp() -> None:
    """Refuse the stock llama-cpp-python (installed instead of the patched one)."""
    import importlib.metadata
    import os

    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return  # not installed: load() says how to install it
    if "+loopcpp" in version or os.environ.get("LLAMA_CPP_LIB_PATH"):
        return
    raise ImportError(
        f"llama-cpp-python {version} is the stock build, without the loop engine; "
        "install the patched wheel: `python -m loopcpp.build wheel --install` (or `make setup`)"
    )


_check_llama_cpp()


def __getattr__(name: str):  # noqa: ANN202 - module __getattr__
    if name not in ("LoopConfig", "LoopConfigError", "load"):
        raise AttributeError(f"module 'loopcpp' has no attribute {name!r}")
    if name == "load":
        from loopcpp.api import load

        return load
    from loopcpp import config

    return getattr(config, name)
