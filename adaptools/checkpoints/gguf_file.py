"""The GGUF file format, header first (DESIGN §17), read as a hostile input: every count, length, type, shape and
offset is checked against the file's size before anything is allocated for it.

Layout: magic `GGUF`, u32 version (2 or 3), u64 tensor count, u64 key/value count, the key/values (u64-length
key, u32 value type, value; arrays: u32 item type, u64 count, items), the tensor infos (u64-length name, u32
dimension count, u64 dimensions innermost first, u32 ggml type, u64 offset from the data section), zero padding
to `general.alignment` (default 32), then the data: each tensor at its offset, padded to the alignment.

Each key/value keeps its raw bytes (`KeyValue.raw`), so a writer can copy the base's metadata exactly.
"""
from __future__ import annotations

import io
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import gguf
from gguf import GGMLQuantizationType, GGUFValueType

from ..errors import BaseMismatchError
from ..jsonio import open_regular
from ..names import shown
from .safetensors_io import TensorInfo

MAGIC = b"GGUF"
FILE_TYPE_KEY = "general.file_type"
COPY_CHUNK = 16 * 2**20
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
"""GGML_MAX_DIMS."""
MAX_NAME = 63
"""Longest tensor name ggml stores (GGML_MAX_NAME 64 with the terminating zero)."""
MAX_ALIGNMENT = 2**20
SCALARS = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
           GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
           GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
           GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}
MIN_KV_BYTES = 8 + 4 + 1
"""A key/value takes at least a key length, a value type and one byte of value."""
MIN_TENSOR_BYTES = 8 + 4 + 8 + 4 + 8
"""A tensor info takes at least a name length, a dimension count, one dimension, a type and an offset."""
ARRAY_VALUES_KEPT = 4096
"""Arrays up to this many items keep their values (metadata such as per-layer head counts); longer ones (a
tokenizer's vocabulary) keep only their bytes."""


@dataclass(frozen=True)
class KeyValue:
    """One metadata entry: its value type, value (arrays: a list of items, or None when long), and raw bytes."""

    key: str
    type: GGUFValueType
    value: Any
    raw: bytes
    item_type: GGUFValueType | None = None


class GGUFTensor(TensorInfo):
    """One tensor: its ggml type's name as the dtype, shape (numpy order, rows outermost), absolute byte range."""

    @property
    def type(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.dtype]


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF file's validated header."""

    path: Path
    version: int
    fields: dict[str, KeyValue]
    tensors: dict[str, GGUFTensor]
    alignment: int
    data_start: int
    size: int

    def get(self, key: str, default: Any = None) -> Any:
        """The value of metadata `key` (None / default when absent)."""
        field = self.fields.get(key)
        return default if field is None else field.value

    @property
    def architecture(self) -> str | None:
        value = self.get("general.architecture")
        return value if isinstance(value, str) else None


class NeedMore(Exception):
    """The header goes on past the bytes at hand (`needed`: how many from the file's start the read wanted)."""

    def __init__(self, needed: int):
        super().__init__(needed)
        self.needed = needed


class Prefix(io.BytesIO):
    """The first bytes of a file of `size` bytes: a read past them (inside the file) raises NeedMore."""

    def __init__(self, data: bytes, size: int):
        super().__init__(data)
        self.length, self.size = len(data), size

    def read(self, n: int | None = -1) -> bytes:
        if n is not None and n >= 0 and self.length < self.size and self.tell() + n > self.length:
            raise NeedMore(self.tell() + n)
        return super().read(n)


