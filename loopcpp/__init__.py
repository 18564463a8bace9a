"""loopcpp: training-free looped transformers for llama.cpp.

``import loopcpp`` is light: it refuses a stock llama-cpp-python, and imports
nothing else until a name is used, so that the command line can turn a Ctrl-C
during its start into a quiet exit; llama-cpp-python is loaded by
:func:`load`, and torch only by :mod:`loopcpp.reference`.
"""

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
