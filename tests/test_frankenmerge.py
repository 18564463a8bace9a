"""Self-merges: window layers physically repeated (loopcpp.frankenmerge)."""

from __future__ import annotations

import filecmp
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from conftest import llama_logits, write_synthetic_gguf

from loopcpp.config import LoopConfig, LoopConfigError
from loopcpp.convert import write_loop_metadata
from loopcpp.frankenmerge import MergePlan, frankenmerge
from loopcpp.gguf_io import (
    KV,
    ModelFileError,
    TensorOut,
    read_gguf,
    read_model,
    rewrite_metadata,
    write_gguf,
)

VT = gguf.GGUFValueType


def norm_values(path: Path) -> dict[str, float]:
    """``{blk.i.attn_norm.weight: the constant it holds}`` (the synthetic source layer)."""
    reader = gguf.GGUFReader(path)
    return {t.name: float(t.data[0]) for t in reader.tensors if t.name.endswith("attn_norm.weight")}


def tensor_bytes(path: Path) -> dict[str, bytes]:
    out = {}
    with path.open("rb") as fh:
        for t in read_gguf(path).tensors:
            fh.seek(t.data_offset)
            out[t.name] = fh.read(t.n_bytes)
    return out


def test_layer_map() -> None:
    plan = MergePlan(n_layer=6, start=2, end=4, count=3)
    assert plan.layer_map == [0, 1, 2, 3, 2, 3, 2, 3, 4, 5]
    assert plan.n_layer_out == 10
    assert MergePlan(6, 0, 6, 1).layer_map == list(range(6))


def test_repeats_and_renumbers_layers(tmp_path: Path) -> None:
    src = write_synthetic_gguf(tmp_path / "s.gguf", n_layer=6)
    looped = write_loop_metadata(src, tmp_path / "l.gguf", LoopConfig(1, 2, 3))
    out = tmp_path / "m.gguf"
    plan = frankenmerge(looped, out, 2, 4, 3)
    model = read_model(out)
    assert model.n_layer == plan.n_layer_out == 10
    assert model.loop is None and not any(k.startswith("loop.") for k in model.file.fields)
    norms = norm_values(out)
    assert norms == {f"blk.{i}.attn_norm.weight": float(s) for i, s in enumerate(plan.layer_map)}
    src_bytes, out_bytes = tensor_bytes(src), tensor_bytes(out)
    for new, old in enumerate(plan.layer_map):
        assert out_bytes[f"blk.{new}.ffn_up.weight"] == src_bytes[f"blk.{old}.ffn_up.weight"]
    for name in ("token_embd.weight", "output_norm.weight"):
        assert out_bytes[name] == src_bytes[name]
    assert len(out_bytes) == 2 + 2 * 10


def test_count_one_is_the_same_file(tmp_path: Path, smollm2_path: Path) -> None:
    src = write_synthetic_gguf(tmp_path / "s.gguf", n_layer=6)
    frankenmerge(src, tmp_path / "one.gguf", 2, 4, 1)
    assert filecmp.cmp(src, tmp_path / "one.gguf", shallow=False)
    frankenmerge(smollm2_path, tmp_path / "smol1.gguf", 13, 17, 1)
    assert filecmp.cmp(smollm2_path, tmp_path / "smol1.gguf", shallow=False)


def test_per_layer_arrays_are_expanded(tmp_path: Path) -> None:
    kv = {
        "llama.attention.head_count_kv": ([10, 11, 12, 13, 14, 15], VT.ARRAY, VT.UINT32),
        "llama.feed_forward_length": ([100, 101, 102, 103, 104, 105], VT.ARRAY, VT.INT32),
        "llama.rope.dimension_sections": ([1, 2, 3, 4], VT.ARRAY, VT.INT32),  # not per layer
        "general.tags": (["a", "b", "c", "d", "e", "f"], VT.ARRAY, VT.STRING),  # not the arch's
    }
    src = write_synthetic_gguf(tmp_path / "s.gguf", n_layer=6, kv=kv)
    plan = frankenmerge(src, tmp_path / "m.gguf", 1, 3, 2)
    m = read_model(tmp_path / "m.gguf")
    assert m.value("llama.attention.head_count_kv") == [10 + i for i in plan.layer_map]
    assert m.value("llama.feed_forward_length") == [100 + i for i in plan.layer_map]
    assert m.file.fields["llama.feed_forward_length"].sub_type == VT.INT32
    assert m.value("llama.rope.dimension_sections") == [1, 2, 3, 4]
    assert m.value("general.tags") == ["a", "b", "c", "d", "e", "f"]


