"""The bench: its statistics (paired ratios, their spread, the target verdicts;
loopcpp.bench_stats), its worker process (loopcpp.bench_worker) and the rounds of
loopcpp.bench."""

from __future__ import annotations

from pathlib import Path

import pytest

from loopcpp.bench import targets
from loopcpp.bench_stats import Result, paired_ratios, ratio_interval, verdict
from loopcpp.bench_worker import Variant


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
    assert ratio_interval([1.2]) == (1.2, 1.2, 1.2)
    # below 6 ratios the interval is min..max; from 10 on it drops the extremes
    assert ratio_interval([3.0, 1.0, 2.0]) == (1.0, 2.0, 3.0)
    assert ratio_interval([float(x) for x in range(1, 11)]) == (2.0, 5.5, 9.0)
    assert ratio_interval([float(x) for x in range(1, 31)]) == (10.0, 15.5, 21.0)
    # one wild run does not move it
    calm = [1.0, 1.01, 0.99, 1.02, 0.98, 1.0, 1.01, 0.99, 1.0, 1.0]
    low, _, high = ratio_interval([*calm[:-1], 5.0])
    assert (low, high) == (0.99, 1.02)
    assert verdict(0.98, 1.03, 1.03) == "met"
    assert verdict(1.01, 1.04, 1.03) == "inside the noise"
    assert verdict(1.031, 1.05, 1.03) == "not met"
    assert verdict(0.99, 1.01, None) == "met"
    assert verdict(1.01, 1.02, None) == "not met"
    assert verdict(0.97, 0.99, None) == "met: faster"
    assert verdict(1.0, 1.0, 1.03, n=5) == "inside the noise"  # too few rounds


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
    six = 6
    results = {
        "stock": result("stock", [100] * six, [50] * six),
        "loop off": result("loop off", [101, 99, 100] * 2, [50, 49, 51] * 2),
        "K=2": result("K=2", [90] * six, [45] * six),
        "K=3": result("K=3", [70] * six, [40] * six),
        "K=3 apply=prefill": result("K=3 apply=prefill", [70] * six, [45] * six),
        "frankenmerge x2": result("frankenmerge x2", [90] * six, [44] * six, weight=120,
                                  state=12),
        "frankenmerge x3": result("frankenmerge x3", [80] * six, [40] * six, weight=140,
                                  state=14),
    }
    rows = {(t["target"], t["phase"]): t for t in targets(results, variants)}
    assert all(t.get("clock", "wall") == "wall" for t in rows.values())
    assert rows[("loop off / stock: no slower", "prefill")]["verdict"] == "met"
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
    stock = result("stock", [100] * 6, [50] * 6)
    off = result("loop off", [50] * 6, [25] * 6)  # half the wall-clock speed
    stock.prefill_cpu_tps, stock.decode_cpu_tps = [100, 101] * 3, [50] * 6
    off.prefill_cpu_tps, off.decode_cpu_tps = [101, 100] * 3, [50] * 6  # the same CPU time
    wall = {t["phase"]: t for t in targets({"stock": stock, "loop off": off}, variants)}
    cpu = {t["phase"]: t for t in targets({"stock": stock, "loop off": off}, variants, "cpu")}
    assert wall["prefill"]["ratio"] == 2.0 and wall["prefill"]["verdict"] == "not met"
    assert cpu["prefill"]["ratio"] == pytest.approx(1.0) and cpu["prefill"]["verdict"] == "met"
    with pytest.raises(ValueError, match="unknown clock"):
        targets({"stock": stock}, variants, "gpu")


def test_rounds_alternate_direction(monkeypatch: pytest.MonkeyPatch) -> None:
    import loopcpp.bench as bench

    order: list[str] = []
    loads: list[str] = []

    class FakeWorker:
        def __init__(self, v: Variant, *args: object, **kwargs: object) -> None:
            self.name = v.name
            loads.append(v.name)

        def run(self) -> dict[str, object]:
            order.append(self.name)
            return {"prefill_tps": 1.0, "decode_tps": 1.0, "prefill_cpu_tps": 1.0,
                    "decode_cpu_tps": 1.0, "logits_sha": "x"}

        def close(self) -> dict[str, object]:
            return {"state_bytes": 7, "rss_mib": 1.0}

        def kill(self) -> None:
            pass

    monkeypatch.setattr(bench, "Worker", FakeWorker)
    here = Path(__file__)
    variants = [Variant(n, None, here) for n in ("a", "b", "c")]
    results = bench.measure(variants, rounds=3, progress=False, repeat=2, reload_every=2)
    assert order == [x for x in "abccbaabc" for _ in range(2)]
    assert loads == ["a", "b", "c", "a", "b", "c"]  # fresh processes for round 3
    assert all(len(r.prefill_tps) == 3 and r.state_bytes == 7 for r in results.values())
    # by default every round gets fresh processes: independent draws of memory placement
    loads.clear()
    bench.measure(variants, rounds=3, progress=False)
    assert loads == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]  # in each round's order


