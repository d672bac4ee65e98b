"""Base model checkpoints: a Hugging Face folder (model.safetensors or shards + index), read tensor by tensor.

A safetensors file is an 8-byte little-endian header length, a JSON header {key: {dtype, shape, data_offsets}}
and the raw tensor bytes. The header is parsed once; each tensor is then read with one positioned read into
its own buffer, or memory-mapped on its own (`mapped`): nothing else of the file is held in memory, and a
mapping goes with its tensor.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import BaseMismatchError, InputNotFoundError
from .tensors import read_json_object

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


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor infos (in header order) and `__metadata__` of a safetensors file; BaseMismatchError when malformed."""
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError(f"header length {length} exceeds the file size {size}")
            header = json.loads(f.read(length))
        metadata = header.pop("__metadata__", None) or {}
        infos = {}
        for key, entry in header.items():
            begin, end = entry["data_offsets"]
            if entry["dtype"] not in DTYPES:
                raise ValueError(f"tensor {key!r} has unknown dtype {entry['dtype']!r}")
            info = TensorInfo(entry["dtype"], tuple(entry["shape"]), 8 + length + begin, 8 + length + end)
            itemsize = DTYPES[info.dtype].itemsize
            if not 0 <= begin <= end or info.end > size or info.nbytes != itemsize * math.prod(info.shape):
                raise ValueError(f"tensor {key!r} has data offsets {entry['data_offsets']} that do not fit its shape")
            infos[key] = info
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BaseMismatchError(f"base shard {str(path)!r} is not a readable safetensors file ({exc})") from exc
    return infos, metadata


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
                self.weight_map[key] = shard
                self._info[key] = info

    def _find_shards(self, path: Path) -> list[str]:
        if path.is_file():
            return [path.name]
        index = path / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise BaseMismatchError(f"{str(index)!r} is not a valid safetensors index ({exc})") from exc
            return list(dict.fromkeys(weight_map.values()))
        if (path / SINGLE_NAME).exists():
            return [SINGLE_NAME]
        found = sorted(p.name for p in path.glob("*.safetensors"))
        if not found:
            raise BaseMismatchError(f"{str(path)!r} holds no model.safetensors, index or *.safetensors file")
        return found

    @property
    def config(self) -> dict:
        """config.json of the base folder, or {} when there is none."""
        cfg = self.root / "config.json"
        if not cfg.exists():
            return {}
        return read_json_object(cfg, BaseMismatchError)

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
