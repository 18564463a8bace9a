"""Which loop runs: one resolver for every command, chat's ``/loop``, the server and the API.

A :class:`LoopRequest` is what one command line, chat command, request body or
``load(loop=...)`` asks for: explicit settings (rows of ``config.FIELDS``), a
preset (``config.RECIPES``), the depth rule's ``depth``/``width``, or no loop.
:func:`resolve` turns it into a :class:`LoopConfig` (or None, the stock model)
for a stack of ``n_layer`` layers, given the loop it starts from (``base``: the
file's ``loop.*`` keys for a run-time command, the loop in use for chat and the
server, None for ``convert``, whose output replaces the keys):

1. ``no_loop``: no loop (refused together with any setting);
2. a recipe: its settings and its window rule, the explicit settings on top
   (the base is not used);
3. otherwise the base with the explicit settings changed; without a base, the
   settings on the project's depth rule (``loopcpp.window``); ``start``/``end``
   replace the window, ``depth``/``width`` move it by the depth rule.

Every refusal is a :class:`LoopConfigError` whose message is one of the
``REFUSE_*`` texts below (or a field's own range/choice check).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loopcpp.config import (
    ALIASES,
    FIELD,
    RECIPES,
    LoopConfig,
    LoopConfigError,
    matching_recipe,
    recipe_named,
)
from loopcpp.window import DEFAULT_DEPTH, depth_window

#: How every command, chat and the server name "no loop".
NO_LOOP = "off (the stock model)"

REFUSE_NO_LOOP = "--no-loop cannot be combined with loop settings (nor /loop off): drop one"
REFUSE_HALF_WINDOW = "give both start and end of the window (--start and --end), or neither"
REFUSE_WINDOW_AND_DEPTH = (
    "give either an explicit window (start/end) or the depth rule (depth/width), not both"
)
REFUSE_RECIPE_AND_DEPTH = (
    "a recipe brings its own window rule: move its window with start/end, not depth/width"
)



class LoopRequestError(LoopConfigError):
    """Settings that cannot go together (a ``REFUSE_*`` text); the CLI's usage errors."""


#: Keys a request mapping may hold besides the fields (and their aliases).
EXTRA_KEYS = ("recipe", "depth", "width", "window")


def describe(loop: LoopConfig | None) -> str:
    """One line for a loop, or :data:`NO_LOOP`."""
    return loop.describe() if loop is not None else NO_LOOP


@dataclass(frozen=True)
class LoopRequest:
    """What one command line, chat command, request body or API call asks for."""

    settings: Mapping[str, Any] = field(default_factory=dict)
    recipe: str | None = None
    depth: float | None = None
    width: int | None = None
    no_loop: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.settings) - set(FIELD))
        if unknown:
            raise LoopConfigError(
                f"unknown loop setting {', '.join(unknown)}: use {', '.join(FIELD)}"
            )
        if self.recipe is not None:
            recipe_named(self.recipe)

    @property
    def empty(self) -> bool:
        """Nothing asked: the base (or the depth rule) as it is."""
        return not (self.settings or self.recipe or self.depth is not None
                    or self.width is not None or self.no_loop)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], text: bool = False) -> LoopRequest:
        """A request from ``{"count": 3, "recipe": "paper", ...}`` (a server body's
        ``"loop"``, chat's ``/loop k=v`` pairs, ``load(loop={...})``).

        Keys: every field of ``config.FIELDS`` (and its aliases), ``recipe``,
        ``depth``, ``width`` and ``window`` (``"A:B"`` or ``[A, B]``). ``text``:
        the values are strings to parse (chat); otherwise JSON values, whose types
        the fields check as they are.
        """
        settings: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in raw.items():
            name = key.lower() if text else key
            if name == "window":
                settings["start"], settings["end"] = _window(value)
            elif name in ("depth", "width"):
                kind = float if name == "depth" else int
                extra[name] = _number(name, value, kind, text)
            elif name == "recipe":
                extra["recipe"] = value
            elif name in ALIASES:
                f = FIELD[ALIASES[name]]
                settings[f.name] = f.parse(value) if text else value
            else:
                raise LoopConfigError(
                    f"unknown loop setting {key!r}: use {', '.join(request_keys())}"
                )
        return cls(settings, **extra)


def request_keys() -> list[str]:
    """The keys :meth:`LoopRequest.from_mapping` takes, aliases included, table order."""
    keys: list[str] = []
    for f in FIELD.values():
        keys += [f.name, *f.aliases]
    return keys + list(EXTRA_KEYS)


def _number(name: str, value: Any, kind: type, text: bool) -> Any:
    if text and isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    what = "a number" if kind is float else "an integer"
    raise LoopConfigError(f"loop {name} must be {what}, got {value!r}")


