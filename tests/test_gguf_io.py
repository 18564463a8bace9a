"""The GGUF parser of loopcpp.gguf_io, checked against gguf.GGUFReader."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import write_synthetic_gguf

from loopcpp.gguf_io import read_gguf, read_model


def assert_matches_reference(path: Path) -> None:
    ours, ref = read_gguf(path), gguf.GGUFReader(path)
    ref_fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.fields) == list(ref_fields)
    for name, f in ours.fields.items():
        r = ref_fields[name]
        assert f.vtype == r.types[0], name
        if f.vtype == gguf.GGUFValueType.ARRAY:
            assert f.sub_type == r.types[-1], name
        assert f.raw == b"".join(part.tobytes() for part in r.parts), name
        value = r.contents()
        if isinstance(value, float):
            assert f.value == pytest.approx(value, rel=0, abs=0), name
        else:
            assert f.value == value, name
    assert ours.alignment == ref.alignment and ours.data_offset == ref.data_offset
    assert len(ours.tensors) == len(ref.tensors)
    for t, r in zip(ours.tensors, ref.tensors, strict=True):
        assert (t.name, t.tensor_type, t.data_offset, t.n_bytes) == (
            r.name,
            int(r.tensor_type),
            int(r.data_offset),
            int(r.n_bytes),
        )
        assert list(t.shape) == [int(d) for d in r.shape]


def test_parser_matches_gguf_reader_on_smollm2(smollm2_path: Path) -> None:
    assert_matches_reference(smollm2_path)


def test_parser_matches_gguf_reader_on_synthetic(tmp_path: Path) -> None:
    kv = {
        "llama.attention.head_count_kv": (
            [1, 2, 3],
            gguf.GGUFValueType.ARRAY,
            gguf.GGUFValueType.UINT32,
        ),
        "test.bools": ([True, False], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.BOOL),
        "test.floats": ([0.5, -2.0], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32),
        "test.names": (["a", "bé", ""], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING),
        "test.i64": (-(2**40), gguf.GGUFValueType.INT64),
        "test.f64": (0.1, gguf.GGUFValueType.FLOAT64),
        "test.flag": (True, gguf.GGUFValueType.BOOL),
    }
    path = write_synthetic_gguf(tmp_path / "s.gguf", n_layer=3, kv=kv)
    assert_matches_reference(path)
    model = read_model(path)
    assert model.value("test.names") == ["a", "bé", ""]
    assert model.value("test.bools") == [True, False]
    assert model.value("llama.attention.head_count_kv") == [1, 2, 3]


def test_model_facts(smollm2_path: Path) -> None:
    m = read_model(smollm2_path)
    assert (m.architecture, m.n_layer, m.loop, m.n_tensors) == ("llama", 30, None, 272)
    assert m.tensor_bytes == 96_576_768  # sum of n_bytes per gguf.GGUFReader
    # 30 layers x 3 kv heads x (64 + 64) dims x 2 bytes
    assert m.kv_bytes_per_token() == 30 * 3 * 128 * 2
    assert len(m.value("tokenizer.ggml.tokens")) == 49152
    assert np.isclose(m.arch_value("rope.freq_base"), 100000.0)