def test_periodic_sliding_window_pattern_is_written_per_layer(tmp_path: Path) -> None:
    kv = {"llama.attention.sliding_window_pattern": (3, VT.UINT32)}
    src = write_synthetic_gguf(tmp_path / "s.gguf", n_layer=6, kv=kv)
    plan = frankenmerge(src, tmp_path / "m.gguf", 1, 3, 2)
    swa = [il % 3 < 2 for il in range(6)]  # llama.cpp: every 3rd layer is global
    field = read_model(tmp_path / "m.gguf").file.fields["llama.attention.sliding_window_pattern"]
    assert (field.vtype, field.sub_type) == (VT.ARRAY, VT.BOOL)
    assert field.value == [swa[i] for i in plan.layer_map]


def test_leading_dense_layers(tmp_path: Path) -> None:
    kv = {"llama.leading_dense_block_count": (3, VT.UINT32)}
    src = write_synthetic_gguf(tmp_path / "s.gguf", n_layer=6, kv=kv)
    frankenmerge(src, tmp_path / "a.gguf", 0, 2, 3)
    assert read_model(tmp_path / "a.gguf").value("llama.leading_dense_block_count") == 7
    frankenmerge(src, tmp_path / "b.gguf", 4, 6, 3)
    assert read_model(tmp_path / "b.gguf").value("llama.leading_dense_block_count") == 3
    with pytest.raises(LoopConfigError, match="straddles the 3 leading dense layers"):
        frankenmerge(src, tmp_path / "c.gguf", 2, 4, 2)
    assert not (tmp_path / "c.gguf").exists()


@pytest.mark.parametrize(
    ("key", "spec", "window", "match"),
    [
        ("llama.full_attention_interval", (2, VT.UINT32), (1, 2), "multiple of 2"),
        ("llama.nextn_predict_layers", (1, VT.UINT32), (3, 6), "end the window at 5"),
        ("llama.attention.shared_kv_layers", (2, VT.UINT32), (1, 2), "shared_kv_layers"),
    ],
)
def test_refused_layer_settings(
    tmp_path: Path, key: str, spec: Any, window: tuple[int, int], match: str
) -> None:
    src = write_synthetic_gguf(tmp_path / "s.gguf", n_layer=6, kv={key: spec})
    with pytest.raises(LoopConfigError, match=match):
        frankenmerge(src, tmp_path / "m.gguf", *window, 2)
    assert not (tmp_path / "m.gguf").exists()


def test_period_multiple_is_accepted(tmp_path: Path) -> None:
    kv = {"llama.full_attention_interval": (2, VT.UINT32)}
    src = write_synthetic_gguf(tmp_path / "s.gguf", n_layer=6, kv=kv)
    assert frankenmerge(src, tmp_path / "m.gguf", 2, 4, 2).n_layer_out == 8


def test_unsupported_architecture(tmp_path: Path) -> None:
    src = write_synthetic_gguf(tmp_path / "s.gguf", n_layer=4, arch="exaone4")
    with pytest.raises(LoopConfigError, match="does not support exaone4"):
        frankenmerge(src, tmp_path / "m.gguf", 1, 2, 2)


@pytest.mark.parametrize(
    ("start", "end", "count", "match"),
    [
        (4, 7, 2, r"\[4, 7\) is out of range"),
        (3, 3, 2, "out of range"),
        (-1, 2, 2, "out of range"),
        (1, 2, 0, "count 0"),
        (1, 2, 65, "count 65"),
        (0, 6, 64, None),  # 6 + 63 * 6 = 384 layers: allowed
    ],
)
def test_window_and_count_checks(
    tmp_path: Path, start: int, end: int, count: int, match: str | None
) -> None:
    src = write_synthetic_gguf(tmp_path / "s.gguf", n_layer=6)
    out = tmp_path / "m.gguf"
    if match is None:
        assert frankenmerge(src, out, start, end, count).n_layer_out == 384
        return
    with pytest.raises(LoopConfigError, match=match):
        frankenmerge(src, out, start, end, count)
    assert not out.exists()


