"""Reading GGUF metadata and rewriting GGUF files without touching tensor bytes.

``read_gguf`` parses a GGUF's header, metadata and tensor table (the tensor
data is not read), keeping each metadata field's exact bytes.  It is a small
parser of its own rather than :class:`gguf.GGUFReader`, which builds numpy
views of every tokenizer string and takes 5-20 s on a 150k-260k token
vocabulary; this one takes a fraction of a second.  The tests check it against
``gguf.GGUFReader``; the ``gguf`` package supplies the type constants.

Every way a file can be unusable (missing, a directory, not GGUF, truncated,
corrupt) becomes a :class:`ModelFileError` whose message names the file, the
problem and the fix.

``write_gguf`` writes a new GGUF: metadata fields that are not replaced are
copied as their exact bytes, tensor data is copied byte for byte from the
source file (any quantization type), and the result appears atomically
(:func:`loopcpp.atomic.atomic_output`: a temporary file in the destination
folder, then ``os.replace``), so a crash never leaves a partial output under
the final name.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np

from loopcpp.atomic import atomic_output
from loopcpp.config import FIELDS as LOOP_FIELDS
from loopcpp.config import LoopConfig, LoopConfigError

GGUF_MAGIC = b"GGUF"
#: Suffix of the temporary files written next to an output before the final rename.
_COPY_CHUNK = 8 << 20
VT = gguf.GGUFValueType

_SCALAR_FORMATS = {
    VT.UINT8: "B",
    VT.INT8: "b",
    VT.UINT16: "H",
    VT.INT16: "h",
    VT.UINT32: "I",
    VT.INT32: "i",
    VT.FLOAT32: "f",
    VT.BOOL: "?",
    VT.UINT64: "Q",
    VT.INT64: "q",
    VT.FLOAT64: "d",
}


class ModelFileError(ValueError):
    """A model file that cannot be used; the message names the file, the problem and the fix."""


# -- parsing -------------------------------------------------------------------


class _Truncated(Exception):
    pass


@dataclass
class Field:
    """One metadata key/value: its types, decoded value and exact bytes."""

    name: str
    vtype: gguf.GGUFValueType
    sub_type: gguf.GGUFValueType | None
    raw: bytes = field(repr=False)
    _value: Any = field(default=None, repr=False)
    _lazy: tuple[int, int, str] | None = field(default=None, repr=False)

    @property
    def value(self) -> Any:
        """Python value: int/float/bool/str, lists for arrays (bytes for non-UTF-8 strings)."""
        if self._lazy is not None:  # string arrays are decoded on first use
            start, count, bo = self._lazy
            items, off = [], start
            for _ in range(count):
                (n,) = struct.unpack_from(bo + "Q", self.raw, off)
                items.append(_decode(self.raw[off + 8 : off + 8 + n]))
                off += 8 + n
            self._value, self._lazy = items, None
        return self._value


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the table: name, dims (GGUF order), type, absolute data offset, size."""

    name: str
    shape: tuple[int, ...]
    tensor_type: int
    data_offset: int
    n_bytes: int

    @property
    def type_name(self) -> str:
        try:
            return gguf.GGMLQuantizationType(self.tensor_type).name
        except ValueError:
            return f"type {self.tensor_type}"


@dataclass
class GGUFFile:
    """The parsed header, metadata and tensor table of a GGUF file."""

    path: Path
    version: int
    byte_order: str  # "<" or ">"
    alignment: int
    data_offset: int
    fields: dict[str, Field]
    tensors: list[TensorInfo]


def _decode(raw: bytes) -> str | bytes:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


