"""The bench's statistics: paired ratios, their spread and the target verdicts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from loopcpp.bench import Result, Variant, paired_ratios, ratio_interval, targets, verdict


def result(name: str, prefill: list[float], decode: list[float], weight: int = 100,
           state: int = 10) -> Result:
    return Result(name, prefill_tps=prefill, decode_tps=decode, weight_bytes=weight,
                  state_bytes=state)


def test_paired_ratios_are_time_ratios_round_by_round() -> None:
    slow = result("a", [50.0, 100.0], [10.0, 10.0])
    fast = result("b", [100.0, 200.0], [20.0, 10.0])
    assert paired_ratios(slow, fast, "prefill") == [2.0, 2.0]
    assert paired_ratios(slow, fast, "decode") == [2.0, 1.0]


def test_ratio_interval_and_verdict() -> None:
    assert ratio_interval([1.2]) == pytest.approx((1.2, 1.2, 1.2))
    # a ratio and its inverse average to 1 (geometric mean)
    low, mid, high = ratio_interval([2.0, 0.5])
    assert mid == pytest.approx(1.0) and low < 1 < high
    # logs: mean 0, sd of (0.1, -0.1, 0.1, -0.1) = 0.11547; t(3) = 3.182; half = 0.18371
    low, mid, high = ratio_interval([math.exp(x) for x in (0.1, -0.1, 0.1, -0.1)])
    assert (low, mid, high) == pytest.approx((math.exp(-0.18371), 1.0, math.exp(0.18371)),
                                             rel=1e-4)
    # more rounds of the same spread narrow the interval
    wide = ratio_interval([1.0, 1.05, 0.95, 1.02])
    narrow = ratio_interval([1.0, 1.05, 0.95, 1.02] * 4)
    assert narrow[2] - narrow[0] < (wide[2] - wide[0]) / 2
    assert verdict(0.98, 1.03, 1.03) == "met"
    assert verdict(1.01, 1.04, 1.03) == "inside the noise"
    assert verdict(1.031, 1.05, 1.03) == "not met"
    assert verdict(0.99, 1.01, None) == "met"
    assert verdict(1.01, 1.02, None) == "not met"
    assert verdict(1.0, 1.0, 1.03, n=1) == "inside the noise"


def test_targets_pair_loops_with_the_frankenmerge_of_the_same_evaluations() -> None:
    m = Path("m.gguf")
    variants = [
        Variant("stock", m, m, layer_evals=30),
        Variant("loop off", None, m, layer_evals=30),
        Variant("K=2", None, m, layer_evals=34),
        Variant("K=3", None, m, layer_evals=38),
        Variant("K=3 apply=prefill", None, m, layer_evals=38),
        Variant("frankenmerge x2", m, m, layer_evals=34),
        Variant("frankenmerge x3", m, m, layer_evals=38),
    ]
    results = {
        "stock": result("stock", [100, 100, 100], [50, 50, 50]),
        "loop off": result("loop off", [101, 99, 100], [50, 49, 51]),
        "K=2": result("K=2", [90, 90, 90], [45, 45, 45]),
        "K=3": result("K=3", [70, 70, 70], [40, 40, 40]),
        "K=3 apply=prefill": result("K=3 apply=prefill", [70, 70, 70], [45, 45, 45]),
        "frankenmerge x2": result("frankenmerge x2", [90, 90, 90], [44, 44, 44], weight=120,
                                  state=12),
        "frankenmerge x3": result("frankenmerge x3", [80, 80, 80], [40, 40, 40], weight=140,
                                  state=14),
    }
    rows = {(t["target"], t["phase"]): t for t in targets(results, variants)}
    assert all(t.get("clock", "wall") == "wall" for t in rows.values())
    assert rows[("loop off / stock: within noise", "prefill")]["verdict"] == "met"
    assert rows[("K=2 / frankenmerge x2: within 3 %", "prefill")]["ratio"] == 1.0
    assert rows[("K=2 / frankenmerge x2: within 3 %", "decode")]["verdict"] == "met"
    k3 = rows[("K=3 / frankenmerge x3: within 3 %", "prefill")]
    assert k3["ratio"] == pytest.approx(80 / 70, abs=1e-3) and k3["verdict"] == "not met"
    assert ("K=2 / frankenmerge x3: within 3 %", "prefill") not in rows
    pf = rows[("K=3 apply=prefill / stock: decode within 2 %", "decode")]
    assert pf["ratio"] == pytest.approx(50 / 45, abs=1e-3) and pf["verdict"] == "not met"
    mem = rows[("K=3: 0 extra weight and KV bytes", "memory")]
    assert mem["extra_weight_bytes"] == 0 and mem["verdict"] == "met"


def test_cpu_clock_targets_use_cpu_time() -> None:
    m = Path("m.gguf")
    variants = [Variant("stock", m, m, layer_evals=30),
                Variant("loop off", None, m, layer_evals=30)]
    stock = result("stock", [100, 100], [50, 50])
    off = result("loop off", [50, 50], [25, 25])  # half the wall-clock speed
    stock.prefill_cpu_tps, stock.decode_cpu_tps = [100, 101], [50, 50]
    off.prefill_cpu_tps, off.decode_cpu_tps = [101, 100], [50, 50]  # the same CPU time
    wall = {t["phase"]: t for t in targets({"stock": stock, "loop off": off}, variants)}
    cpu = {t["phase"]: t for t in targets({"stock": stock, "loop off": off}, variants, "cpu")}
    assert wall["prefill"]["ratio"] == 2.0 and wall["prefill"]["verdict"] == "not met"
    assert cpu["prefill"]["ratio"] == pytest.approx(1.0) and cpu["prefill"]["verdict"] == "met"
    with pytest.raises(ValueError, match="unknown clock"):
        targets({"stock": stock}, variants, "gpu")


def test_rounds_alternate_direction(monkeypatch: pytest.MonkeyPatch) -> None:
    import loopcpp.bench as bench

    order: list[str] = []

    def fake_run(v: Variant, *args: object, **kwargs: object) -> dict[str, object]:
        order.append(v.name)
        return {"prefill_tps": 1.0, "decode_tps": 1.0, "prefill_cpu_tps": 1.0,
                "decode_cpu_tps": 1.0, "state_bytes": 0, "rss_mib": 0.0, "logits_sha": "x"}

    monkeypatch.setattr(bench, "run_variant", fake_run)
    here = Path(__file__)
    variants = [Variant(n, None, here) for n in ("a", "b", "c")]
    results = bench.measure(variants, rounds=3, progress=False)
    assert order == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert all(len(r.prefill_tps) == 3 for r in results.values())
