"""`loopcpp generate` as a user runs it, and how it picks the loop."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from loopcpp import LoopConfig, LoopConfigError
from loopcpp.cli import cli
from loopcpp.convert import write_loop_metadata
from loopcpp.gguf_io import read_model
from loopcpp.models import fetch
from loopcpp.resolve import LoopRequest, resolve


@pytest.fixture(scope="module")
def smol():
    return fetch("smollm2-135m-instruct")


def test_compare_shows_stock_and_looped(smol):
    args = [
        "generate",
        "smollm2-135m-instruct",
        "-p",
        "What is 2 + 2?",
        "-n",
        "12",
        "--count",
        "3",
        "--threads",
        "2",
        "--compare",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "stock (30 layers)" in result.output
    assert "looped layers [13, 17) x K=3" in result.output
    assert result.output.count("tok/s") == 2


def test_plain_generate_prints_the_text(smol):
    result = CliRunner().invoke(
        cli,
        [
            "generate",
            str(smol),
            "-p",
            "The capital of France is",
            "--raw",
            "-n",
            "4",
            "--start",
            "10",
            "--end",
            "12",
            "--method",
            "rk3",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output


def test_resolve_order(smol, tmp_path):
    m = read_model(smol)

    def loop(**kw):
        depth = {k: kw.pop(k) for k in ("depth", "width", "no_loop", "recipe") if k in kw}
        r = resolve(LoopRequest(kw, **depth), m.n_layer, base=m.loop)
        return r.loop, r.source

    assert loop(start=2, end=5, count=4)[0] == LoopConfig(2, 5, count=4)
    assert loop(no_loop=True)[0] is None
    depth, why = loop(method="rk3")
    assert depth == LoopConfig(13, 17, method="rk3") and why.startswith("depth rule")
    looped = write_loop_metadata(smol, tmp_path / "l.gguf", LoopConfig(3, 9, count=5))
    m = read_model(looped)
    from_file, why = loop(kv="first")
    assert from_file == LoopConfig(3, 9, count=5, kv="first") and "metadata" in why
    # an explicit window changes the file's loop; a recipe replaces it
    assert loop(start=1, end=4)[0] == LoopConfig(1, 4, count=5)
    assert loop(recipe="paper")[0] == LoopConfig.recipe("paper", 30)
    with pytest.raises(LoopConfigError, match="out of range"):
        loop(start=20, end=40)
