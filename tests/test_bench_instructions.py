"""scripts/bench_instructions.py: callgrind dump parsing and its variants; bench's merges."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import write_synthetic_gguf

from loopcpp.config import LoopConfig, LoopConfigError

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_instructions.py"
_spec = importlib.util.spec_from_file_location("bench_instructions", SCRIPT)
bi = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bi)


def _dump(path: Path, total: int, key: str = "totals") -> Path:
    # the shape of a callgrind 3.19 dump: header, cost lines, the total at the end
    path.write_text(f"# callgrind format\nversion: 1\ncreator: callgrind-3.19.0\n"
                    f"events: Ir\nsummary: {total}\n\nfn=(1) llama_decode\n0 {total}\n\n"
                    f"{key}: {total}\n")
    return path


def test_dumps_are_read_in_dump_order_not_name_order(tmp_path: Path) -> None:
    # OUT.10 sorts before OUT.2 by name; the final dump (program end) is OUT itself
    paths = [_dump(tmp_path / f"cg.out.{i}", 100 * i) for i in range(1, 12)]
    paths.append(_dump(tmp_path / "cg.out", 0))
    counts = bi.parse_dumps(sorted(paths))
    assert counts == [100 * i for i in range(1, 12)] + [0]
    assert bi.decode_calls(counts, 9) == [100 * i for i in range(1, 12)]


def test_a_dump_with_only_a_summary_line_counts(tmp_path: Path) -> None:
    path = tmp_path / "cg.out.1"
    path.write_text("version: 1\nevents: Ir\nsummary: 1234\n")
    assert bi.parse_dumps([path]) == [1234]
    (tmp_path / "cg.out.2").write_text("garbage\n")
    with pytest.raises(ValueError, match="cg.out.2"):
        bi.parse_dumps([path, tmp_path / "cg.out.2"])


@pytest.mark.parametrize("counts", [
    [5, 6, 7],           # one call missing
    [5, 0, 7, 8],        # an empty dump where a call should be
    [5, 6, 7, 8, 9],     # a call too many (instructions after the last decode)
])
def test_a_wrong_number_of_calls_is_refused(counts: list[int]) -> None:
    with pytest.raises(ValueError, match="expected 4"):
        bi.decode_calls(counts, 2)


@pytest.mark.parametrize("n_layer", [24, 30])
def test_variants_match_layer_evaluations_of_the_paper_recipe(n_layer: int) -> None:
    loop = LoopConfig.recipe("paper", n_layer)
    plan = bi.variants(loop, n_layer)
    names = [v[0] for v in plan]
    assert names == ["stock", "loop", "frankenmerge x6", "loop kv=refined", "frankenmerge x7"]
    for _, _, copies, evals in plan:
        if copies:  # a merge stores the window `copies` times: n + (copies - 1) * width layers
            assert n_layer + (copies - 1) * loop.width == evals
    assert plan[1][1]["loop.anchor"] == 0.5 and plan[3][1]["loop.kv"] == "refined"
    assert plan[3][3] == loop.with_(kv="refined").layer_evals(n_layer) == plan[1][3] + loop.width


def test_no_frankenmerge_fits_a_loop_is_refused() -> None:
    with pytest.raises(LoopConfigError, match="no frankenmerge"):
        bi.merge_copies(_odd_loop(), 8)


def _odd_loop() -> LoopConfig:
    class Odd(LoopConfig):  # a loop whose evaluations no whole number of copies matches
        def layer_evals(self, n_layer: int) -> int:
            return n_layer + self.width + 1
    return Odd(2, 6, count=2)


def test_ratios_are_the_targets_of_issue_13() -> None:
    rows = {
        "stock": {"layer_evals": 30, "prefill_per_token": 30.0, "decode_per_token": 31.0},
        "loop": {"layer_evals": 50, "prefill_per_token": 51.0, "decode_per_token": 31.31},
        "frankenmerge x6": {"layer_evals": 50, "prefill_per_token": 50.0,
                            "decode_per_token": 52.0},
        "loop kv=refined": {"layer_evals": 54, "prefill_per_token": 55.08,
                            "decode_per_token": 31.0},
        "frankenmerge x7": {"layer_evals": 54, "prefill_per_token": 54.0,
                            "decode_per_token": 56.0},
    }
    r = bi.ratios(rows, "prefill")
    assert r["loop prefill / frankenmerge x6 (<= 1.03)"] == pytest.approx(1.02)
    assert r["loop decode / stock, apply=prefill (<= 1.02)"] == pytest.approx(1.01)
    assert r["refined prefill / frankenmerge x7"] == pytest.approx(1.02)
    assert r["ideal refined / loop (layer evaluations)"] == pytest.approx(54 / 50)
    assert r["refined / loop over its ideal (within 0.97..1.03)"] == pytest.approx(
        (55.08 / 51.0) / (54 / 50))


def test_bench_frankenmerges_match_kv_refined_and_run_without_the_stock_build(
        tmp_path: Path) -> None:
    from loopcpp.bench import loop_variants

    model = write_synthetic_gguf(tmp_path / "m.gguf", n_layer=8)
    loop = LoopConfig(2, 6, count=3, kv="refined")
    variants = loop_variants(model, loop, [3], stock_lib=None, merge_dir=tmp_path / "fm")
    merges = [v for v in variants if v.name.startswith("frankenmerge")]
    # 3 evaluations of the window plus the refined pass: 4 copies, the loop's evaluations
    assert [v.name for v in merges] == ["frankenmerge x4 (patched build)"]
    looped = next(v for v in variants if v.name == "K=3")
    assert merges[0].layer_evals == looped.layer_evals == loop.layer_evals(8) == 8 + 3 * 4
    assert (tmp_path / "fm" / "m.fm2-6x4.gguf").exists()