class _Parser:
    def __init__(self, buf: Any, bo: str) -> None:
        self.buf, self.bo, self.off, self.size = buf, bo, 0, len(buf)

    def need(self, n: int) -> None:
        if n < 0 or self.off + n > self.size:
            raise _Truncated

    def unpack(self, fmt: str) -> Any:
        s = struct.Struct(self.bo + fmt)
        self.need(s.size)
        v = s.unpack_from(self.buf, self.off)
        self.off += s.size
        return v if len(v) > 1 else v[0]

    def string(self) -> bytes:
        n = self.unpack("Q")
        self.need(n)
        raw = bytes(self.buf[self.off : self.off + n])
        self.off += n
        return raw

    def value_type(self) -> gguf.GGUFValueType:
        t = self.unpack("I")
        try:
            return VT(t)
        except ValueError:
            raise ValueError(f"unknown metadata value type {t}") from None

    def field(self) -> Field:
        start = self.off
        name = _decode(self.string())
        if not isinstance(name, str):
            raise ValueError(f"metadata key {name!r} is not UTF-8")
        vtype = self.value_type()
        sub: gguf.GGUFValueType | None = None
        value: Any = None
        lazy = None
        if vtype == VT.STRING:
            value = _decode(self.string())
        elif vtype == VT.ARRAY:
            sub = self.value_type()
            count = self.unpack("Q")
            if sub == VT.STRING:
                first = self.off
                for _ in range(count):
                    n = self.unpack("Q")  # advances past the length
                    self.need(n)
                    self.off += n
                lazy = (first - start, count, self.bo)
            elif sub in _SCALAR_FORMATS:
                dtype = np.dtype(self.bo + _SCALAR_FORMATS[sub])
                self.need(count * dtype.itemsize)
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.off)
                self.off += count * dtype.itemsize
                value = [bool(x) for x in arr] if sub == VT.BOOL else arr.tolist()
            else:
                raise ValueError(f"metadata {name}: arrays of {sub.name} are not supported")
        else:
            value = self.unpack(_SCALAR_FORMATS[vtype])
        raw = bytes(self.buf[start : self.off])
        return Field(name, vtype, sub, raw, value, lazy)


def _tensor_nbytes(shape: tuple[int, ...], ttype: int) -> int | None:
    try:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
    except (ValueError, KeyError):
        return None
    n = 1
    for d in shape:
        n *= d
    if n % block:
        raise ValueError(f"tensor of {n} elements is not a whole number of {block}-blocks")
    return n // block * size


def _parse(buf: Any, path: Path, file_size: int) -> GGUFFile:
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise ValueError("bad magic")
    (version,) = struct.unpack_from("<I", buf, 4) if len(buf) >= 8 else (None,)
    if version is None:
        raise _Truncated
    bo = "<"
    if version & 0xFFFF == 0 and (version >> 24) in (2, 3):
        bo, version = ">", version >> 24
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} is not supported (only 2 and 3)")
    p = _Parser(buf, bo)
    p.off = 8
    n_tensors, n_kv = p.unpack("QQ")
    fields: dict[str, Field] = {}
    for _ in range(n_kv):
        f = p.field()
        if f.name in fields:
            raise ValueError(f"metadata key {f.name} appears twice")
        fields[f.name] = f
    alignment = 32
    if "general.alignment" in fields:
        alignment = fields["general.alignment"].value
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment {alignment!r} is not a power of two")
    table = []
    for _ in range(n_tensors):
        name = _decode(p.string())
        n_dims = p.unpack("I")
        if not 1 <= n_dims <= 4:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
        dims = p.unpack("Q" * n_dims)
        shape = (dims,) if n_dims == 1 else tuple(dims)
        ttype, offset = p.unpack("IQ")
        table.append((str(name), tuple(int(d) for d in shape), int(ttype), int(offset)))
    data_offset = (p.off + alignment - 1) // alignment * alignment
    # sizes of tensor types the installed gguf package does not know are inferred
    # from where the next tensor starts (padding included)
    ends = sorted({off for *_, off in table} | {file_size - data_offset})
    tensors = []
    for name, shape, ttype, offset in table:
        n_bytes = _tensor_nbytes(shape, ttype)
        if n_bytes is None:
            n_bytes = min(e for e in ends if e > offset) - offset if offset < ends[-1] else 0
        end = data_offset + offset + n_bytes
        if end > file_size:
            raise _Truncated(f"tensor {name} needs bytes up to {end} but the file has {file_size}")
        tensors.append(TensorInfo(name, shape, ttype, data_offset + offset, n_bytes))
    return GGUFFile(path, version, bo, alignment, data_offset, fields, tensors)


