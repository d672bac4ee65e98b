"""The safetensors file format, header first: validated headers (DESIGN §10) and positioned tensor reads.

A safetensors file is an 8-byte little-endian header length, a JSON header {key: {dtype, shape, data_offsets}}
and the raw tensor bytes. The header is parsed once and validated by the format's rules (`read_header`, DESIGN
§10); each tensor is then read with one positioned read into its own buffer, or memory-mapped on its own
(`adaptools.checkpoints.container.Container.mapped`): nothing else of the file is held in memory.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import AdaptoolsError, BaseMismatchError
from ..jsonio import open_regular, parse_json, read_exactly
from ..names import shown

_DTYPE_ATTRS = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}
DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in _DTYPE_ATTRS.items() if hasattr(torch, attr)
}
"""safetensors dtype name → torch dtype."""
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
"""torch dtype → safetensors dtype name."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in a safetensors file: dtype name, shape and absolute byte range [start, end)."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


MAX_HEADER_BYTES = 100_000_000
"""Largest safetensors header accepted: the Rust reference's MAX_HEADER_SIZE (larger is refused before reading)."""
HEADER_FIELDS = ("dtype", "shape", "data_offsets")


def _ints(value: object, count: int | None = None) -> bool:
    """True for a list of non-negative ints (bools and floats are not), of `count` items when given."""
    return (type(value) is list and (count is None or len(value) == count)
            and set(map(type, value)) <= {int} and min(value, default=0) >= 0)


def _entry_problem(entry: object) -> str | None:
    """What is wrong with one tensor's header entry (a phrase following "tensor NAME"), or None."""
    if type(entry) is not dict or any(field not in entry for field in HEADER_FIELDS):
        return f"needs an object with {', '.join(HEADER_FIELDS)}, got {shown(entry)}"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if type(dtype) is not str or dtype not in DTYPES:
        return f"has an unknown or unsupported dtype {shown(dtype)}"
    if not _ints(shape):
        return f"has shape {shown(shape)}: a shape is a list of non-negative integers"
    if not _ints(offsets, 2) or offsets[0] > offsets[1]:
        return f"has data_offsets {shown(offsets)}: they must be two integers begin <= end"
    needed = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != needed:
        return f"has data_offsets {offsets} holding {offsets[1] - offsets[0]} bytes, but {dtype} {shape} needs {needed}"
    return None


def validate_header(header: object, data_start: int, data_bytes: int, source: str,
                    error: type[AdaptoolsError]) -> dict[str, TensorInfo]:
    """Tensor infos (header order) of a parsed safetensors header whose data region is the `data_bytes` bytes from
    file offset `data_start` (8 + N), checked by the format's rules (safetensors' Rust `Metadata::validate`); `error`
    naming `source` and the tensor otherwise.

    An object; `__metadata__` absent, null or a map of strings to strings; per tensor an object with a known
    `dtype`, `shape` a list of non-negative ints and `data_offsets` [begin, end] ints with end - begin =
    numel * itemsize (other keys are ignored, as serde does); sorted by begin, the tensors tile the data region
    [0, data_bytes) with no gap and no overlap. Byte ranges in the infos are file offsets.
    """
    if not isinstance(header, dict):
        raise error(f"{source!r} is not a safetensors file: its header is not a JSON object")
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise error(f"{source!r}: the safetensors __metadata__ must map strings to strings")
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        problem = _entry_problem(entry)
        if problem:
            raise error(f"{source!r}: tensor {shown(key)} {problem}")
        spans.append((*entry["data_offsets"], key))
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            kind = "a gap before it" if begin > end else "it overlaps the tensor before it"
            raise error(f"{source!r}: tensor {shown(key)} starts at data byte {begin}, but the tensors before it end "
                        f"at {end} ({kind})")
        end = stop
    if end != data_bytes:
        cut = " (this file is truncated: an interrupted download?)" if end > data_bytes else ""
        raise error(f"{source!r}: the tensors cover {end} bytes of data, but the file holds {data_bytes} after its "
                    f"header{cut}")
    return {key: TensorInfo(e["dtype"], tuple(e["shape"]), data_start + e["data_offsets"][0],
                            data_start + e["data_offsets"][1]) for key, e in header.items() if key != "__metadata__"}


def header_length(prefix: bytes, size: int, source: str, error: type[AdaptoolsError]) -> int:
    """The header length N of a safetensors file of `size` bytes from its first 8 bytes (little-endian), checked
    before the header is read: N <= MAX_HEADER_BYTES and N <= size - 8; `error` naming `source` otherwise."""
    if size < 8 or len(prefix) < 8:
        raise error(f"{source!r} is not a safetensors file: it has {size} bytes, fewer than the 8 of the header length")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES:
        raise error(f"{source!r} is not a safetensors file: header length {length} exceeds the format's limit of "
                    f"{MAX_HEADER_BYTES:,} bytes")
    if length > size - 8:
        raise error(f"{source!r} is not a safetensors file: header length {length} exceeds the file size {size}")
    return length


def parse_header(raw: bytes, size: int, source: str,
                 error: type[AdaptoolsError] = BaseMismatchError) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor infos (in header order) and `__metadata__` of a safetensors file of `size` bytes from its first
    8 + N bytes `raw` (read from disk, or fetched by HTTP Range requests for a Hub base read for its names):
    `header_length`, then N bytes of UTF-8 JSON (`adaptools.jsonio.parse_json`) checked by `validate_header`;
    `error` naming `source` otherwise."""
    length = header_length(raw[:8], size, source, error)
    if len(raw) < 8 + length:
        raise error(f"{source!r} ends inside its safetensors header")
    header = parse_json(raw[8:8 + length], source, error)
    infos = validate_header(header, 8 + length, size - 8 - length, source, error)
    return infos, header.get("__metadata__") or {}


def header_bytes(path: Path, error: type[AdaptoolsError] = BaseMismatchError) -> tuple[bytes, int]:
    """The first 8 + N bytes of a safetensors file (N checked by `header_length` before it is read) and the file's
    size; `error` naming the file when it cannot be read."""
    with open_regular(path, error) as f:
        size = os.fstat(f.fileno()).st_size
        prefix = read_exactly(f, 8)
        length = header_length(prefix, size, str(path), error)
        return prefix + read_exactly(f, length), size


def read_header(path: Path, error: type[AdaptoolsError] = BaseMismatchError) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor infos (in header order) and `__metadata__` of a safetensors file, validated (`parse_header`); reads
    only the 8 + N header bytes."""
    return parse_header(*header_bytes(path, error), str(path), error)


def read_tensor(f, info: TensorInfo, out: Tensor | None = None) -> Tensor:
    """One tensor from an open (unbuffered) file, read into `out` (a uint8 buffer of >= nbytes) or a fresh buffer."""
    buffer = torch.empty(info.nbytes, dtype=torch.uint8) if out is None else out[: info.nbytes]
    f.seek(info.start)
    view = memoryview(buffer.numpy())
    done = 0
    while done < info.nbytes:
        n = f.readinto(view[done:])
        if not n:
            raise BaseMismatchError(f"{f.name!r} ends before the tensor data at bytes {info.start}..{info.end}")
        done += n
    return buffer.view(DTYPES[info.dtype]).reshape(info.shape)