def test_worker_reports_a_failed_load(tmp_path: Path) -> None:
    from loopcpp.bench_worker import Worker

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(RuntimeError, match="benchmark of junk failed"):
        Worker(Variant("junk", None, junk), 8, 2, 1)


def test_worker_env_sets_the_library_and_the_huge_page_tunable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from loopcpp.bench_worker import worker_env

    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", "/elsewhere")
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    env = worker_env(Path("/lib/stock"), "hugepages")
    assert env["LLAMA_CPP_LIB_PATH"] == "/lib/stock"
    assert env["LD_LIBRARY_PATH"].split(":")[0] == "/lib/stock"  # its own libggml*
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    env = worker_env(None, "read")
    assert "LLAMA_CPP_LIB_PATH" not in env  # the installed library
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"


def test_worker_refuses_an_unknown_weights_mode() -> None:
    from loopcpp.bench_worker import Worker

    with pytest.raises(ValueError, match="hugepages, read, mmap"):
        Worker(Variant("x", None, Path(__file__)), 8, 2, 1, weights="swap")


def _thp_mode() -> str | None:
    """The kernel's transparent huge page setting: always, madvise, never (None: unknown)."""
    knob = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not knob.exists():
        return None
    text = knob.read_text()
    return text[text.index("[") + 1 : text.index("]")] if "[" in text else None


@pytest.mark.parametrize("weights", ["hugepages", "read", "mmap"])
def test_worker_holds_the_weights_as_asked(
    patched: None, smollm2_path: Path, weights: str
) -> None:
    """read/hugepages: no mapping of the file; hugepages: weights in THP; mmap: mapped."""
    from loopcpp.bench_worker import Worker

    worker = Worker(Variant("smol", None, smollm2_path), 8, 2, 1, weights=weights)
    try:
        assert worker.run()["decode_tps"] > 0
        final = worker.close()
    finally:
        worker.kill()
    if final["model_mapped"] is None:
        pytest.skip("no /proc/self/smaps here")
    assert final["model_mapped"] is (weights == "mmap")
    thp = _thp_mode()
    if weights == "hugepages" and thp in ("madvise", "always"):
        assert final["huge_mib"] >= 2  # the 94 MB weight buffer is in huge pages
    if weights == "read" and thp == "madvise":
        assert final["huge_mib"] == 0  # only what asks for them gets them


def test_logits_digests_merge_to_nondeterministic_on_any_difference() -> None:
    from loopcpp.bench import _same_digest

    assert _same_digest("", ["a", "a"]) == "a"
    assert _same_digest("a", ["a"]) == "a"
    assert _same_digest("a", ["b"]) == "nondeterministic"
    assert _same_digest("", ["a", "b", "a"]) == "nondeterministic"
    assert _same_digest("nondeterministic", ["a"]) == "nondeterministic"


@pytest.mark.parametrize("fresh", [True, False])
def test_worker_runs_a_fresh_copy_of_its_library(
    patched: None, smollm2_path: Path, fresh: bool
) -> None:
    """fresh_lib: the process maps libggml-cpu from a copy of the folder, removed afterwards."""
    from loopcpp.bench_worker import Worker, library_dir

    worker = Worker(Variant("smol", None, smollm2_path), 8, 2, 1, fresh_lib=fresh)
    try:
        copy = worker._lib_copy
        final = worker.close()
    finally:
        worker.kill()
    if final["libggml_cpu"] is None:
        pytest.skip("no /proc/self/smaps here")
    mapped = Path(final["libggml_cpu"])
    if fresh:
        assert copy is not None and mapped.parent == copy / "lib"
        assert not copy.exists()  # removed with the process
    else:
        assert copy is None and mapped.parent == library_dir(None).resolve()