def test_layer_limit(tmp_path: Path) -> None:
    src = write_synthetic_gguf(tmp_path / "s.gguf", n_layer=20)
    with pytest.raises(LoopConfigError, match="600 layers, more than llama.cpp's 512"):
        frankenmerge(src, tmp_path / "m.gguf", 0, 20, 30)


def test_output_checks(tmp_path: Path) -> None:
    src = write_synthetic_gguf(tmp_path / "s.gguf", n_layer=6)
    with pytest.raises(ModelFileError, match="output is the input"):
        frankenmerge(src, src, 1, 2, 2, force=True)
    (tmp_path / "m.gguf").write_bytes(b"old")
    with pytest.raises(ModelFileError, match="--force"):
        frankenmerge(src, tmp_path / "m.gguf", 1, 2, 2)
    frankenmerge(src, tmp_path / "m.gguf", 1, 2, 2, force=True)
    assert read_model(tmp_path / "m.gguf").n_layer == 7
    with pytest.raises(ModelFileError, match="no such file"):
        frankenmerge(tmp_path / "missing.gguf", tmp_path / "x.gguf", 1, 2, 2)


# -- real models in stock llama.cpp ------------------------------------------------


def test_smollm2_merge_runs_in_stock_llama_cpp(
    stock_llama: Any, smollm2_path: Path, tmp_path: Path
) -> None:
    merged = tmp_path / "smol-13-17x3.gguf"
    plan = frankenmerge(smollm2_path, merged, 13, 17, 3)
    assert plan.n_layer_out == 38 and read_model(merged).n_layer == 38
    one = tmp_path / "smol-x1.gguf"
    frankenmerge(smollm2_path, one, 13, 17, 1)
    n_ref, ref = llama_logits(stock_llama, smollm2_path)
    n_one, got_one = llama_logits(stock_llama, one)
    n_merged, got = llama_logits(stock_llama, merged)
    assert (n_ref, n_one, n_merged) == (30, 30, 38)
    assert np.array_equal(ref, got_one)
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() > 1e-3  # a different (deeper) model


@pytest.mark.slow
def test_gemma3_sliding_window_pattern_survives(
    stock_llama: Any, gemma3_path: Path, tmp_path: Path
) -> None:
    # gemma3 derives its SWA layers from a period of 6 (layers 5, 11, 17 are global)
    # and uses a different RoPE base for them, so a wrong pattern changes the logits.
    one = tmp_path / "g1.gguf"
    frankenmerge(gemma3_path, one, 7, 10, 1)
    swa = read_model(one).value("gemma3.attention.sliding_window_pattern")
    assert swa == [il % 6 < 5 for il in range(18)]
    n_ref, ref = llama_logits(stock_llama, gemma3_path)
    n_one, got = llama_logits(stock_llama, one)
    assert n_ref == n_one == 18 and np.array_equal(ref, got)

    # control: the same file with every layer marked sliding gives other logits
    src = read_gguf(one)
    wrong = tmp_path / "wrong.gguf"
    kvs = rewrite_metadata(
        src, {"gemma3.attention.sliding_window_pattern": KV([True] * 18, VT.ARRAY, VT.BOOL)}
    )
    write_gguf(src, wrong, kvs, [TensorOut(t.name, t) for t in src.tensors])
    assert not np.array_equal(ref, llama_logits(stock_llama, wrong)[1])

    merged = tmp_path / "g2.gguf"
    frankenmerge(gemma3_path, merged, 7, 10, 2)
    m = read_model(merged)
    assert m.n_layer == 21
    assert m.value("gemma3.attention.sliding_window_pattern") == [
        il % 6 < 5 for il in [*range(10), 7, 8, 9, *range(10, 18)]
    ]
    n_merged, got = llama_logits(stock_llama, merged)
    assert n_merged == 21 and np.isfinite(got).all()
