"""Dequantize a GGUF to float32, for conformance against the PyTorch reference.

``dequantize_gguf(src, out)`` reads every tensor of ``src`` with
:class:`gguf.GGUFReader`, turns quantized ones into float32 with
:func:`gguf.quants.dequantize` (f32 tensors are copied, f16/bf16 widened) and
writes them with :class:`gguf.GGUFWriter`. All metadata is copied except
``general.file_type``, which becomes ``ALL_F32``. Both llama.cpp and
transformers (``from_pretrained(folder, gguf_file=name)``) load the result, so
the two run exactly the same weights.

``dequantized(src)`` does the same into the cache
(``$LOOPCPP_CACHE/dequant/<stem>-<key>/<stem>.f32.gguf``, the key covering the
source's path, size and mtime) and returns the cached file on later calls.
Writes are atomic: a temporary file next to the output, renamed when complete.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import gguf
import numpy as np

from loopcpp.atomic import atomic_output
from loopcpp.gguf_io import ModelFileError, check_readable
from loopcpp.models import cache_root

_SKIP_KEYS = ("general.architecture", "general.file_type", "general.alignment")


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in _SKIP_KEYS or not field.types:
            continue  # header fields and the keys the writer sets itself
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        if sub == gguf.GGUFValueType.ARRAY:
            raise ModelFileError(
                f"{name}: nested GGUF arrays are not supported by the dequantizer; "
                "remove the key or convert the model from its original checkpoint"
            )
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    alignment = reader.fields.get("general.alignment")
    if alignment is not None:  # the writer must also pad the data to it
        writer.add_custom_alignment(int(alignment.contents()))


def _f32(tensor: gguf.ReaderTensor) -> np.ndarray:
    qtype = gguf.GGMLQuantizationType(tensor.tensor_type)
    try:
        data = gguf.quants.dequantize(tensor.data, qtype)
    except NotImplementedError as e:
        raise ModelFileError(
            f"{tensor.name}: gguf-py cannot dequantize {qtype.name} ({e}); upgrade the gguf "
            "package or start from an f16/f32 GGUF"
        ) from e
    return np.ascontiguousarray(data, dtype=np.float32)


def dequantize_gguf(src: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write an all-float32 copy of the GGUF ``src`` to ``out`` (atomically); return ``out``."""
    path = check_readable(src)
    out_path = Path(out)
    if out_path.resolve() == path.resolve():
        raise ModelFileError(f"{out_path}: output is the input file: write to a different path")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(path)
    arch_field = reader.fields.get("general.architecture")
    if arch_field is None:
        raise ModelFileError(f"{path}: no general.architecture key: not a model GGUF")
    with atomic_output(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, str(arch_field.contents()))
        try:
            _copy_metadata(reader, writer)
            for tensor in reader.tensors:
                writer.add_tensor(tensor.name, _f32(tensor))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return out_path


def dequantized_path(src: str | os.PathLike[str]) -> Path:
    """Where :func:`dequantized` caches the f32 copy of ``src``."""
    path = Path(src).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "dequant" / f"{path.stem}-{key}" / f"{path.stem}.f32.gguf"


def dequantized(src: str | os.PathLike[str]) -> Path:
    """The cached float32 copy of the GGUF ``src``, written on first use."""
    check_readable(src)
    out = dequantized_path(src)
    if not out.is_file():
        dequantize_gguf(src, out)
    return out
