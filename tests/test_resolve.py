"""The one resolver (loopcpp.resolve): its refusals through every command, chat's /loop, the
server's request field and the Python API; the presets; options generated from FIELDS.

Every refusal is raised before any model is loaded, so none of these needs llama.cpp.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import gguf
import pytest
from click.testing import CliRunner
from conftest import write_synthetic_gguf

from loopcpp import resolve as r
from loopcpp.chat import parse_command
from loopcpp.cli import cli
from loopcpp.config import FIELDS, RECIPES, Field, LoopConfig, LoopConfigError
from loopcpp.gguf_io import read_model
from loopcpp.serve import loop_override

U32 = gguf.GGUFValueType.UINT32

#: refusal -> (command-line options, chat /loop line, server/API "loop" mapping, text)
REFUSALS: dict[str, tuple[list[str], str, dict[str, Any] | None, str]] = {
    "no-loop with settings": (["--no-loop", "--count", "3"], "/loop off k=3", None,
                              r.REFUSE_NO_LOOP),
    "half a window": (["--start", "3"], "/loop start=3", {"start": 3}, r.REFUSE_HALF_WINDOW),
    "window and depth": (["--start", "1", "--end", "3", "--depth", "0.7"],
                         "/loop window=1:3 depth=0.7", {"start": 1, "end": 3, "depth": 0.7},
                         r.REFUSE_WINDOW_AND_DEPTH),
    "recipe and depth": (["--recipe", "paper", "--depth", "0.6"], "/loop recipe=paper depth=0.6",
                         {"recipe": "paper", "depth": 0.6}, r.REFUSE_RECIPE_AND_DEPTH),
}

#: command -> the arguments before the loop options ({m}: the model, {t}: a text file)
COMMANDS = {
    "convert": ["convert", "{m}", "-o", "{o}"],
    "generate": ["generate", "{m}", "-p", "hi"],
    "chat": ["chat", "{m}"],
    "serve": ["serve", "{m}"],
    "eval": ["eval", "{m}", "--task", "ppl", "--text", "{t}"],
    "bench": ["bench", "{m}"],
}


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "t.txt"
    text.write_text("some text to measure\n")
    return {"m": write_synthetic_gguf(tmp_path / "m16.gguf", n_layer=16), "t": text,
            "o": tmp_path / "out.gguf"}


def run(*args: Any) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="loopcpp")


@pytest.mark.parametrize(
    ("command", "refusal"),
    # bench measures loops: it has no --no-loop
    [(c, k) for c in COMMANDS for k in REFUSALS if (c, k) != ("bench", "no-loop with settings")],
)
def test_every_command_refuses_the_same(
    files: dict[str, Path], command: str, refusal: str
) -> None:
    options, _, _, text = REFUSALS[refusal]
    args = [files.get(a[1:-1], a) if a.startswith("{") else a for a in COMMANDS[command]]
    result = run(*args, *options)
    assert result.exit_code == 2, result.output  # a usage error
    assert text[:40] in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output
    assert not files["o"].exists()


@pytest.mark.parametrize("refusal", REFUSALS)
def test_chat_loop_refuses_the_same(refusal: str) -> None:
    _, line, _, text = REFUSALS[refusal]
    with pytest.raises(r.LoopRequestError, match=text[:30].replace("(", r"\(")):
        parse_command(line, None, None, n_layer=16)


@pytest.mark.parametrize("refusal", [k for k, v in REFUSALS.items() if v[2] is not None])
def test_server_and_api_refuse_the_same(
    files: dict[str, Path], refusal: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loopcpp import api

    _, _, body, text = REFUSALS[refusal]
    m = read_model(files["m"])
    with pytest.raises(r.LoopRequestError) as e:
        loop_override(body, None, m)
    assert str(e.value) == text
    monkeypatch.setattr(api, "_make_looped_class", lambda: pytest.fail("loaded"))
    monkeypatch.setattr(api, "_looped_class", None)
    with pytest.raises(r.LoopRequestError) as e:
        api.load(files["m"], loop=body)
    assert str(e.value) == text


def test_the_depth_disagreement_of_issue_14() -> None:
    """``--start 1 --end 3`` with ``--depth 0.7`` was [1, 3) for generate and an error for
    convert: it is one refusal now, whatever the base."""
    request = r.LoopRequest({"start": 1, "end": 3}, depth=0.7)
    for base in (None, LoopConfig(5, 9)):
        with pytest.raises(r.LoopRequestError, match="not both"):
            r.resolve(request, 36, base)


# -- the order of the sources --------------------------------------------------------------


def test_resolution_order() -> None:
    base = LoopConfig(5, 9, count=3, method="rk3")
    res = r.resolve(r.LoopRequest(), 30)
    assert res.loop == LoopConfig(13, 17) and res.source.startswith("depth rule: 30 layers")
    assert r.resolve(r.LoopRequest(), 30, base).loop == base
    assert r.resolve(r.LoopRequest({"count": 4}), 30, base).loop == base.with_(count=4)
    assert r.resolve(r.LoopRequest({"start": 1, "end": 2}), 30, base).loop == base.with_(
        start=1, end=2)
    assert r.resolve(r.LoopRequest({"start": 2}), 30, base).loop == base.with_(start=2)
    assert r.resolve(r.LoopRequest(depth=0.6), 30, base).loop == base.with_(start=16, end=20)
    # a recipe replaces the base; explicit settings override its fields
    paper = r.resolve(r.LoopRequest({"count": 4}, recipe="paper"), 36, base)
    assert paper.loop == LoopConfig.recipe("paper", 36, count=4)
    assert paper.source.startswith("recipe paper: width 4") and "count=4 as asked" in paper.source
    moved = r.resolve(r.LoopRequest({"start": 3, "end": 7}, recipe="paper"), 36)
    assert (moved.loop.start, moved.loop.end, moved.loop.count) == (3, 7, 6)
    off = r.resolve(r.LoopRequest(no_loop=True), 30, base)
    assert off.loop is None and off.text() == "off (the stock model), --no-loop"
    with pytest.raises(LoopConfigError, match="out of range for a model with 30 layers"):
        r.resolve(r.LoopRequest({"start": 20, "end": 40}), 30)
    with pytest.raises(LoopConfigError, match="unknown recipe 'pape'"):
        r.LoopRequest(recipe="pape")


class Stop(Exception):
    """Raised by a stand-in for api.load: the command got as far as loading."""


def _stop_at_load(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    from loopcpp import api

    loaded: list[Any] = []

    def load(path: Any, loop: Any = None, **kwargs: Any) -> Any:
        loaded.append(loop)
        raise Stop

    monkeypatch.setattr(api, "load", load)
    return loaded


def test_no_loop_text_is_said_once(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _stop_at_load(monkeypatch)
    result = run("generate", files["m"], "-p", "hi", "--no-loop")
    assert isinstance(result.exception, Stop)
    text = " ".join(result.output.split())
    assert "loop: off (the stock model), --no-loop" in text, text
    assert "no loop (--no-loop)" not in text


# -- presets -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n_layer", "paper", "moe"),
    [
        (36, (15, 19), (22, 25)),  # LOOPING.md: Qwen3-4B, 36 layers -> [15, 19)
        (30, (12, 16), (18, 21)),
        (48, (21, 25), (29, 33)),
        (24, (9, 13), (14, 16)),
        (16, (7, 9), (10, 12)),  # under 24 layers: n_layer/8, at least 2
        (23, (9, 12), (14, 16)),
        (2, (0, 2), (0, 2)),
    ],
)
def test_recipe_windows(n_layer: int, paper: tuple[int, int], moe: tuple[int, int]) -> None:
    p = LoopConfig.recipe("paper", n_layer)
    assert (p.start, p.end) == paper
    assert p.end - 1 == n_layer // 2 or n_layer < 4  # ends at the middle layer
    m = LoopConfig.recipe("paper-moe", n_layer)
    assert (m.start, m.end) == moe


def test_recipe_settings_follow_looping_md() -> None:
    p = LoopConfig.recipe("paper", 36)
    assert (p.mode, p.method, p.count, p.anchor, p.kv, p.apply) == (
        "block", "euler", 6, 0.5, "first", "prefill")
    m = LoopConfig.recipe("paper-moe", 36)
    assert (m.mode, m.method, m.count, m.anchor, m.norm, m.routing, m.kv, m.apply) == (
        "layer", "euler", 6, 0.5, "interp", "frozen", "first", "all")
    assert LoopConfig.recipe("paper", read_model_like(36), count=3).count == 3
    with pytest.raises(LoopConfigError, match="unknown recipe"):
        LoopConfig.recipe("nope", 36)


def read_model_like(n_layer: int) -> Any:
    return type("M", (), {"n_layer": n_layer})()


def test_convert_writes_a_recipe_as_plain_keys_and_info_names_it(
    files: dict[str, Path],
) -> None:
    out = files["o"]
    result = run("convert", files["m"], "-o", out, "--recipe", "paper")
    assert result.exit_code == 0, result.output
    assert "recipe paper" in result.output
    m = read_model(out)
    assert m.loop == LoopConfig.recipe("paper", 16)
    keys = {k for k in m.file.fields if k.startswith("loop.")}
    assert "loop.anchor" in keys and not any("recipe" in k for k in keys)
    info = run("info", out)
    assert "preset:        recipe paper (--recipe paper)" in info.output, info.output
    assert json.loads(run("info", out, "--json").output)["recipe"] == {
        "name": "paper", "match": "exact"}
    other = files["o"].with_name("moved.gguf")
    assert run("convert", files["m"], "-o", other, "--recipe", "paper", "--start", "2",
               "--end", "4").exit_code == 0
    assert "recipe paper's settings on the window [2, 4)" in run("info", other).output
    plain = files["o"].with_name("plain.gguf")
    assert run("convert", files["m"], "-o", plain).exit_code == 0
    assert "preset" not in run("info", plain).output


def fake_llama(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """api.load with a stand-in for the Llama class: the keyword arguments it got, and
    set_loop calls, in order."""
    from loopcpp import api

    seen: list[dict[str, Any]] = []

    class Fake:
        def __init__(self, model_path: str, **kwargs: Any) -> None:
            seen.append(kwargs)
            self._n_ctx = 64
            self.input_ids = [0] * 64

        def set_loop(self, loop: Any) -> None:
            seen.append({"set_loop": loop})

    monkeypatch.setattr(api, "_looped_class", Fake)
    monkeypatch.setattr(api, "llama_errors", _no_errors)
    return seen


def test_api_takes_a_recipe(files: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from loopcpp import api

    seen = fake_llama(monkeypatch)
    monkeypatch.setattr(api, "check_loop", lambda m, loop: loop.check(m.n_layer))
    api.load(files["m"], loop="paper", n_ctx=64)
    want = LoopConfig.recipe("paper", 16).to_kv_overrides()
    assert seen[-1]["kv_overrides"] == want
    api.load(files["m"], recipe="paper-moe", n_ctx=64)
    assert seen[-1]["kv_overrides"] == LoopConfig.recipe("paper-moe", 16).to_kv_overrides()
    api.load(files["m"], loop={"recipe": "paper", "count": 2}, n_ctx=64)
    assert seen[-1]["kv_overrides"]["loop.count"] == 2
    with pytest.raises(LoopConfigError, match="not both"):
        api.load(files["m"], loop="paper", recipe="paper")


class _no_errors:  # noqa: N801 - stands in for the context manager api.llama_errors
    def __enter__(self) -> list[str]:
        return []

    def __exit__(self, *exc: Any) -> None:
        return None


# -- generated from the table -----------------------------------------------------------------


def _loop_params(command: click.Command) -> dict[str, click.Parameter]:
    return {p.name: p for p in command.params if p.name in {f.name for f in FIELDS}}


@pytest.mark.parametrize("name", ["convert", "generate", "chat", "serve", "eval", "bench"])
def test_every_command_has_every_field_as_an_option(name: str) -> None:
    command = cli.commands[name]
    params = _loop_params(command)
    expected = [f for f in FIELDS if not (name == "bench" and f.name == "count")]
    assert list(params) == [f.name for f in expected]
    for f in expected:
        p = params[f.name]
        assert p.help is not None and f.help in p.help
        assert f"--{f.name.replace('_', '-')}" in p.opts
        if f.choices:
            assert tuple(p.type.choices) == f.choices
    assert "recipe" in {p.name for p in command.params}
    assert tuple(next(p for p in command.params if p.name == "recipe").type.choices) == tuple(
        RECIPES)


def test_a_new_field_appears_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """A row added to the table reaches the generated option, chat's help and the server's
    list with no other edit (LoopConfig itself is generated at import, so the row is
    patched into the generators' view of the table)."""
    from loopcpp import chat, cli_common, serve

    extra = Field("wobble", float, 0.25, "a setting added for this test", lo=0.0, hi=2.0,
                  version=3)
    table = (*FIELDS, extra)
    for module in (cli_common, chat, serve):
        monkeypatch.setattr(module, "FIELDS", table)

    @click.command()
    @cli_common.loop_options()
    def probe(loop_args: r.LoopRequest) -> None:
        click.echo(json.dumps(dict(loop_args.settings)))

    assert "--wobble" in {o for p in probe.params for o in p.opts}
    help_text = CliRunner().invoke(probe, ["--help"]).output
    assert "a setting added for this test, [0, 2] [default: 0.25]" in " ".join(help_text.split())
    monkeypatch.setattr(r, "FIELD", {**r.FIELD, "wobble": extra})  # the request's view
    assert json.loads(CliRunner().invoke(probe, ["--wobble", "1.5"]).output) == {"wobble": 1.5}
    assert "wobble=X" in chat._help() and "a setting added for this test; [0, 2]" in chat._help()
    monkeypatch.setattr(serve, "RECIPES", {})
    assert serve.settings_json(16)["fields"]["wobble"]["range"] == "[0, 2]"


def test_info_shows_every_field(files: dict[str, Path]) -> None:
    assert run("convert", files["m"], "-o", files["o"], "--anchor", "0.25").exit_code == 0
    out = run("info", files["o"]).output
    for f in FIELDS:
        assert f.key in out and f.help in out
    assert "loop.anchor        0.25" in out and "loop.mode          block     default" in out


# -- issue 18: a file whose loop keys are invalid --------------------------------------------


@pytest.fixture
def bad(tmp_path: Path) -> Path:
    return write_synthetic_gguf(tmp_path / "bad.gguf", n_layer=8, kv={
        "loop.start": (20, U32), "loop.end": (24, U32), "loop.count": (2, U32)})


def test_a_file_with_invalid_loop_keys_runs_with_run_time_settings(
    bad: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loopcpp import api

    seen = fake_llama(monkeypatch)
    with pytest.raises(ValueError, match="invalid loop metadata"):
        api.load(bad, n_ctx=64)  # the file's own loop: refused, naming the ways out
    api.load(bad, loop=False, n_ctx=64)
    overrides = seen[-2]["kv_overrides"]
    # every key of the file is overridden with a valid value, then the loop is turned off
    assert {"loop.start", "loop.end", "loop.count"} <= set(overrides)
    assert LoopConfig.from_gguf(overrides).check(8)
    assert seen[-1] == {"set_loop": None}
    api.load(bad, loop=LoopConfig(1, 3), n_ctx=64)
    assert LoopConfig.from_gguf(seen[-1]["kv_overrides"]) == LoopConfig(1, 3)


def test_a_file_with_invalid_loop_keys_through_the_cli(
    bad: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = _stop_at_load(monkeypatch)
    result = run("generate", bad, "-p", "hi")
    assert result.exit_code == 1 and "invalid loop metadata" in result.output
    assert "--no-loop" in result.output
    for args, want in ((["--no-loop"], False), (["--start", "1", "--end", "3"], LoopConfig(1, 3)),
                       (["--recipe", "paper"], LoopConfig.recipe("paper", 8))):
        loaded.clear()
        result = run("generate", bad, "-p", "hi", *args)
        assert isinstance(result.exception, Stop), result.output
        assert loaded == [want], result.output


def test_a_file_llama_cpp_refuses_whatever_the_overrides(tmp_path: Path) -> None:
    from loopcpp import api

    typed = write_synthetic_gguf(tmp_path / "typed.gguf", n_layer=8, kv={
        "loop.start": (1, U32), "loop.end": (3, U32), "loop.count": (2, U32),
        "loop.anchor": ("0.5", gguf.GGUFValueType.STRING)})
    with pytest.raises(LoopConfigError, match="convert .* --no-loop"):
        api.load(typed, loop=False)


def test_info_flags_the_bad_keys(bad: Path) -> None:
    result = run("info", bad)
    assert result.exit_code == 0, result.output
    assert "loop.start         20  <- INVALID" in result.output
    assert "loop.count         2\n" in result.output  # shown, not flagged
    assert "--no-loop" in result.output
    assert json.loads(run("info", bad, "--json").output)["loop_bad_keys"] == [
        "loop.start", "loop.end"]


def test_no_import_cycle_between_the_command_modules() -> None:
    import subprocess
    import sys

    code = ("import sys, loopcpp.cli_eval, loopcpp.cli_common; "
            "assert 'loopcpp.cli' not in sys.modules, 'cli_eval imports cli'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 0, proc.stderr
