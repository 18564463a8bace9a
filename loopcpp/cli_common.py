"""The pieces every ``loopcpp`` command shares: model arguments, list options, the loop
options (generated from ``loopcpp.config.FIELDS``), the run options and the model load.

``loopcpp.cli`` and ``loopcpp.cli_eval`` both import this module and not each other's.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from loopcpp.config import FIELDS, RECIPES, Field, LoopConfigError
from loopcpp.gguf_io import GGUFModel, ModelFileError, read_model
from loopcpp.resolve import LoopRequest, LoopRequestError, Resolved, resolve


def model_arg(spec: str) -> str:
    """A path as given, or the cached file of a bundled model name (fetched on first use)."""
    if Path(spec).exists():
        return spec
    try:
        from loopcpp import models
    except ImportError:
        return spec
    names = models.names()
    if spec in names:
        return str(models.fetch(spec))
    if "/" not in spec and os.sep not in spec:
        close = difflib.get_close_matches(spec.lower(), names, n=3, cutoff=0.6)
        if close:
            raise models.ModelNotFoundError(
                f"model {spec!r} is neither a bundled model nor an existing file: did you mean "
                f"{' or '.join(close)}? (`loopcpp models` lists the bundled models)"
            )
    return spec


def split_list(value: str | None, name: str) -> list[str]:
    if value is None:
        return []
    parts = [p.strip() for p in value.split(",")]
    if not all(parts):
        raise click.BadParameter(f"{value!r} has an empty item: give a comma-separated list",
                                 param_hint=name)
    return parts


def numbers(kind: Callable[[str], Any], example: str) -> Callable[..., list[Any] | None]:
    """A click callback: a comma-separated list of ``kind`` (None when not given)."""

    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> list[Any] | None:
        if value is None:
            return None
        try:
            return [kind(p) for p in split_list(value, f"--{param.name}")]
        except ValueError:
            raise click.BadParameter(f"{value!r}: give {example}") from None

    return parse


ints = numbers(int, "integers such as 1,2,3")
floats = numbers(float, "fractions such as 0.3,0.5,0.7")


def name_list(allowed: Sequence[str]) -> Callable[..., list[str] | None]:
    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
        if value is None:
            return None
        names = split_list(value, f"--{param.name}")
        bad = [n for n in names if n not in allowed]
        if bad:
            raise click.BadParameter(f"unknown {', '.join(bad)}: use {', '.join(allowed)}")
        return names

    return parse


# --------------------------------------------------------------------------- loop options


def _option_names(f: Field) -> list[str]:
    dashed = f.name.replace("_", "-")
    if f.kind is bool:
        return [f"--{dashed}/--no-{dashed}"]
    return [f"--{dashed}", *(f"-{a}" if len(a) == 1 else f"--{a}" for a in f.aliases)]


def _option_help(f: Field) -> str:
    text = f.help
    if f.kind in (int, float) and (f.lo is not None or f.hi is not None):
        text += f", {f.range_text()}"
    if f.default is not None:
        shown = str(f.default).lower() if f.kind is bool else f.default
        text += f" [default: {shown}]"
    return text + "."


def field_option(f: Field) -> Callable[[Any], Any]:
    """The click option of one row of FIELDS (its name, type, choices and help)."""
    kwargs: dict[str, Any] = {"help": _option_help(f), "default": None}
    if f.choices:
        kwargs["type"] = click.Choice(f.choices)
    elif f.kind is bool:
        kwargs["is_flag"] = True
    else:
        kwargs["type"] = f.kind
        kwargs["metavar"] = f.symbol or f.name.upper()
    return click.option(*_option_names(f), f.name, **kwargs)


#: Options of the loop request besides the fields (dest, click option).
_REQUEST_OPTIONS: dict[str, Callable[[Any], Any]] = {
    "recipe": click.option(
        "--recipe", type=click.Choice(tuple(RECIPES)), default=None,
        help="A preset: " + "; ".join(f"{r.name}: {r.help}" for r in RECIPES.values())
        + ". Other loop options change its fields.",
    ),
    "depth": click.option("--depth", type=float, metavar="D", default=None,
                          help="Depth rule: window centre as a fraction of the stack "
                          "[default: 0.5]."),
    "width": click.option("--width", type=int, metavar="W", default=None,
                          help="Depth rule: window width in layers [default: n_layer/8]."),
}

RUN_NO_LOOP = "Run the stock model (ignore the file's loop keys)."


def loop_options(
    no_loop: str | None = RUN_NO_LOOP, exclude: Sequence[str] = ()
) -> Callable[[Any], Any]:
    """Add one option per row of FIELDS, --recipe, --depth, --width (and --no-loop with
    the help ``no_loop``, unless None); the command receives them as one
    ``loop_args: LoopRequest``. ``exclude``: fields the command sets otherwise."""
    wanted = [f.name for f in FIELDS if f.name not in exclude]

    def decorate(func: Any) -> Any:
        @functools.wraps(func)
        def command(*args: Any, **kwargs: Any) -> Any:
            settings = {n: kwargs.pop(n) for n in wanted}
            extra = {n: kwargs.pop(n) for n in _REQUEST_OPTIONS}
            flag = bool(kwargs.pop("no_loop", False))
            request = LoopRequest({k: v for k, v in settings.items() if v is not None},
                                  no_loop=flag, **extra)
            return func(*args, loop_args=request, **kwargs)

        options = [field_option(f) for f in FIELDS if f.name in wanted]
        options += list(_REQUEST_OPTIONS.values())
        if no_loop is not None:
            options.append(click.option("--no-loop", is_flag=True, help=no_loop))
        for opt in reversed(options):
            command = opt(command)
        return command

    return decorate


def read_for_loop(path: str | os.PathLike[str], request: LoopRequest) -> GGUFModel:
    """Read MODEL for a run-time command. A file whose loop keys are invalid is read
    without them when the request replaces them (--no-loop, a window, a recipe);
    otherwise the error names those ways out."""
    try:
        return read_model(path)
    except ModelFileError as e:
        if not isinstance(e.__cause__, LoopConfigError) or not replaces_file_loop(request):
            raise
        m = read_model(path, ignore_loop=True)
        m.loop_error = str(e)  # type: ignore[attr-defined]
        return m


def replaces_file_loop(request: LoopRequest) -> bool:
    """Whether the request does not start from the file's loop at all."""
    s = request.settings
    return request.no_loop or request.recipe is not None or ("start" in s and "end" in s) or (
        request.depth is not None or request.width is not None)


