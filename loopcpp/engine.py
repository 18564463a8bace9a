"""ctypes bindings of the patch's C API (``llama_set_loop`` and friends) on top of
the library that llama-cpp-python loaded.

The stock llama-cpp-python has no such symbols: :func:`lib` then raises
:class:`PatchedLibraryMissing` naming the fix.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

from loopcpp.archs import LOOP_ARCHS
from loopcpp.config import FIELDS, Field, LoopConfig, LoopConfigError

SETUP_HINT = (
    "install the patched wheel with `python -m loopcpp.build wheel --install` "
    "(or run `make setup`), or point LLAMA_CPP_LIB_PATH at a patched build "
    "(`python -m loopcpp.build dev`)"
)

#: Architectures the patch loops (LLAMA_LOOP_ARCHS in cpp_patch), from loopcpp.archs.
SUPPORTED_ARCHS = LOOP_ARCHS


class PatchedLibraryMissing(ImportError):
    """llama-cpp-python is missing or is the stock build without the loop API."""


def _ctype(f: Field) -> type:
    """The C type of a field's struct member: enums are ``int``, numbers 32-bit."""
    if f.choices:
        return ctypes.c_int
    return {int: ctypes.c_int32, float: ctypes.c_float, bool: ctypes.c_bool}[f.kind]


class llama_loop_params(ctypes.Structure):  # noqa: N801 - the C struct's name
    """``struct llama_loop_params`` of the patch: one member per row of FIELDS, in order."""

    _fields_ = [(f.name, _ctype(f)) for f in FIELDS]


@functools.cache
def lib() -> ctypes.CDLL:
    """The loaded libllama with the loop functions declared."""
    try:
        import llama_cpp.llama_cpp as raw
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise PatchedLibraryMissing(f"llama-cpp-python is not installed: {SETUP_HINT}") from e
    cdll = raw._lib
    if not hasattr(cdll, "llama_set_loop"):
        raise PatchedLibraryMissing(
            f"the loaded libllama ({getattr(cdll, '_name', '?')}) is the stock build without "
            f"the loop API: {SETUP_HINT}"
        )
    p = ctypes.c_void_p
    cdll.llama_loop_default_params.argtypes = []
    cdll.llama_loop_default_params.restype = llama_loop_params
    cdll.llama_model_loop_supported.argtypes = [p]
    cdll.llama_model_loop_supported.restype = ctypes.c_bool
    cdll.llama_loop_check.argtypes = [
        p,
        ctypes.POINTER(llama_loop_params),
        ctypes.c_char_p,
        ctypes.c_size_t,
    ]
    cdll.llama_loop_check.restype = ctypes.c_int32
    cdll.llama_get_loop.argtypes = [p, ctypes.POINTER(llama_loop_params)]
    cdll.llama_get_loop.restype = ctypes.c_bool
    cdll.llama_set_loop.argtypes = [p, ctypes.POINTER(llama_loop_params)]
    cdll.llama_set_loop.restype = ctypes.c_int32
    return cdll


def to_params(config: LoopConfig) -> llama_loop_params:
    """The C struct of a loop: enums by their index in the field's choices; an unset step is 0."""
    values = {}
    for f in FIELDS:
        value = getattr(config, f.name)
        if f.choices:
            value = f.choices.index(value)
        elif value is None:
            value = 0  # the C side's "method default" (step 1/K)
        values[f.name] = value
    return llama_loop_params(**values)


def _shortest_float32(value: float) -> float:
    """The shortest decimal of the same float32 (0.3 read back from C: 0.3, not 0.30000001)."""
    for digits in range(1, 10):
        short = float(f"{value:.{digits}g}")
        if ctypes.c_float(short).value == value:
            return short
    return value


def from_params(p: llama_loop_params) -> LoopConfig:
    values: dict[str, Any] = {}
    for f in FIELDS:
        value = getattr(p, f.name)
        if f.choices:
            value = f.choices[value]
        elif f.kind is float and f.default is None and value == 0:
            value = None
        elif f.kind is float:
            value = _shortest_float32(value)
        values[f.name] = value
    return LoopConfig(**values)


def check(model: Any, config: LoopConfig) -> None:
    """Ask the library whether config is valid for model (a llama_model pointer)."""
    err = ctypes.create_string_buffer(512)
    params = to_params(config)
    if lib().llama_loop_check(model, ctypes.byref(params), err, len(err)) != 0:
        raise LoopConfigError(err.value.decode(errors="replace"))


def get_loop(ctx: Any) -> LoopConfig | None:
    params = llama_loop_params()
    return from_params(params) if lib().llama_get_loop(ctx, ctypes.byref(params)) else None


def set_loop(ctx: Any, model: Any, config: LoopConfig | None) -> None:
    """Change a context's loop (None: off); invalid settings raise before reaching C++."""
    if config is None:
        lib().llama_set_loop(ctx, None)
        return
    check(model, config)
    params = to_params(config)
    if lib().llama_set_loop(ctx, ctypes.byref(params)) != 0:  # pragma: no cover - check() ran
        raise LoopConfigError(f"llama_set_loop refused {config.describe()}")
