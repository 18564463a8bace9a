"""loopcpp.dequant: quantized GGUF -> all-f32 GGUF, metadata kept."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from loopcpp.dequant import dequantize_gguf, dequantized, dequantized_path
from loopcpp.gguf_io import ModelFileError


def _fields(reader: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_dequantize_gguf(synthetic_gguf, tmp_path):
    src = synthetic_gguf(
        kv={
            "general.file_type": (int(gguf.LlamaFileType.MOSTLY_Q8_0), gguf.GGUFValueType.UINT32),
            "tokenizer.ggml.tokens": (
                ["a", "b", "c"],
                gguf.GGUFValueType.ARRAY,
                gguf.GGUFValueType.STRING,
            ),
            "llama.rope.freq_base": (10000.0, gguf.GGUFValueType.FLOAT32),
        }
    )
    out = dequantize_gguf(src, tmp_path / "sub" / "f32.gguf")
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(out)

    want = _fields(a)
    got = _fields(b)
    assert got.pop("general.file_type") == int(gguf.LlamaFileType.ALL_F32)
    assert want.pop("general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert got == want
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert tb.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(ta.shape) == list(tb.shape)
        ref = gguf.quants.dequantize(ta.data, gguf.GGMLQuantizationType(ta.tensor_type))
        np.testing.assert_array_equal(np.asarray(tb.data).reshape(ref.shape), ref)
    assert sorted(p.name for p in out.parent.iterdir()) == ["f32.gguf"]  # no temporaries


def test_dequantize_refuses_bad_paths(synthetic_gguf, tmp_path):
    src = synthetic_gguf()
    with pytest.raises(ModelFileError, match="output is the input"):
        dequantize_gguf(src, src)
    with pytest.raises(ModelFileError, match="no such file"):
        dequantize_gguf(tmp_path / "missing.gguf", tmp_path / "x.gguf")


def test_dequantized_is_cached(synthetic_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPCPP_CACHE", str(tmp_path / "cache"))
    src = synthetic_gguf()
    first = dequantized(src)
    assert first == dequantized_path(src) and first.is_relative_to(tmp_path / "cache")
    mtime = first.stat().st_mtime_ns
    assert dequantized(src) == first and first.stat().st_mtime_ns == mtime


def test_custom_alignment_is_kept(tmp_path):
    src = tmp_path / "aligned.gguf"
    w = gguf.GGUFWriter(str(src), "llama")
    w.add_custom_alignment(64)
    rng = np.random.default_rng(1)
    w.add_tensor("a.weight", rng.standard_normal(7).astype(np.float32))
    q = gguf.quants.quantize(
        rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0
    )
    w.add_tensor("b.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = gguf.GGUFReader(dequantize_gguf(src, tmp_path / "out.gguf"))
    assert out.alignment == 64
    a, b = gguf.GGUFReader(src).tensors
    np.testing.assert_array_equal(np.asarray(out.tensors[0].data), a.data)
    np.testing.assert_array_equal(
        np.asarray(out.tensors[1].data), gguf.quants.dequantize(b.data, b.tensor_type)
    )