def resolve_for(m: GGUFModel, request: LoopRequest) -> Resolved:
    """The loop of a run-time command on ``m``: the request on the file's loop.
    Settings that cannot go together are usage errors (exit status 2)."""
    with usage_errors():
        return resolve(request, m.n_layer, base=m.loop)


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """The resolver's refusals of option combinations as click usage errors."""
    try:
        yield
    except LoopRequestError as e:
        raise click.UsageError(str(e)) from e


_OVERRIDE_TYPES = ("int", "float", "bool", "str")
_OVERRIDE_EXAMPLE = "e.g. --override-kv tokenizer.ggml.add_bos_token=bool:false"


def override_kv(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, Any]:
    """``KEY=TYPE:VALUE`` items (as llama.cpp's tools take them) -> llama-cpp-python's
    kv_overrides. ``loop.*`` keys are refused: the loop options set them, checked."""
    overrides: dict[str, Any] = {}
    for item in values:
        key, eq, rest = item.partition("=")
        kind, colon, value = rest.partition(":")
        key, kind = key.strip(), kind.strip().lower()
        if not eq or not colon or not key or kind not in _OVERRIDE_TYPES:
            raise click.BadParameter(
                f"{item!r}: write KEY=TYPE:VALUE with TYPE one of {', '.join(_OVERRIDE_TYPES)}, "
                f"{_OVERRIDE_EXAMPLE}"
            )
        if key.startswith("loop."):
            raise click.BadParameter(
                f"{item!r}: loop keys are set with the loop options (--start, --end, --count, "
                "--method, ...), which are checked against the model; use the loop options instead"
            )
        try:
            if kind == "int":
                overrides[key] = int(value)
            elif kind == "float":
                overrides[key] = float(value)
            elif kind == "bool":
                if value.strip().lower() not in ("true", "false"):
                    raise ValueError
                overrides[key] = value.strip().lower() == "true"
            else:
                if len(value.encode()) > 127:  # llama.cpp's override strings hold 127 bytes
                    raise click.BadParameter(f"{item!r}: a str value holds at most 127 bytes")
                overrides[key] = value
        except ValueError:
            raise click.BadParameter(
                f"{item!r}: {value!r} is not a {kind}"
                + (" (write true or false)" if kind == "bool" else "")
            ) from None
    return overrides