class Reader:
    """Sequential little-endian reads of a file's header, each length checked against what the file holds."""

    def __init__(self, f: BinaryIO, path: Path, size: int, source: str | None = None):
        self.f, self.path, self.size, self.pos = f, path, size, 0
        self.source = str(path) if source is None else source

    def fail(self, field: str, problem: str) -> BaseMismatchError:
        return BaseMismatchError(f"{self.source!r} is not a valid GGUF file: {field}: {problem}")

    def take(self, count: int, field: str) -> bytes:
        if count > self.size - self.pos:
            raise self.fail(field, f"needs {count} bytes at offset {self.pos}, the file has {self.size - self.pos} left")
        data = self.f.read(count)
        if len(data) != count:
            raise self.fail(field, "the file ended early (it changed while read?)")
        self.pos += count
        return data

    def scalar(self, fmt: str, field: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), field))[0]

    def string(self, field: str, limit: int | None = None) -> str:
        length = self.scalar("<Q", f"{field} length")
        if limit is not None and length > limit:
            raise self.fail(field, f"{length} bytes is longer than the {limit} allowed")
        data = self.take(length, field)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(field, f"not UTF-8 ({exc.reason})") from None

    def value_type(self, field: str) -> GGUFValueType:
        code = self.scalar("<I", f"{field} type")
        try:
            return GGUFValueType(code)
        except ValueError:
            raise self.fail(field, f"unknown value type {code}") from None

    def value(self, kind: GGUFValueType, field: str) -> Any:
        if kind in SCALARS:
            return self.scalar(SCALARS[kind], field)
        if kind == GGUFValueType.STRING:
            return self.string(field)
        raise self.fail(field, f"value type {kind.name} cannot be an array item")

    def array(self, field: str) -> tuple[GGUFValueType, list | None]:
        item = self.value_type(f"{field} item")
        count = self.scalar("<Q", f"{field} count")
        least = struct.calcsize(SCALARS[item]) if item in SCALARS else 8
        if item == GGUFValueType.ARRAY:
            raise self.fail(field, "arrays of arrays are not GGUF values llama.cpp reads")
        if count * least > self.size - self.pos:
            raise self.fail(field, f"{count} items need at least {count * least} bytes, the file has "
                                   f"{self.size - self.pos} left")
        if item in SCALARS:
            data = self.take(count * least, field)
            return item, list(struct.unpack(f"<{count}{SCALARS[item][1:]}", data)) if count <= ARRAY_VALUES_KEPT else None
        values = [self.string(f"{field} item {i}") for i in range(count)]
        return item, values if count <= ARRAY_VALUES_KEPT else None


def detect(path: Path) -> bool:
    """True when `path` is a file starting with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """The validated header of a GGUF file; BaseMismatchError naming the file and the field otherwise."""
    path = Path(path)
    with io.BufferedReader(open_regular(path, BaseMismatchError), 2**20) as f:
        return parse_header(f, path, os.fstat(f.fileno()).st_size)


def read_header_prefix(data: bytes, size: int, path: Path, source: str) -> GGUFHeader:
    """The validated header of the GGUF file of `size` bytes that starts with `data` (a file elsewhere: `path` is
    where it would be, `source` names it in errors); NeedMore when the header goes on past `data`."""
    return parse_header(Prefix(data, size), path, size, source)


def parse_header(f: BinaryIO, path: Path, size: int, source: str | None = None) -> GGUFHeader:
    """The header of the GGUF file of `size` bytes read from `f` (at its start), each field checked against the
    size before it is read."""
    r = Reader(f, path, size, source)
    if size < 4 or r.take(4, "magic") != MAGIC:
        raise r.fail("magic", "the file does not start with 'GGUF'")
    version = r.scalar("<I", "version")
    if version not in VERSIONS:
        hint = " (a big-endian file?)" if version.to_bytes(4, "little")[::-1] in (b"\0\0\0\2", b"\0\0\0\3") else ""
        raise r.fail("version", f"{version} is not a GGUF version adaptools reads (2 or 3){hint}")
    n_tensors, n_kv = r.scalar("<Q", "tensor count"), r.scalar("<Q", "key/value count")
    left = size - r.pos
    if n_kv * MIN_KV_BYTES > left or n_tensors * MIN_TENSOR_BYTES > left:
        raise r.fail("counts", f"{n_tensors} tensors and {n_kv} key/values cannot fit in {left} bytes")
    fields: dict[str, KeyValue] = {}
    for i in range(n_kv):
        start = r.pos
        key = r.string(f"key {i}")
        if key in fields:
            raise r.fail(f"key {shown(key)}", "appears twice")
        kind = r.value_type(f"key {shown(key)}")
        item = None
        if kind == GGUFValueType.ARRAY:
            item, value = r.array(f"key {shown(key)}")
        else:
            value = r.value(kind, f"key {shown(key)}")
        f.seek(start)
        raw = f.read(r.pos - start)
        fields[key] = KeyValue(key, kind, value, raw, item)
    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in fields:
        field = fields["general.alignment"]
        alignment = field.value
        if field.type != GGUFValueType.UINT32 or not 0 < alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
            raise r.fail("general.alignment", f"{shown(alignment)} is not a power of two up to {MAX_ALIGNMENT} "
                                              "stored as uint32")
    infos = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = r.string(f"tensor {i} name", MAX_NAME)
        if name in names:
            raise r.fail(f"tensor {shown(name)}", "appears twice")
        names.add(name)
        n_dims = r.scalar("<I", f"tensor {shown(name)} dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            raise r.fail(f"tensor {shown(name)}", f"{n_dims} dimensions (ggml allows 1 to {MAX_DIMS})")
        dims = [r.scalar("<Q", f"tensor {shown(name)} dimensions") for _ in range(n_dims)]
        code = r.scalar("<I", f"tensor {shown(name)} type")
        offset = r.scalar("<Q", f"tensor {shown(name)} offset")
        infos.append((name, dims, code, offset))
    data_start = alignment * math.ceil(r.pos / alignment)
    tensors = {}
    for name, dims, code, offset in infos:
        tensor = check_tensor(r, name, dims, code, offset, data_start, alignment)
        tensors[name] = tensor
    spans = sorted((t.start, t.end, n) for n, t in tensors.items())
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise r.fail(f"tensor {shown(second)}", f"its data overlaps that of {shown(first)}")
    return GGUFHeader(path, version, fields, tensors, alignment, data_start, size)


def check_tensor(r: Reader, name: str, dims: list[int], code: int, offset: int, data_start: int,
                 alignment: int) -> GGUFTensor:
    """One tensor info checked: a known type, a row length that is a multiple of its block, data inside the file."""
    field = f"tensor {shown(name)}"
    try:
        qtype = GGMLQuantizationType(code)
    except ValueError:
        raise r.fail(field, f"unknown ggml type {code}") from None
    if qtype not in gguf.GGML_QUANT_SIZES:
        raise r.fail(field, f"ggml type {qtype.name} has no known block size")
    elements, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    if dims[0] % elements:
        raise r.fail(field, f"a row of {dims[0]} elements is not a multiple of {qtype.name}'s block of {elements}")
    nbytes = math.prod(dims) // elements * block_bytes
    if offset % alignment:
        raise r.fail(field, f"offset {offset} is not a multiple of the alignment {alignment}")
    start = data_start + offset
    if start > r.size or nbytes > r.size - start:
        raise r.fail(field, f"{nbytes} bytes at offset {offset} lie beyond the end of the file ({r.size} bytes)")
    return GGUFTensor(qtype.name, tuple(reversed(dims)), start, start + nbytes)


def pack_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def pack_value(key: str, kind: GGUFValueType, value: Any) -> bytes:
    """The raw bytes of a scalar or string key/value (what `KeyValue.raw` holds for the base's own)."""
    body = pack_string(value) if kind == GGUFValueType.STRING else struct.pack(SCALARS[kind], value)
    return pack_string(key) + struct.pack("<I", kind) + body


def pack_tensor_info(name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType, offset: int) -> bytes:
    dims = tuple(reversed(shape))
    return pack_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, qtype, offset)