def check_readable(path: str | os.PathLike[str]) -> Path:
    """Refuse, with a clear message, a path that cannot be a GGUF file."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(
            f"{p}: no such file: check the path, or pass a Hugging Face folder or hub id "
            "to `loopcpp convert` to make a GGUF"
        )
    if p.is_dir():
        raise ModelFileError(
            f"{p}: is a directory, not a GGUF file: pass the .gguf file inside it, or convert "
            "a Hugging Face folder with `loopcpp convert`"
        )
    try:
        with p.open("rb") as fh:
            head = fh.read(4)
    except OSError as e:
        raise ModelFileError(f"{p}: cannot be read ({e.strerror}): check its permissions") from e
    if head != GGUF_MAGIC:
        what = "is empty" if not head else f"does not start with the GGUF magic (starts {head!r})"
        raise ModelFileError(
            f"{p}: not a GGUF file ({what}): pass a .gguf model file, or convert a Hugging Face "
            "checkpoint with `loopcpp convert`"
        )
    return p


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Parse a GGUF's metadata and tensor table, or raise ModelFileError."""
    p = check_readable(path)
    try:
        with p.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, p, len(buf))
    except _Truncated as e:
        detail = f" ({e})" if str(e) else ""
        raise ModelFileError(
            f"{p}: truncated GGUF file{detail}: download or convert it again"
        ) from None
    except (ValueError, OverflowError, struct.error, MemoryError) as e:
        raise ModelFileError(
            f"{p}: corrupt GGUF file ({e}): download or convert it again"
        ) from None
    except OSError as e:
        raise ModelFileError(f"{p}: cannot be read ({e}): check the file") from e


# -- models --------------------------------------------------------------------