def llama_kwargs(
    n_ctx: int,
    threads: int | None,
    rpc: str | None = None,
    gpu_layers: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"n_ctx": n_ctx, "verbose": False}
    if overrides:
        kwargs["kv_overrides"] = dict(overrides)
    if threads:
        kwargs["n_threads"] = kwargs["n_threads_batch"] = threads
    if rpc:
        kwargs["rpc_servers"] = rpc
        kwargs["n_gpu_layers"] = -1 if gpu_layers is None else gpu_layers
    elif gpu_layers is not None:
        kwargs["n_gpu_layers"] = gpu_layers
    return kwargs


run_options_list = [
    click.option("--ctx", "n_ctx", type=click.IntRange(min=8), default=2048, show_default=True,
                 help="Context size in tokens (prompt, conversation and reply)."),
    click.option("--threads", type=click.IntRange(min=1),
                 help="CPU threads [default: llama.cpp's choice]."),
    click.option(
        "--rpc",
        metavar="HOST:PORT,...",
        help="Spread the layers over llama.cpp RPC servers (ggml-rpc-server; needs a build with "
        "GGML_RPC=ON: python -m loopcpp.build dev --rpc).",
    ),
    click.option(
        "-ngl",
        "--gpu-layers",
        type=int,
        metavar="N",
        help="Layers to place on GPU/RPC devices [default: all with --rpc, else none]; "
        "-1 is all.",
    ),
    click.option(
        "--override-kv",
        "override_kv",
        multiple=True,
        metavar="KEY=TYPE:VALUE",
        callback=override_kv,
        help="Override a GGUF metadata key at load, as llama.cpp's tools do (TYPE: int, float, "
        "bool, str; repeatable). loop.* keys are refused: use the loop options.",
    ),
]


def run_options(f: Any) -> Any:
    """Add the options of a command that runs a model; the command receives them as one
    ``llama: dict`` (the keyword arguments of ``loopcpp.load``)."""

    @functools.wraps(f)
    def command(*args: Any, **kwargs: Any) -> Any:
        given = [kwargs.pop(n) for n in ("n_ctx", "threads", "rpc", "gpu_layers", "override_kv")]
        return f(*args, llama=llama_kwargs(*given), **kwargs)

    for opt in reversed(run_options_list):
        command = opt(command)
    return command


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def load_looped(
    model: str, loop_args: LoopRequest, **llama_kwargs: Any
) -> tuple[Any, GGUFModel, Resolved]:
    """Resolve the loop of a run-time command and load MODEL with it."""
    from loopcpp.api import load

    m = read_for_loop(model_arg(model), loop_args)
    r = resolve_for(m, loop_args)
    llm = load(m.path, loop=r.loop if r.loop is not None else False, **llama_kwargs)
    return llm, m, r
