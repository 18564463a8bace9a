"""loopcpp compare: the paired comparison of two eval results, on hand-made files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from loopcpp.cli import cli
from loopcpp.compare import CompareError, load_run, paired, sign_test


def write(path: Path, gold_right: list[bool], logp: list[float], task: str = "sciq",
          loop: dict | None = None) -> Path:
    items = []
    for i, (right, lp) in enumerate(zip(gold_right, logp, strict=True)):
        items.append({"id": f"{task}/{i}", "gold": 1, "pred": 1 if right else 0,
                      "pred_norm": 1, "logprobs": [-5.0, lp], "n_tokens": [1, 1]})
    path.write_text(json.dumps({"task": task, "n": len(items), "loop": loop, "items": items}))
    return path


def test_sign_test_values() -> None:
    # 7 gained, 1 lost: 2 * (C(8,0) + C(8,1)) / 2^8
    assert sign_test(7, 1) == pytest.approx(2 * 9 / 256)
    assert sign_test(1, 7) == sign_test(7, 1)
    assert sign_test(0, 0) == 1.0
    assert sign_test(3, 3) == 1.0
    assert sign_test(10, 0) == pytest.approx(2 / 1024)


def test_paired_counts_flips_and_logprob(tmp_path: Path) -> None:
    base = write(tmp_path / "a.json", [True, True, False, False, True], [-1, -2, -3, -4, -5])
    loop = {"start": 8, "end": 10, "count": 2, "method": "euler", "mode": "block"}
    other = write(tmp_path / "b.json", [True, False, True, True, True], [-0.5, -2, -2, -4, -6],
                  loop=loop)
    r = paired(load_run(base), load_run(other))
    assert r["n"] == 5 and r["base"] == "no loop" and r["other"] == "[8, 10) K=2 euler"
    assert (r["acc"]["gained"], r["acc"]["lost"]) == (2, 1)
    assert r["acc"]["base"] == pytest.approx(0.6) and r["acc"]["other"] == pytest.approx(0.8)
    assert r["acc"]["p"] == pytest.approx(sign_test(2, 1))
    assert (r["acc_norm"]["gained"], r["acc_norm"]["lost"]) == (0, 0)
    g = r["gold_logprob"]
    diffs = [0.5, 0, 1, 0, -1]
    assert g["delta"] == pytest.approx(0.1)
    sd = math.sqrt(sum((d - 0.1) ** 2 for d in diffs) / 4)
    assert g["delta_stderr"] == pytest.approx(sd / math.sqrt(5))
    assert (g["higher"], g["lower"]) == (2, 1)


def test_refuses_files_that_do_not_pair(tmp_path: Path) -> None:
    a = write(tmp_path / "a.json", [True, False], [-1, -2])
    with pytest.raises(CompareError, match="same --task"):
        paired(load_run(a), load_run(write(tmp_path / "b.json", [True, False], [-1, -2],
                                           task="arc_easy")))
    with pytest.raises(CompareError, match="same --task and --limit"):
        paired(load_run(a), load_run(write(tmp_path / "c.json", [True], [-1])))
    (tmp_path / "ppl.json").write_text(json.dumps({"task": "ppl", "ppl": 12.0}))
    with pytest.raises(CompareError, match="perplexity"):
        load_run(tmp_path / "ppl.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(CompareError, match="not JSON"):
        load_run(tmp_path / "junk.json")
    with pytest.raises(CompareError, match="no such file"):
        load_run(tmp_path / "missing.json")


def test_cli_compare(tmp_path: Path) -> None:
    a = write(tmp_path / "stock.json", [True] * 3 + [False] * 7, [-3.0] * 10)
    b = write(tmp_path / "loop.json", [True] * 10, [-2.0] * 10,
              loop={"start": 1, "end": 3, "count": 3, "method": "rk3", "mode": "layer"})
    out = tmp_path / "cmp.json"
    res = CliRunner().invoke(cli, ["compare", str(a), str(b), "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "+7 / -0" in res.output and "[1, 3) K=3 rk3 layer" in res.output
    assert "+1.000 ± 0.000" in res.output
    data = json.loads(out.read_text())
    assert data["comparisons"][0]["acc"]["p"] == pytest.approx(2 / 128)
    bad = CliRunner().invoke(cli, ["compare", str(a), str(tmp_path / "nope.json")])
    assert bad.exit_code == 1 and "no such file" in bad.output and "Traceback" not in bad.output