def tensor_nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    elements, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // elements * block_bytes


def header_bytes(header: GGUFHeader, types: dict[str, GGMLQuantizationType], offsets: dict[str, int],
                 file_type: int | None, extra: dict[str, str]) -> bytes:
    """The output header: the base's key/values as stored (file type replaced when given, `extra` strings
    appended), then the tensor infos in the base's order, zero-padded to the alignment."""
    kvs = []
    for key, field in header.fields.items():
        if key == FILE_TYPE_KEY and file_type is not None:
            kvs.append(pack_value(key, field.type, file_type))
        elif key not in extra:
            kvs.append(field.raw)
    kvs += [pack_value(key, GGUFValueType.STRING, value) for key, value in extra.items()]
    infos = [pack_tensor_info(name, t.shape, types[name], offsets[name]) for name, t in header.tensors.items()]
    head = b"".join([MAGIC, struct.pack("<IQQ", header.version, len(header.tensors), len(kvs)), *kvs, *infos])
    return head + bytes(-len(head) % header.alignment)


def embed_strings(path: Path, strings: dict[str, str]) -> None:
    """Rewrite the GGUF file `path` with string key/values `strings` added (replacing same-named ones): a new
    header, then the data section copied (tensor offsets are relative to it, so they stay)."""
    header = read_header(path)
    types = {name: t.type for name, t in header.tensors.items()}
    offsets = {name: t.start - header.data_start for name, t in header.tensors.items()}
    head = header_bytes(header, types, offsets, None, strings)
    rewritten = path.with_name(f".{path.name}.new")
    with open(path, "rb") as src, open(rewritten, "xb") as dst:
        dst.write(head)
        src.seek(header.data_start)
        while chunk := src.read(COPY_CHUNK):
            dst.write(chunk)
    os.replace(rewritten, path)
