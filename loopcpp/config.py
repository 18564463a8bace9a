"""The loop configuration shared by the CLI, the Python API, the GGUF metadata
and the PyTorch reference.

The semantics are those of ``docs/LOOPING.md``: layers ``[start, end)`` form the
window, ``count`` (K) is the loop count, ``mode`` / ``method`` / ``kv`` /
``routing`` / ``apply`` select how the window is iterated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

MODES = ("block", "layer")
METHODS = ("naive", "euler", "rk3")
KV_POLICIES = ("last", "first")
ROUTINGS = ("frozen", "fresh")
APPLIES = ("all", "prefill")

#: GGUF metadata key of every field (the fixed ``loop.*`` keys of the contract).
GGUF_KEYS = {
    "start": "loop.start",
    "end": "loop.end",
    "count": "loop.count",
    "mode": "loop.mode",
    "method": "loop.method",
    "kv": "loop.kv",
    "routing": "loop.routing",
    "apply": "loop.apply",
}

#: Hard upper bound on K accepted anywhere (the C++ side enforces the same).
MAX_COUNT = 64

# Shu-Osher coefficients of each integrator: one entry per stage, the weight of
# the step input x in the convex combination ``alpha * x + (1 - alpha) * E(y)``
# where E(y) = y + h * (G(y) - y) is one damped Euler sub-step.  ``naive`` is
# one undamped stage (h = 1).  Keep in sync with cpp_patch (llama-loop.cpp).
STAGES = {
    "naive": (0.0,),
    "euler": (0.0,),
    "rk3": (0.0, 0.75, 1.0 / 3.0),
}


class LoopConfigError(ValueError):
    """An invalid loop configuration; the message names the problem and the fix."""


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise LoopConfigError(
            f"unknown loop {name} {value!r}: use one of {', '.join(allowed)}"
        )


@dataclass(frozen=True)
class LoopConfig:
    """Which layers to loop and how.

    ``start``/``end`` are the half-open window ``[a, b)``; ``count`` is K.
    """

    start: int
    end: int
    count: int = 2
    mode: str = "block"
    method: str = "euler"
    kv: str = "last"
    routing: str = "frozen"
    apply: str = "all"

    def __post_init__(self) -> None:
        for name in ("start", "end", "count"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise LoopConfigError(
                    f"loop {name} must be an integer, got {value!r}"
                )
        if self.start < 0:
            raise LoopConfigError(f"loop start {self.start} is negative: use 0 or more")
        if self.end <= self.start:
            raise LoopConfigError(
                f"empty or reversed loop window [{self.start}, {self.end}): "
                "end must be greater than start"
            )
        if not 1 <= self.count <= MAX_COUNT:
            raise LoopConfigError(
                f"loop count K={self.count} is out of range: use 1..{MAX_COUNT}"
            )
        _choice("mode", self.mode, MODES)
        _choice("method", self.method, METHODS)
        _choice("kv", self.kv, KV_POLICIES)
        _choice("routing", self.routing, ROUTINGS)
        _choice("apply", self.apply, APPLIES)

    # -- derived quantities -------------------------------------------------

    @property
    def width(self) -> int:
        return self.end - self.start

    @property
    def step(self) -> float:
        """The sub-step size h (1 for naive)."""
        return 1.0 if self.method == "naive" else 1.0 / self.count

    @property
    def stages(self) -> tuple[float, ...]:
        return STAGES[self.method]

    def layer_evals(self, n_layer: int) -> int:
        """Layer evaluations of one forward pass with this loop on an n_layer model."""
        return n_layer - self.width + self.width * self.count * len(self.stages)

    def check(self, n_layer: int) -> LoopConfig:
        """Raise LoopConfigError if the window does not fit an n_layer model."""
        if self.end > n_layer:
            raise LoopConfigError(
                f"loop window [{self.start}, {self.end}) is out of range for a model "
                f"with {n_layer} layers: use 0 <= start < end <= {n_layer}"
            )
        return self

    def is_identity(self) -> bool:
        """True when the loop computes exactly the stock model."""
        return self.count == 1 and self.method in ("naive", "euler")

    def with_(self, **changes: Any) -> LoopConfig:
        return replace(self, **changes)

    # -- serialisation -------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_gguf(self) -> dict[str, Any]:
        """``{gguf key: value}`` for every field."""
        return {GGUF_KEYS[k]: v for k, v in asdict(self).items()}

    def to_kv_overrides(self) -> dict[str, int | str]:
        """The ``kv_overrides`` dict llama-cpp-python passes to llama.cpp."""
        return self.to_gguf()

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any]) -> LoopConfig | None:
        """Read the ``loop.*`` keys; None when the file has no loop."""
        present = {k for k, key in GGUF_KEYS.items() if key in metadata}
        if not present:
            return None
        missing = [GGUF_KEYS[k] for k in ("start", "end", "count") if k not in present]
        if missing:
            raise LoopConfigError(
                f"GGUF loop metadata is incomplete: {', '.join(missing)} missing "
                "(rewrite it with `loopcpp convert`)"
            )
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = GGUF_KEYS[f.name]
            if key not in metadata:
                continue
            value = metadata[key]
            if f.name in ("start", "end", "count"):
                if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                    value = int(value)
                if isinstance(value, bool) or not isinstance(value, int):
                    raise LoopConfigError(
                        f"GGUF key {key} must be an integer, got {value!r}"
                    )
            elif not isinstance(value, str):
                raise LoopConfigError(f"GGUF key {key} must be a string, got {value!r}")
            values[f.name] = value
        return cls(**values)

    def describe(self) -> str:
        return (
            f"layers [{self.start}, {self.end}) x K={self.count} "
            f"{self.method}/{self.mode} kv={self.kv} routing={self.routing} apply={self.apply}"
        )
