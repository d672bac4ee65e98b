"""Base model checkpoints: a Hugging Face folder (model.safetensors or shards + index), read tensor by tensor.

A safetensors file is an 8-byte little-endian header length, a JSON header {key: {dtype, shape, data_offsets}}
and the raw tensor bytes. The header is parsed once; each tensor is then read with one positioned read into
its own buffer, or memory-mapped on its own (`mapped`): nothing else of the file is held in memory, and a
mapping goes with its tensor.
"""
from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import AdaptoolsError, BaseMismatchError, InputNotFoundError
from ..jsonio import check_fields, json_object, open_regular, parse_json, read_exactly, read_json_object, string
from ..names import plain_name, shown

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

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
    return (isinstance(value, list) and (count is None or len(value) == count)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


def validate_header(header: object, data_start: int, data_bytes: int, source: str,
                    error: type[AdaptoolsError]) -> dict[str, TensorInfo]:
    """Tensor infos (header order) of a parsed safetensors header whose data region is the `data_bytes` bytes from
    file offset `data_start` (8 + N), checked by
    the format's rules (safetensors' Rust `Metadata::validate`); `error` naming `source` and the tensor otherwise.

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
        where = f"{source!r}: tensor {shown(key)}"
        if not isinstance(entry, dict) or any(field not in entry for field in HEADER_FIELDS):
            raise error(f"{where} needs an object with {', '.join(HEADER_FIELDS)}, got {shown(entry)}")
        dtype, shape, offsets = (entry[field] for field in HEADER_FIELDS)
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise error(f"{where} has an unknown or unsupported dtype {shown(dtype)}")
        if not _ints(shape):
            raise error(f"{where} has shape {shown(shape)}: a shape is a list of non-negative integers")
        if not _ints(offsets, 2) or offsets[0] > offsets[1]:
            raise error(f"{where} has data_offsets {shown(offsets)}: they must be two integers begin <= end")
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPES[dtype].itemsize:
            raise error(f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, but {dtype} of shape "
                        f"{shape} needs {math.prod(shape) * DTYPES[dtype].itemsize}")
        spans.append((offsets[0], offsets[1], key))
    end = 0
    for begin, stop, key in sorted(spans):
        if begin != end:
            kind = "a gap before it" if begin > end else "it overlaps the tensor before it"
            raise error(f"{source!r}: tensor {shown(key)} starts at data byte {begin}, but the tensors before it end "
                        f"at {end} ({kind})")
        end = stop
    if end != data_bytes:
        raise error(f"{source!r}: the tensors cover {end} bytes of data, but the file holds {data_bytes} after its "
                    "header")
    return {key: TensorInfo(e["dtype"], tuple(e["shape"]), data_start + e["data_offsets"][0],
                            data_start + e["data_offsets"][1]) for key, e in header.items() if key != "__metadata__"}


def read_header(path: Path, error: type[AdaptoolsError] = BaseMismatchError) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor infos (in header order) and `__metadata__` of a safetensors file, validated (`validate_header`):
    8-byte little-endian length N <= MAX_HEADER_BYTES and <= the file size - 8, then N bytes of UTF-8 JSON
    (`adaptools.jsonio.parse_json`); `error` naming the file otherwise. Reads only the 8 + N header bytes."""
    with open_regular(path, error) as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise error(f"{str(path)!r} is not a safetensors file: it has {size} bytes, fewer than the 8 of the header length")
        (length,) = struct.unpack("<Q", read_exactly(f, 8))
        if length > MAX_HEADER_BYTES:
            raise error(f"{str(path)!r} is not a safetensors file: header length {length} exceeds the format's limit of "
                        f"{MAX_HEADER_BYTES:,} bytes")
        if length > size - 8:
            raise error(f"{str(path)!r} is not a safetensors file: header length {length} exceeds the file size {size}")
        raw = read_exactly(f, length)
    if len(raw) < length:
        raise error(f"{str(path)!r} ends inside its safetensors header")
    header = parse_json(raw, str(path), error)
    infos = validate_header(header, 8 + length, size - 8 - length, str(path), error)
    return infos, header.get("__metadata__") or {}


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


CONFIG_FIELDS = {"model_type": string, "_name_or_path": string, "quantization_config": json_object}
"""Keys of a base's config.json that adaptools reads, with their checks (null means absent)."""


def read_index(index: Path) -> list[str]:
    """Shard file names of a model.safetensors.index.json, in first-use order: `weight_map` must map tensor names
    to plain file names (`adaptools.names.plain_name`); BaseMismatchError naming the file and key otherwise."""
    weight_map = read_json_object(index, BaseMismatchError).get("weight_map")
    if not isinstance(weight_map, dict):
        raise BaseMismatchError(f"{str(index)!r}: 'weight_map' must be a JSON object of tensor name -> shard file, "
                                f"got {shown(weight_map)}")
    for key, shard in weight_map.items():
        plain_name(shard, f"{str(index)!r}: the shard of {shown(key)} in 'weight_map'", BaseMismatchError)
    return list(dict.fromkeys(weight_map.values()))


class BaseCheckpoint:
    """Lazy view of a base checkpoint: key → (shard, shape, dtype) without loading tensors."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.exists():
            raise InputNotFoundError(f"base {str(path)!r} does not exist")
        self.root = path if path.is_dir() else path.parent
        self.indexed = path.is_dir() and (path / INDEX_NAME).exists()
        self.shards = self._find_shards(path)
        self.weight_map: dict[str, str] = {}
        self._info: dict[str, TensorInfo] = {}
        for shard in self.shards:
            infos, _ = read_header(self.root / shard)
            for key, info in infos.items():
                if key in self.weight_map:
                    raise BaseMismatchError(f"tensor {shown(key)} is in two shards of {str(self.root)!r}: "
                                            f"{self.weight_map[key]!r} and {shard!r}")
                self.weight_map[key] = shard
                self._info[key] = info

    def _find_shards(self, path: Path) -> list[str]:
        if path.is_file():
            return [path.name]
        index = path / INDEX_NAME
        if index.exists():
            return read_index(index)
        if (path / SINGLE_NAME).exists():
            return [SINGLE_NAME]
        found = sorted(p.name for p in path.glob("*.safetensors"))
        if not found:
            raise BaseMismatchError(f"{str(path)!r} holds no model.safetensors, index or *.safetensors file")
        return found

    @property
    def config(self) -> dict:
        """config.json of the base folder, or {} when there is none; the keys adaptools reads are type-checked."""
        cfg = self.root / "config.json"
        if not cfg.exists():
            return {}
        config = read_json_object(cfg, BaseMismatchError)
        check_fields(config, CONFIG_FIELDS, str(cfg), BaseMismatchError, nullable=tuple(CONFIG_FIELDS))
        return config

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, key: object) -> bool:
        return key in self.weight_map

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info[key].shape

    def dtype_name(self, key: str) -> str:
        """safetensors dtype name of `key` (e.g. "F16", "BF16", "F32", "U8")."""
        return self._info[key].dtype

    def dtype(self, key: str) -> torch.dtype:
        """torch dtype of `key`."""
        return DTYPES[self._info[key].dtype]

    def nbytes(self, key: str) -> int:
        """Stored size of `key` in bytes."""
        return self._info[key].nbytes

    def shard_keys(self, shard: str) -> list[str]:
        return [k for k, s in self.weight_map.items() if s == shard]

    def info(self, key: str) -> TensorInfo:
        """dtype, shape and byte range of `key` in its shard file."""
        return self._info[key]

    def path(self, key: str) -> Path:
        """The shard file holding `key`."""
        return self.root / self.weight_map[key]

    def mapped(self, key: str) -> Tensor:
        """`key` as a view of its stored bytes, memory-mapped copy-on-write (the file is never changed): pages are
        read as they are touched, and the mapping is released with the last view of it."""
        info = self._info[key]
        dtype = DTYPES[info.dtype]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        start = info.start - info.start % mmap.ALLOCATIONGRANULARITY
        try:
            with open(self.path(key), "rb") as f:
                mapping = mmap.mmap(f.fileno(), info.end - start, offset=start, access=mmap.ACCESS_COPY)
        except (OSError, ValueError):  # a file system without memory maps: read it
            return self.get(key)
        count = info.nbytes // dtype.itemsize
        return torch.frombuffer(mapping, dtype=dtype, count=count, offset=info.start - start).reshape(info.shape)

    def get(self, key: str, out: Tensor | None = None) -> Tensor:
        """Load one tensor (one positioned read of its bytes), into `out` (a uint8 buffer) when given."""
        with open(self.path(key), "rb", buffering=0) as f:
            return read_tensor(f, self._info[key], out)
