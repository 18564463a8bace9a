"""The ``loopcpp`` command line: convert, window, info, frankenmerge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import assert_clean_error, write_synthetic_gguf

from loopcpp.cli import cli, main
from loopcpp.config import LoopConfig
from loopcpp.gguf_io import read_model

REPO = Path(__file__).resolve().parents[1]


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="loopcpp")


@pytest.fixture
def model16(tmp_path: Path) -> Path:
    return write_synthetic_gguf(tmp_path / "m16.gguf", n_layer=16)


def test_help_reads_like_a_man_page() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for section in ("SYNOPSIS", "DESCRIPTION", "THE WINDOW", "EXAMPLES"):
        assert section in result.output
    for command in ("convert", "window", "info", "frankenmerge"):
        assert command in result.output
    for command in ("convert", "window", "info", "frankenmerge"):
        assert run(command, "--help").exit_code == 0
    assert "--outtype [f32|f16|bf16|q8_0" in run("convert", "--help").output


def test_python_dash_m_and_main() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "loopcpp", "--help"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0 and "Usage: loopcpp" in proc.stdout
    assert callable(main)


def test_window_on_smollm2(smollm2_path: Path) -> None:
    result = run("window", smollm2_path)
    assert result.exit_code == 0, result.output
    assert "30 layers" in result.output
    assert "window: [13, 17)  (4 layers: --start 13 --end 17)" in result.output
    assert "30/8 = 3.75, rounded to 4" in result.output
    result = run("window", smollm2_path, "--depth", "0.65", "--width", "6")
    assert "[17, 23)" in result.output and "width 6 as asked" in result.output


def test_window_on_a_hugging_face_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 32}))
    result = run("window", tmp_path)
    assert result.exit_code == 0 and "[14, 18)" in result.output
    (tmp_path / "config.json").write_text("{}")
    assert_clean_error(run("window", tmp_path), "no num_hidden_layers")


def test_window_errors(tmp_path: Path, model16: Path) -> None:
    assert_clean_error(run("window", tmp_path / "nope.gguf"), "no such file")
    assert_clean_error(run("window", model16, "--depth", "2"), "depth 2.0 is out of range")
    assert_clean_error(run("window", model16, "--width", "17"), "use 1..16")


def test_convert_then_info(model16: Path, tmp_path: Path) -> None:
    out = tmp_path / "looped.gguf"
    result = run("convert", model16, "-o", out, "--count", "3", "--method", "rk3")
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and "[7, 9) x K=3 rk3/block" in result.output
    assert "why:    depth rule: 16 layers; width 2: 16/8 = 2" in result.output
    assert read_model(out).loop == LoopConfig(7, 9, 3, method="rk3")

    info = run("info", out)
    assert info.exit_code == 0, info.output
    assert "architecture:  llama" in info.output and "layers:        16" in info.output
    # 16 - 2 + 2 * 3 * 3 = 32 layer evaluations = 2x
    assert "32 layer evaluations per token = 2.000x" in info.output
    assert "(+0 bytes for the loop)" in info.output and "unchanged by the loop" in info.output

    assert "engine:        looping supported for llama" in info.output

    facts = json.loads(run("info", out, "--json").output)
    assert facts["loop"]["count"] == 3 and facts["compute_overhead"] == 2.0
    assert facts["extra_weight_bytes"] == 0 and facts["n_layer"] == 16
    assert facts["loop_supported"] is True


def test_unsupported_architecture_is_flagged(tmp_path: Path) -> None:
    src = write_synthetic_gguf(tmp_path / "f.gguf", n_layer=8, arch="kimi-k3")
    refused = run("convert", src, "-o", tmp_path / "o.gguf")
    assert refused.exit_code == 1 and "give --no-loop" in refused.output, refused.output
    assert not (tmp_path / "o.gguf").exists()
    result = run("convert", src, "-o", tmp_path / "o.gguf", "--no-loop")
    assert result.exit_code == 0, result.output
    assert "does not support architecture 'kimi-k3'" in run("info", tmp_path / "o.gguf").output


def test_convert_explicit_window_and_settings(model16: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.gguf"
    result = run(
        "convert",
        model16,
        "-o",
        out,
        "--start",
        "2",
        "--end",
        "5",
        "-k",
        "4",
        "--mode",
        "layer",
        "--kv",
        "first",
        "--routing",
        "fresh",
        "--apply",
        "prefill",
    )
    assert result.exit_code == 0, result.output
    assert read_model(out).loop == LoopConfig(
        2, 5, 4, mode="layer", kv="first", routing="fresh", apply="prefill"
    )
    info = run("info", out).output
    assert "decode 1.000x (apply=prefill)" in info


def test_info_without_loop(smollm2_path: Path) -> None:
    models = pytest.importorskip("loopcpp.models")
    by_name = run("info", "smollm2-135m-instruct")
    assert by_name.exit_code == 0, by_name.output
    assert str(models.fetch("smollm2-135m-instruct", progress=False)) in by_name.output
    result = run("info", smollm2_path)
    assert result.exit_code == 0, result.output
    assert "loop:          off (the stock model) (no loop.* keys)" in result.output
    assert "30 layer evaluations per token = 1.000x" in result.output
    assert "23,040 bytes per token" in result.output


def test_no_loop_removes_the_loop(model16: Path, tmp_path: Path) -> None:
    looped, plain = tmp_path / "l.gguf", tmp_path / "p.gguf"
    assert run("convert", model16, "-o", looped).exit_code == 0
    assert run("convert", looped, "-o", plain, "--no-loop").exit_code == 0
    assert read_model(plain).loop is None


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--start", "3"], "give both start and end"),
        (["--no-loop", "--count", "2"], "--no-loop cannot be combined"),
        (["--method", "simpson"], "'simpson' is not one of"),
    ],
)
def test_convert_usage_errors(
    model16: Path, tmp_path: Path, args: list[str], fragment: str
) -> None:
    result = run("convert", model16, "-o", tmp_path / "o.gguf", *args)
    assert result.exit_code == 2 and fragment in result.output
    assert not (tmp_path / "o.gguf").exists()


def test_convert_errors(model16: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.gguf"
    assert_clean_error(run("convert", tmp_path / "missing.gguf", "-o", out), "no such file")
    folder = tmp_path / "folder"
    folder.mkdir()
    assert_clean_error(run("convert", folder, "-o", out), "no config.json")
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(model16.read_bytes()[:-100])
    assert_clean_error(run("convert", truncated, "-o", out), "truncated GGUF file")
    assert_clean_error(
        run("convert", model16, "-o", out, "--start", "10", "--end", "20"),
        "[10, 20) is out of range for a model with 16 layers",
    )
    assert_clean_error(run("convert", model16, "-o", model16, "--force"), "output is the input")
    assert_clean_error(run("convert", model16, "-o", out, "--outtype", "f16"), "llama-quantize")
    assert_clean_error(run("convert", model16, "-o", out, "--count", "0"), "K=0")
    assert not out.exists()
    out.write_bytes(b"x")
    assert_clean_error(run("convert", model16, "-o", out), "already exists: pass --force")
    assert run("convert", model16, "-o", out, "--force").exit_code == 0


def test_info_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hi")
    assert_clean_error(run("info", text), "not a GGUF file")
    assert_clean_error(run("info", tmp_path), "is a directory")


def test_frankenmerge_command(model16: Path, tmp_path: Path) -> None:
    out = tmp_path / "merged.gguf"
    result = run("frankenmerge", model16, "-o", out, "--start", "6", "--end", "10", "--count", "3")
    assert result.exit_code == 0, result.output
    assert "16 -> 24 layers" in result.output
    assert read_model(out).n_layer == 24
    assert_clean_error(
        run("frankenmerge", model16, "-o", out, "--start", "6", "--end", "10", "--count", "3"),
        "already exists",
    )
    assert_clean_error(
        run(
            "frankenmerge",
            model16,
            "-o",
            tmp_path / "x.gguf",
            "--start",
            "6",
            "--end",
            "30",
            "--count",
            "2",
        ),
        "out of range",
    )
    missing = run("frankenmerge", model16, "-o", tmp_path / "y.gguf", "--start", "1")
    assert missing.exit_code == 2 and "Missing option" in missing.output


def test_window_shows_a_recipe_window(model16: Path) -> None:
    result = run("window", model16, "--recipe", "paper")
    assert result.exit_code == 0, result.output
    assert "window: [7, 9)  (2 layers: --start 7 --end 9)" in result.output
    assert "recipe paper: width 2: 16/8 = 2; ending at layer 8" in result.output
    facts = json.loads(run("window", model16, "--recipe", "paper-moe", "--json").output)
    assert (facts["start"], facts["end"], facts["recipe"]) == (10, 12, "paper-moe")
    assert run("window", model16, "--recipe", "paper", "--depth", "0.4").exit_code == 2
