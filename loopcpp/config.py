"""The loop settings: one table of fields, and the ``LoopConfig`` built from it.

The semantics are those of ``docs/LOOPING.md`` (versions 1 and 2). ``FIELDS``
is the single owner of the settings: every field's name, GGUF key, type,
allowed values (in the C enum's order), default, range and one line of help.
``LoopConfig``, its GGUF and kv-override serialisation, the ctypes struct of
the engine (``loopcpp.engine``), the CLI options, chat's ``/loop`` grammar and
the server's request validation are all generated from it. Adding a setting
means adding a row here and the matching member on the C++ side
(``struct llama_loop_params``, whose member order is the table's order).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, make_dataclass, replace
from typing import Any

MODES = ("block", "layer")
METHODS = (
    "naive",
    "euler",
    "rk3",
    "midpoint",
    "heun",
    "rk4",
    "residual",
    "input_anchor",
    "heavy_ball",
    "norm_stab",
    "uniform",
)
KV_POLICIES = ("last", "first", "refined")
ROUTINGS = ("frozen", "fresh")
APPLIES = ("all", "prefill", "first")
NORMS = ("none", "interp")

#: Hard upper bound on K accepted anywhere (the C++ side enforces the same).
MAX_COUNT = 64

#: Evaluations of the loop map G per sub-step, by method (the Runge-Kutta family's
#: stage count; 1 for every other method).
EVALS_PER_STEP = {
    "naive": 1,
    "euler": 1,
    "rk3": 3,
    "midpoint": 2,
    "heun": 2,
    "rk4": 4,
    "residual": 1,
    "input_anchor": 1,
    "heavy_ball": 1,
    "norm_stab": 1,
    "uniform": 1,
}

#: Methods whose update uses the damped step ``s`` (``loop.step``).
STEPPED_METHODS = ("euler", "rk3", "midpoint", "heun", "rk4", "residual", "input_anchor",
                   "heavy_ball", "norm_stab")

# Shu-Osher coefficients of the version-1 integrators: one entry per stage, the
# weight of the step input x in ``alpha * x + (1 - alpha) * E(y)``.
STAGES = {
    "naive": (0.0,),
    "euler": (0.0,),
    "rk3": (0.0, 0.75, 1.0 / 3.0),
}


class LoopConfigError(ValueError):
    """An invalid loop configuration; the message names the problem and the fix."""


@dataclass(frozen=True)
class Field:
    """One loop setting.

    ``kind`` is int, float, bool or str; a str field has ``choices`` (the C
    enum's order). ``default`` None means required (start, end) or, for
    ``step``, the method's own default. ``lo``/``hi`` bound numbers, with
    ``lo_open``/``hi_open`` for an open end. ``aliases`` are extra names chat's
    ``/loop`` accepts; ``symbol`` is how messages name the value (K for count).
    ``version`` is the LOOPING.md version that added it.
    """

    name: str
    kind: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    aliases: tuple[str, ...] = ()
    symbol: str = ""
    version: int = 1

    @property
    def key(self) -> str:
        """The GGUF metadata key (also the kv-override key)."""
        return f"loop.{self.name}"

    @property
    def required(self) -> bool:
        return self.name in ("start", "end")

    def range_text(self) -> str:
        if self.choices:
            return "|".join(self.choices)
        if self.kind is bool:
            return "true|false"
        lo = "" if self.lo is None else f"{self.lo:g}"
        hi = "" if self.hi is None else f"{self.hi:g}"
        if self.kind is int:
            return f"{lo}..{hi}" if hi else f">= {lo}"
        left = "(" if self.lo_open else "["
        right = ")" if self.hi_open else "]"
        return f"{left}{lo}, {hi}{right}"

    def parse(self, value: Any) -> Any:
        """A value from text (chat, CLI) or JSON as this field's type; else LoopConfigError."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise LoopConfigError(f"loop {self.name} must be true or false, got {value!r}")
        if self.kind is int:
            if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
                return int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise LoopConfigError(f"loop {self.name} must be an integer, got {value!r}")
            return value
        if self.kind is float:
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            raise LoopConfigError(f"loop {self.name} must be a number, got {value!r}")
        if not isinstance(value, str):
            raise LoopConfigError(f"loop {self.name} must be a string, got {value!r}")
        return value

    def validate(self, value: Any) -> None:
        """Type, range and choice checks of one value (None allowed where default is None)."""
        if value is None and self.default is None:
            if self.required:
                raise LoopConfigError(f"loop {self.name} is required")
            return
        if self.kind is bool:
            ok = isinstance(value, bool)
        elif self.kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if not ok:
            kind = {int: "an integer", float: "a number", bool: "true or false",
                    str: "a string"}[self.kind]
            raise LoopConfigError(f"loop {self.name} must be {kind}, got {value!r}")
        if self.choices and value not in self.choices:
            raise LoopConfigError(
                f"unknown loop {self.name} {value!r}: use one of {', '.join(self.choices)}"
            )
        if self.kind in (int, float):
            v = float(value)
            bad = math.isnan(v)
            if self.lo is not None:
                bad = bad or (v <= self.lo if self.lo_open else v < self.lo)
            if self.hi is not None:
                bad = bad or (v >= self.hi if self.hi_open else v > self.hi)
            if bad:
                shown = f"{self.symbol}={value}" if self.symbol else repr(value)
                raise LoopConfigError(
                    f"loop {self.name} {shown} is out of range: use {self.range_text()}"
                )


#: The loop settings, in the member order of the C struct ``llama_loop_params``.
FIELDS: tuple[Field, ...] = (
    Field("start", int, None, "first layer of the loop window [start, end)", lo=0),
    Field("end", int, None, "one past the last layer of the window"),
    Field("count", int, 2, "loop count K (sub-steps per forward pass)", lo=1, hi=MAX_COUNT,
          aliases=("k",), symbol="K"),
    Field("mode", str, "block", "block: the window is one map; layer: each layer in turn",
          choices=MODES),
    Field("method", str, "euler", "the integrator (docs/LOOPING.md)", choices=METHODS),
    Field("kv", str, "last", "which evaluation's K/V persist (refined: one more pass)",
          choices=KV_POLICIES),
    Field("routing", str, "frozen", "MoE experts: frozen at the first evaluation, or fresh",
          choices=ROUTINGS),
    Field("apply", str, "all", "which ubatches loop: all, prompts, prompts + first apply_n decodes",
          choices=APPLIES),
    Field("step", float, None, "damped step s (default 1/K)", lo=0.0, hi=1.0, lo_open=True,
          version=2),
    Field("anchor", float, 0.0, "anchor beta: output beta*natural + (1-beta)*loop", lo=0.0, hi=1.0,
          version=2),
    Field("norm", str, "none", "interp: per-token norm interpolation of the iterates (euler)",
          choices=NORMS, version=2),
    Field("anchor_norm", bool, False, "rescale the output to the natural pass's norm", version=2),
    Field("momentum", float, 0.3, "momentum mu of heavy_ball", lo=0.0, hi=1.0, hi_open=True,
          version=2),
    Field("apply_n", int, 0, "with apply=first: decode steps looped after each prompt", lo=0,
          version=2),
)

FIELD = {f.name: f for f in FIELDS}
#: GGUF metadata key of every field.
GGUF_KEYS = {f.name: f.key for f in FIELDS}
#: chat/``/loop`` name or alias -> field name.
ALIASES = {**{f.name: f.name for f in FIELDS}, **{a: f.name for f in FIELDS for a in f.aliases}}


class _LoopMethods:
    """Behaviour of LoopConfig; its fields come from FIELDS."""

    def __post_init__(self) -> None:
        for f in FIELDS:
            f.validate(getattr(self, f.name))
        self._check_combination()

    def _check_combination(self) -> None:
        if self.end <= self.start:
            raise LoopConfigError(
                f"empty or reversed loop window [{self.start}, {self.end}): "
                "end must be greater than start"
            )
        if self.step is not None and self.method not in STEPPED_METHODS:
            raise LoopConfigError(
                f"loop step has no effect with method {self.method}: drop it "
                f"(naive is euler with step 1; use method euler with a step)"
            )
        if self.norm == "interp" and self.method != "euler":
            raise LoopConfigError(
                f"loop norm interp needs method euler, not {self.method}: use method=euler "
                "or norm=none"
            )
        if self.apply == "first" and self.apply_n < 1:
            raise LoopConfigError(
                "loop apply first needs apply_n >= 1 (the decode steps to loop after each "
                "prompt): give apply_n=N"
            )
        if self.apply != "first" and self.apply_n != 0:
            raise LoopConfigError(
                f"loop apply_n {self.apply_n} needs apply=first (apply is {self.apply}): "
                "give apply=first or drop apply_n"
            )
        if self.method == "uniform" and self.mode != "block":
            raise LoopConfigError("loop method uniform runs in block mode only: use mode=block")

    # -- derived quantities -------------------------------------------------

    @property
    def width(self) -> int:
        return self.end - self.start

    @property
    def h(self) -> float:
        """The damped step actually used: ``step``, else 1/K (1 for naive)."""
        if self.method == "naive":
            return 1.0
        return self.step if self.step is not None else 1.0 / self.count

    @property
    def stages(self) -> tuple[float, ...]:
        """Shu-Osher stage weights of a version-1 method (naive, euler, rk3)."""
        return STAGES[self.method]

    @property
    def evals_per_step(self) -> int:
        return EVALS_PER_STEP[self.method]

    @property
    def version(self) -> int:
        """1 if only version-1 settings differ from their defaults, else 2."""
        v2_fields = any(getattr(self, f.name) != f.default for f in FIELDS if f.version == 2)
        v2_values = self.method not in STAGES or self.kv == "refined" or self.apply == "first"
        return 2 if v2_fields or v2_values else 1

    def layer_evals(self, n_layer: int) -> int:
        """Layer evaluations of one looped forward pass on an n_layer model."""
        refined = self.width if self.kv == "refined" else 0
        return n_layer - self.width + self.width * self.count * self.evals_per_step + refined

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
        return (self.count == 1 and self.method in ("naive", "euler") and self.anchor == 0
                and self.step in (None, 1.0) and not self.anchor_norm and self.kv != "refined")

    @classmethod
    def recipe(cls, name: str, model: Any, **changes: Any) -> LoopConfig:
        """The preset ``name`` (``RECIPES``) on ``model`` (an n_layer, or anything with
        ``.n_layer``): its settings and its window rule; ``changes`` override its fields."""
        n_layer = model if isinstance(model, int) else getattr(model, "n_layer", None)
        if isinstance(n_layer, bool) or not isinstance(n_layer, int):
            raise LoopConfigError(
                f"LoopConfig.recipe needs a layer count or a model with .n_layer, got {model!r}"
            )
        start, end, _ = recipe_named(name).window(n_layer)
        unknown = sorted(set(changes) - set(FIELD))
        if unknown:
            raise LoopConfigError(
                f"unknown loop setting {', '.join(unknown)}: use {', '.join(FIELD)}"
            )
        values = {"start": start, "end": end, **recipe_named(name).values, **changes}
        return cls(**values).check(n_layer)  # type: ignore[no-any-return]

    def with_(self, **changes: Any) -> LoopConfig:
        unknown = sorted(set(changes) - set(FIELD))
        if unknown:
            raise LoopConfigError(
                f"unknown loop setting {', '.join(unknown)}: use {', '.join(FIELD)}"
            )
        return replace(self, **changes)

    # -- serialisation -------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_gguf(self) -> dict[str, Any]:
        """``{gguf key: value}``: every version-1 field, and version-2 fields not at default."""
        return {
            f.key: getattr(self, f.name)
            for f in FIELDS
            if f.version == 1 or getattr(self, f.name) != f.default
        }

    def to_kv_overrides(self) -> dict[str, Any]:
        """The ``kv_overrides`` dict llama-cpp-python passes to llama.cpp."""
        return self.to_gguf()

    @classmethod
    def from_gguf(cls, metadata: Mapping[str, Any]) -> LoopConfig | None:
        """Read the ``loop.*`` keys; None when the file has no loop.

        Any other ``loop.*`` key is refused: a file written by a newer loopcpp
        must not run differently without saying so.
        """
        loop_keys = {k for k in metadata if k.startswith("loop.")}
        if not loop_keys:
            return None
        unknown = sorted(loop_keys - set(GGUF_KEYS.values()))
        if unknown:
            raise LoopConfigError(
                f"unknown loop key {', '.join(unknown)}: this loopcpp knows "
                f"{', '.join(GGUF_KEYS.values())} (upgrade loopcpp, or rewrite the file with "
                "`loopcpp convert`)"
            )
        missing = [FIELD[k].key for k in ("start", "end", "count") if FIELD[k].key not in metadata]
        if missing:
            raise LoopConfigError(
                f"GGUF loop metadata is incomplete: {', '.join(missing)} missing "
                "(rewrite it with `loopcpp convert`)"
            )
        values: dict[str, Any] = {}
        for f in FIELDS:
            if f.key in metadata:
                try:
                    values[f.name] = f.parse(metadata[f.key])
                except LoopConfigError as e:
                    raise LoopConfigError(f"GGUF key {f.key}: {e}") from None
        return cls(**values)

    def describe(self) -> str:
        text = (
            f"layers [{self.start}, {self.end}) x K={self.count} "
            f"{self.method}/{self.mode} kv={self.kv} routing={self.routing} apply={self.apply}"
        )
        extra = [
            f"{f.name}={getattr(self, f.name)}"
            for f in FIELDS
            if f.version == 2 and getattr(self, f.name) != f.default
            and not (f.name == "momentum" and self.method != "heavy_ball")
        ]
        return " ".join([text, *extra])


def _dataclass_field(f: Field) -> tuple[Any, ...]:
    if f.required:
        return (f.name, f.kind)
    return (f.name, f.kind | None if f.default is None else f.kind, field(default=f.default))


#: Which layers to loop and how: one attribute per row of FIELDS.
LoopConfig = make_dataclass(
    "LoopConfig",
    [_dataclass_field(f) for f in FIELDS],
    bases=(_LoopMethods,),
    frozen=True,
)
LoopConfig.__module__ = __name__
LoopConfig.__doc__ = """Which layers to loop and how.

``start``/``end`` are the half-open window ``[a, b)``; ``count`` is K; the other
fields are the rows of ``loopcpp.config.FIELDS``.
"""

assert [f.name for f in fields(LoopConfig)] == [f.name for f in FIELDS]


# --------------------------------------------------------------------------- presets


def rounded_width(n_layer: int, divisor: int, minimum: int) -> tuple[int, str]:
    """``max(minimum, round(n_layer / divisor))``, rounding halves up, and its arithmetic
    in words (``"width 2: 12/8 = 1.5, rounded half up to 2"``)."""
    raw = n_layer / divisor
    r = math.floor(raw + 0.5)
    w = max(minimum, r)
    why = f"width {w}: {n_layer}/{divisor} = {raw:g}"
    if r != raw:
        why += f", rounded half up to {r}" if raw % 1 == 0.5 else f", rounded to {r}"
    if r < minimum:
        why += f", raised to the minimum {minimum}"
    return w, why


@dataclass(frozen=True)
class WindowRule:
    """Where a preset puts its window on an ``n_layer`` stack (data, not code paths).

    ``edge`` "last": the window's last layer is layer ``floor(at * n_layer)``;
    "first": its first layer is ``round(at * n_layer)``. Width: ``width`` layers on
    stacks of at least ``width_from`` layers, else ``round(n_layer / divisor)``, at
    least ``min_width`` (and at most the stack). The window is shifted, never
    shrunk, to fit inside the stack.
    """

    edge: str
    at: float
    divisor: int
    min_width: int
    width: int | None = None
    width_from: int = 0
    text: str = ""

    def width_for(self, n_layer: int) -> tuple[int, str]:
        if self.width is not None and n_layer >= self.width_from:
            return min(self.width, n_layer), f"width {self.width} (a stack of {self.width_from} "\
                f"layers or more)"
        w, why = rounded_width(n_layer, self.divisor, self.min_width)
        if w > n_layer:
            w, why = n_layer, f"width {n_layer}: the whole stack"
        return w, why

    def window(self, n_layer: int) -> tuple[int, int, str]:
        """``(start, end, reason)`` on an ``n_layer`` stack."""
        if isinstance(n_layer, bool) or not isinstance(n_layer, int) or n_layer < 1:
            raise LoopConfigError(
                f"model layer count {n_layer!r} is invalid: it must be 1 or more"
            )
        w, why = self.width_for(n_layer)
        if self.edge == "last":
            last = math.floor(self.at * n_layer)
            start = last - w + 1
            where = f"ending at layer {last} ({self.at:g} of {n_layer})"
        else:
            start = math.floor(self.at * n_layer + 0.5)
            where = f"starting at layer {start} (about {self.at:g} of {n_layer})"
        fitted = min(max(start, 0), n_layer - w)
        reason = f"{why}; {where}"
        if fitted != start:
            reason += "; shifted to fit inside the stack"
        return fitted, fitted + w, reason


@dataclass(frozen=True)
class Recipe:
    """A named preset: field values and a window rule (docs/LOOPING.md v2)."""

    name: str
    help: str
    values: Mapping[str, Any]
    rule: WindowRule

    def window(self, n_layer: int) -> tuple[int, int, str]:
        return self.rule.window(n_layer)

    def matches(self, loop: LoopConfig, n_layer: int) -> str:
        """"exact", "settings" (its field values, another window) or "" (not this preset)."""
        if any(getattr(loop, k) != v for k, v in self.values.items()):
            return ""
        rest = [f for f in FIELDS if f.name not in self.values and f.name not in ("start", "end")]
        if any(getattr(loop, f.name) != f.default for f in rest):
            return ""
        start, end, _ = self.window(n_layer)
        return "exact" if (loop.start, loop.end) == (start, end) else "settings"


#: The authors' recipes as presets (docs/LOOPING.md, "The authors' recipes").
RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            "paper",
            "the authors' 16-task recipe: block euler K=6, anchor 0.5, kv first, prompts "
            "only; 4 layers ending at the middle layer (n_layer/8, at least 2, under 24 layers)",
            {"mode": "block", "method": "euler", "count": 6, "anchor": 0.5, "kv": "first",
             "apply": "prefill"},
            WindowRule("last", 0.5, divisor=8, min_width=2, width=4, width_from=24),
        ),
        Recipe(
            "paper-moe",
            "the authors' MoE recipe: layer euler K=6, anchor 0.5, norm interp, routing "
            "frozen, kv first, every token; window from about 0.6 of the depth, n_layer/12 wide "
            "(at least 2)",
            {"mode": "layer", "method": "euler", "count": 6, "anchor": 0.5, "norm": "interp",
             "routing": "frozen", "kv": "first", "apply": "all"},
            WindowRule("first", 0.6, divisor=12, min_width=2),
        ),
    )
}


def recipe_named(name: str) -> Recipe:
    """The preset ``name``, or LoopConfigError listing the presets."""
    recipe = RECIPES.get(name) if isinstance(name, str) else None
    if recipe is None:
        raise LoopConfigError(f"unknown recipe {name!r}: use one of {', '.join(RECIPES)}")
    return recipe


def matching_recipe(loop: LoopConfig | None, n_layer: int) -> tuple[str, str] | None:
    """``(name, "exact" | "settings")`` of the preset ``loop`` is, or None."""
    if loop is None:
        return None
    for recipe in RECIPES.values():
        how = recipe.matches(loop, n_layer)
        if how:
            return recipe.name, how
    return None