@dataclass
class GGUFModel:
    """What loopcpp needs to know about one GGUF file."""

    path: Path
    file: GGUFFile = field(repr=False)
    architecture: str
    n_layer: int
    loop: LoopConfig | None
    file_size: int

    @property
    def tensor_bytes(self) -> int:
        """Bytes of all tensor data (the weights)."""
        return sum(t.n_bytes for t in self.file.tensors)

    @property
    def n_tensors(self) -> int:
        return len(self.file.tensors)

    def value(self, key: str, default: Any = None) -> Any:
        """The decoded value of metadata ``key`` (lists for arrays), or ``default``."""
        f = self.file.fields.get(key)
        return default if f is None else f.value

    def arch_value(self, suffix: str, default: Any = None) -> Any:
        """``value(f"{architecture}.{suffix}")``."""
        return self.value(f"{self.architecture}.{suffix}", default)

    def kv_bytes_per_token(self, type_bytes: float = 2.0) -> int | None:
        """KV-cache bytes one token occupies across all layers (f16 cache by default).

        An upper bound for sliding-window layers; None when the metadata does
        not say enough (e.g. MLA or recurrent layers).  Looping never changes it.
        """
        if self.arch_value("attention.kv_lora_rank") is not None or any(
            k.startswith(f"{self.architecture}.ssm.") for k in self.file.fields
        ):
            return None
        n_embd = self.arch_value("embedding_length")
        n_head = self.arch_value("attention.head_count")
        heads = _per_layer(n_head, self.n_layer)
        heads_kv = _per_layer(self.arch_value("attention.head_count_kv", n_head), self.n_layer)
        if not isinstance(n_embd, int) or heads is None or heads_kv is None:
            return None
        total = 0.0
        for h, hkv in zip(heads, heads_kv, strict=True):
            if h == 0 or hkv == 0:  # layer without attention
                continue
            k_len = self.arch_value("attention.key_length", n_embd // h)
            v_len = self.arch_value("attention.value_length", n_embd // h)
            if not isinstance(k_len, int) or not isinstance(v_len, int):
                return None
            total += hkv * (k_len + v_len) * type_bytes
        return int(total)


def _per_layer(value: Any, n_layer: int) -> list[int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * n_layer
    if isinstance(value, list) and len(value) == n_layer and all(isinstance(v, int) for v in value):
        return list(value)
    return None


#: The GGUF type llama.cpp's loader reads for a loop field of each kind.
LOOP_VTYPES = {int: VT.UINT32, float: VT.FLOAT32, bool: VT.BOOL, str: VT.STRING}


def _check_loop_types(f: GGUFFile) -> None:
    """The loop keys must have the types llama.cpp's loader reads (u32, f32, bool, string)."""
    for lf in LOOP_FIELDS:
        fld = f.fields.get(lf.key)
        want = LOOP_VTYPES[lf.kind]
        if fld is not None and fld.vtype != want:
            raise LoopConfigError(
                f"GGUF key {lf.key} is {fld.vtype.name} {fld.value!r}; llama.cpp reads only "
                f"{want.name} there"
            )


def read_model(path: str | os.PathLike[str], ignore_loop: bool = False) -> GGUFModel:
    """Open a GGUF and read its architecture, layer count and loop settings.

    ``ignore_loop``: do not read the ``loop.*`` keys (loop None), for tools that
    replace them, so that they can repair a file whose loop metadata is invalid.
    """
    f = read_gguf(path)
    p = f.path
    arch_field = f.fields.get("general.architecture")
    arch = arch_field.value if arch_field is not None else None
    if not isinstance(arch, str) or not arch:
        raise ModelFileError(
            f"{p}: GGUF has no general.architecture key: it is not a llama.cpp model file "
            "(convert the checkpoint again with `loopcpp convert`)"
        )
    n_layer_field = f.fields.get(f"{arch}.block_count")
    n_layer = n_layer_field.value if n_layer_field is not None else None
    if isinstance(n_layer, bool) or not isinstance(n_layer, int) or n_layer < 1:
        raise ModelFileError(
            f"{p}: GGUF has no valid {arch}.block_count (got {n_layer!r}): it is not a "
            "transformer model file loopcpp can loop"
        )
    loop_meta = {key: fld.value for key, fld in f.fields.items() if key.startswith("loop.")}
    if ignore_loop:
        loop_meta = {}
    try:
        if loop_meta:
            _check_loop_types(f)
        loop = LoopConfig.from_gguf(loop_meta)
        if loop is not None:
            loop.check(n_layer)
    except LoopConfigError as e:
        raise ModelFileError(
            f"{p}: invalid loop metadata: {e} (fix it with `loopcpp convert {p} -o OUT` and "
            "new --start/--end/--count, or --no-loop)"
        ) from e
    return GGUFModel(p, f, arch, n_layer, loop, p.stat().st_size)


# -- writing -------------------------------------------------------------------


@dataclass(frozen=True)
class KV:
    """A metadata value to serialize: ``value`` of ``vtype`` (``sub_type`` for arrays)."""

    value: Any
    vtype: gguf.GGUFValueType
    sub_type: gguf.GGUFValueType | None = None


def _pack_string(s: str | bytes, bo: str) -> bytes:
    raw = s.encode("utf-8") if isinstance(s, str) else bytes(s)
    return struct.pack(bo + "Q", len(raw)) + raw


def _pack_value(
    value: Any, vtype: gguf.GGUFValueType, sub: gguf.GGUFValueType | None, bo: str
) -> bytes:
    if vtype == VT.STRING:
        return _pack_string(value, bo)
    if vtype == VT.ARRAY:
        if sub is None or sub == VT.ARRAY:
            raise ValueError("GGUF arrays need a scalar or string element type")
        items = list(value)
        body = b"".join(_pack_value(v, sub, None, bo) for v in items)
        return struct.pack(bo + "IQ", int(sub), len(items)) + body
    return struct.pack(bo + _SCALAR_FORMATS[vtype], value)


def pack_kv(key: str, kv: KV, bo: str = "<") -> bytes:
    """The serialized bytes of one metadata key/value pair."""
    return (
        _pack_string(key, bo)
        + struct.pack(bo + "I", int(kv.vtype))
        + _pack_value(kv.value, kv.vtype, kv.sub_type, bo)
    )


def field_kv(f: Field) -> KV:
    """A field as a KV (for re-serializing it with a changed value)."""
    return KV(f.value, f.vtype, f.sub_type)


def loop_kvs(loop: LoopConfig) -> dict[str, KV]:
    """``loop.*`` metadata for a loop, each key with the GGUF type its field has."""
    kinds = {lf.key: lf.kind for lf in LOOP_FIELDS}
    return {key: KV(value, LOOP_VTYPES[kinds[key]], None)
            for key, value in loop.to_gguf().items()}


def rewrite_metadata(
    src: GGUFFile, set_kvs: Mapping[str, KV], drop: Iterable[str] = ()
) -> list[tuple[str, bytes]]:
    """Raw key/values of ``src`` with ``set_kvs`` replaced/added and ``drop`` removed.

    Unchanged fields keep their exact bytes and order; new keys go at the end.
    """
    dropped = set(drop)
    out: list[tuple[str, bytes]] = []
    for name, f in src.fields.items():
        if name in set_kvs:
            out.append((name, pack_kv(name, set_kvs[name], src.byte_order)))
        elif name not in dropped:
            out.append((name, f.raw))
    out += [
        (name, pack_kv(name, kv, src.byte_order))
        for name, kv in set_kvs.items()
        if name not in src.fields
    ]
    return out


@dataclass(frozen=True)
class TensorOut:
    """A tensor of the output: its name and the source tensor whose bytes it copies."""

    name: str
    source: TensorInfo


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _copy_range(src: BinaryIO, dst: BinaryIO, offset: int, n_bytes: int) -> None:
    src.seek(offset)
    left = n_bytes
    while left > 0:
        chunk = src.read(min(_COPY_CHUNK, left))
        if not chunk:
            raise ModelFileError(
                f"{getattr(src, 'name', 'source')}: ended while copying tensor data: the file "
                "is truncated or changed while being read; download or convert it again"
            )
        dst.write(chunk)
        left -= len(chunk)


def _write_gguf_stream(
    dst: BinaryIO, src: GGUFFile, kvs: Sequence[tuple[str, bytes]], tensors: Sequence[TensorOut]
) -> None:
    bo, alignment = src.byte_order, src.alignment
    dst.write(GGUF_MAGIC)
    dst.write(struct.pack(bo + "IQQ", src.version, len(tensors), len(kvs)))
    dst.writelines(raw for _key, raw in kvs)
    offset = 0
    for t in tensors:
        dims = t.source.shape
        dst.write(_pack_string(t.name, bo))
        dst.write(struct.pack(bo + "I" + "Q" * len(dims), len(dims), *dims))
        dst.write(struct.pack(bo + "IQ", t.source.tensor_type, offset))
        offset = _align(offset + t.source.n_bytes, alignment)
    pos = dst.tell()
    dst.write(b"\0" * (_align(pos, alignment) - pos))
    with src.path.open("rb") as src_file:
        data_start = dst.tell()
        for t in tensors:
            pos = dst.tell() - data_start
            dst.write(b"\0" * (_align(pos, alignment) - pos))
            _copy_range(src_file, dst, t.source.data_offset, t.source.n_bytes)


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """True when both paths name the same file (same path, link or inode)."""
    pa, pb = Path(a), Path(b)
    if pa.resolve() == pb.resolve():
        return True
    try:
        return os.path.samefile(pa, pb)
    except OSError:
        return False


def check_output(src: str | os.PathLike[str], out: str | os.PathLike[str], force: bool) -> Path:
    """Refuse writing over the input, over a directory, or over a file without ``force``."""
    o = Path(out)
    if same_file(src, o):
        raise ModelFileError(
            f"{o}: output is the input file: write to a different path (the input is never "
            "overwritten)"
        )
    if o.is_dir():
        raise ModelFileError(f"{o}: output is a directory: give a file name such as {o}/model.gguf")
    if o.exists() and not force:
        raise ModelFileError(f"{o}: output already exists: pass --force to replace it")
    if not o.parent.is_dir():
        raise ModelFileError(f"{o}: output folder {o.parent} does not exist: create it first")
    return o


def write_gguf(
    src: GGUFFile,
    out_path: str | os.PathLike[str],
    kvs: Sequence[tuple[str, bytes]],
    tensors: Sequence[TensorOut],
) -> None:
    """Atomically write a GGUF with the given raw key/values and tensors copied from src."""
    with atomic_output(out_path) as tmp:
        try:
            with tmp.open("wb") as dst:
                _write_gguf_stream(dst, src, kvs, tensors)
                dst.flush()
                os.fsync(dst.fileno())
        except OSError as e:
            raise ModelFileError(
                f"{out_path}: writing failed ({e.strerror or e}): check free disk space and "
                "permissions of the output folder"
            ) from e
