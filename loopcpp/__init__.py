"""loopcpp: training-free looped transformers for llama.cpp.

``import loopcpp`` is light: llama-cpp-python is loaded by :func:`load`, and
torch only by :mod:`loopcpp.reference`.
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any

from loopcpp.config import LoopConfig, LoopConfigError

__version__ = "0.1.0"
__all__ = ["LoopConfig", "LoopConfigError", "load", "__version__"]


def _check_llama_cpp() -> None:
    """Fail at import when the stock llama-cpp-python is installed instead of the patched one."""
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


def __getattr__(name: str) -> Any:
    if name == "load":
        from loopcpp.api import load

        return load
    raise AttributeError(name)