def _window(value: Any) -> tuple[int, int]:
    if isinstance(value, str):
        sep = ":" if ":" in value else "-" if "-" in value.lstrip("-") else None
        if sep is not None:
            a, b = value.split(sep, 1)
            return FIELD["start"].parse(a.strip()), FIELD["end"].parse(b.strip())
    elif isinstance(value, (list, tuple)) and len(value) == 2:
        return FIELD["start"].parse(value[0]), FIELD["end"].parse(value[1])
    raise LoopConfigError(
        f"loop window {value!r}: write the window as A:B (or [A, B]), e.g. window=13:17"
    )


@dataclass(frozen=True)
class Resolved:
    """The loop that runs (None: the stock model) and where it came from."""

    loop: LoopConfig | None
    source: str

    def text(self) -> str:
        """``"<loop> (<source>)"``, or ``"off (the stock model), --no-loop"``."""
        if self.loop is None:
            return f"{NO_LOOP}, {self.source}"
        return f"{self.loop.describe()} ({self.source})"


def resolve(
    request: LoopRequest,
    n_layer: int,
    base: LoopConfig | None = None,
    base_source: str = "loop from the GGUF metadata",
) -> Resolved:
    """The loop ``request`` asks for on an ``n_layer`` stack, starting from ``base``.

    Raises LoopConfigError (one of the ``REFUSE_*`` texts, or a field's check).
    """
    s = dict(request.settings)
    window_given = "start" in s or "end" in s
    depth_given = request.depth is not None or request.width is not None
    if request.no_loop:
        if s or request.recipe is not None or depth_given:
            raise LoopRequestError(REFUSE_NO_LOOP)
        return Resolved(None, "--no-loop")
    if window_given and depth_given:
        raise LoopRequestError(REFUSE_WINDOW_AND_DEPTH)
    if request.recipe is not None:
        if depth_given:
            raise LoopRequestError(REFUSE_RECIPE_AND_DEPTH)
        recipe = recipe_named(request.recipe)
        start, end, why = recipe.window(n_layer)
        values = {"start": start, "end": end, **recipe.values, **s}
        if ("start" in s) != ("end" in s):
            raise LoopRequestError(REFUSE_HALF_WINDOW)
        source = f"recipe {recipe.name}" + ("" if window_given else f": {why}")
        if s:
            source += "; " + ", ".join(f"{k}={v}" for k, v in s.items()) + " as asked"
        return Resolved(_build(values, n_layer), source)
    if base is not None and not depth_given:
        if not s:
            return Resolved(base.check(n_layer), base_source)
        changed = ", ".join(f"{k}={v}" for k, v in s.items())
        return Resolved(_build({**base.to_dict(), **s}, n_layer),
                        f"{base_source}, {changed} as asked")
    if window_given:
        if "start" not in s or "end" not in s:
            raise LoopRequestError(REFUSE_HALF_WINDOW)
        values = {**(base.to_dict() if base is not None else {}), **s}
        return Resolved(_build(values, n_layer), "window as asked")
    depth = DEFAULT_DEPTH if request.depth is None else request.depth
    start, end, why = depth_window(n_layer, depth, request.width)
    values = {**(base.to_dict() if base is not None else {}), **s, "start": start, "end": end}
    return Resolved(_build(values, n_layer), f"depth rule: {why}")


def _build(values: dict[str, Any], n_layer: int) -> LoopConfig:
    return LoopConfig(**values).check(n_layer)  # type: ignore[no-any-return]


def as_loop(loop: Any, n_layer: int, base: LoopConfig | None = None) -> LoopConfig | None:
    """What ``load(loop=...)`` and ``set_loop(...)`` accept, as a LoopConfig or None.

    None/False: the stock model; a LoopConfig as it is; a recipe name (``"paper"``);
    a mapping of settings as a server request's ``"loop"`` (``{"recipe": "paper",
    "count": 4}``, ``{"start": 13, "end": 17}``), resolved against ``base``.
    """
    if loop is None or loop is False:
        return None
    if isinstance(loop, LoopConfig):
        return loop
    if isinstance(loop, str):
        return resolve(LoopRequest(recipe=loop), n_layer).loop
    if isinstance(loop, Mapping):
        return resolve(LoopRequest.from_mapping(loop), n_layer, base).loop
    raise LoopConfigError(
        f"loop must be a LoopConfig (e.g. LoopConfig(13, 17, count=2)), a recipe name "
        f"({', '.join(RECIPES)}), a mapping of settings, or None/False for the stock model, "
        f"got {loop!r}"
    )


def recipe_note(loop: LoopConfig | None, n_layer: int) -> str:
    """Which preset a loop is, in words ("" when none): for ``info``."""
    match = matching_recipe(loop, n_layer)
    if match is None or loop is None:
        return ""
    name, how = match
    if how == "exact":
        return f"recipe {name} (--recipe {name})"
    start, end, _ = RECIPES[name].window(n_layer)
    return (f"recipe {name}'s settings on the window [{loop.start}, {loop.end}) "
            f"(its own window here: [{start}, {end}))")
