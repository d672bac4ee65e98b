"""Writing checkpoints: safetensors shards streamed tensor by tensor, the shard index, side files, config.json.

A shard's byte layout is planned before anything is written: its header space is reserved from the key names and
each tensor gets its byte range. Tensors (or row ranges of them) are then written into their ranges as they are
computed, in any order and from several threads at once, and the header (padded with spaces, as the format
allows) is written last. So a merge holds a few tiles at a time, never a whole shard. The shards of an output of
DIRECT_MIN_BYTES or more are written with direct I/O, their tensors starting on an ALIGN boundary
(`adaptools.checkpoints.file_writes.BlockWriter`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..digests import file_key, record
from ..errors import InvalidArgumentError
from .file_writes import (ALIGN, COPY_CHUNK, DIRECT_MIN_BYTES, BlockWriter, copy_range, create_new, open_direct,
                          positioned, pwrite_all)
from .safetensors_io import DTYPE_NAMES, TensorInfo

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
HEADER_BYTES_PER_KEY = 256
"""Header space reserved per tensor besides its name: dtype, up to 8 dimensions and two offsets fit with room."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
"""Files of these kinds are weights (or their index) and are not copied beside a merged checkpoint."""
DTYPE_CONFIG_KEYS = ("dtype", "torch_dtype")
SMALL_BYTES = 2**16
"""Tensors up to this size are gathered in memory and written together when their shard closes."""
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """Bytes of a size such as "5GB", "200MB" (decimal, as transformers reads them), "2GiB" or a plain integer."""
    if isinstance(size, int) and not isinstance(size, bool):
        value, unit = float(size), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        if not match or match.group(2).upper() not in _UNITS:
            raise InvalidArgumentError(f"cannot read the size {size!r} (write e.g. 5GB, 200MB or 2GiB)")
        value, unit = float(match.group(1)), match.group(2).upper()
    nbytes = int(value * _UNITS[unit])
    if nbytes <= 0:
        raise InvalidArgumentError(f"size {size!r} must be positive")
    return nbytes


def header_reserve(keys: Sequence[str], metadata: dict[str, str]) -> int:
    """Bytes reserved for a shard's JSON header (a multiple of 8, so tensor data starts 8-byte aligned)."""
    need = len(json.dumps({"__metadata__": metadata})) + sum(len(json.dumps(k)) + HEADER_BYTES_PER_KEY for k in keys)
    return 8 * math.ceil(need / 8)


class ShardWriter:
    """One safetensors file whose tensors go to byte ranges planned up front: written in any order, whole or in
    row ranges, from any thread; `close` writes the header (entries in planned order) once every tensor is there.

    Tensors of at most SMALL_BYTES are kept in memory and written after the others at `close`, in planned order:
    their planned size may be an estimate (an NF4 quant-state JSON's length is known only once quantized).
    """

    def __init__(self, path: Path, sizes: dict[str, int], metadata: dict[str, str] | None = None, reserve: int = 0,
                 direct: bool = False):
        """`direct`: write the planned tensors with direct I/O where the file system allows it."""
        self.path = Path(path)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._reserve = header_reserve(list(sizes), self.metadata) + 8 * math.ceil(reserve / 8)
        self._ranges: dict[str, tuple[int, int]] = {}
        self.nbytes = 0
        for key, size in sizes.items():
            if size > SMALL_BYTES:
                self._ranges[key] = (self.nbytes, self.nbytes + size)
                self.nbytes += size
        self._small: dict[str, bytes | bytearray] = {}
        self._sizes = dict(sizes)
        self._claimed = dict.fromkeys(sizes, 0)
        self._missing = dict(sizes)
        self._entries: dict[str, tuple[str, list[int]]] = {}
        self._lock = threading.Lock()
        self._fd: int | None = create_new(self.path)
        self._blocks: BlockWriter | None = None
        if direct and self.nbytes:
            self._blocks = self._open_blocks()

    def _open_blocks(self) -> BlockWriter | None:
        """A BlockWriter for the planned tensors' bytes (the header space grown so that they start on an ALIGN
        boundary, as a direct write needs), or None where the file system has no direct I/O."""
        direct = open_direct(self.path, self._fd)
        if direct is None:
            return None
        self._reserve = -(-(8 + self._reserve) // ALIGN) * ALIGN - 8
        start = 8 + self._reserve
        os.ftruncate(self._fd, start + self.nbytes)
        return BlockWriter(self._fd, direct, start, start + self.nbytes)

    @property
    def done(self) -> bool:
        """True when every planned tensor has been written."""
        return not self._missing

    def _position(self, key: str, at: int, nbytes: int) -> int:
        """File offset of byte `at` of `key`'s data, checked to hold `nbytes` more."""
        if key not in self._ranges:
            raise KeyError(f"{key!r} is not planned for {self.path.name}")
        begin, end = self._ranges[key]
        if at < 0 or begin + at + nbytes > end:
            raise RuntimeError(f"{key!r}: bytes {at}..{at + nbytes} exceed its {end - begin} planned bytes")
        return 8 + self._reserve + begin + at

    def _claim(self, key: str, nbytes: int, whole: bool) -> None:
        """Reserve `nbytes` of `key` before writing them (all of it when `whole`): a tensor is written once."""
        with self._lock:
            if key not in self._claimed:
                raise KeyError(f"{key!r} is not planned for {self.path.name}")
            claimed = self._claimed[key] + nbytes
            if (whole and self._claimed[key]) or (not whole and claimed > self._sizes[key]):
                raise RuntimeError(f"{key!r} was written to {self.path.name} more than once")
            self._claimed[key] = claimed

    def _received(self, key: str, dtype: str, shape: Sequence[int], nbytes: int, whole: bool) -> bool:
        """Count `nbytes` of `key` as written (all of it when `whole`); True when every tensor is there."""
        with self._lock:
            self._entries[key] = (dtype, list(shape))
            self._missing[key] = 0 if whole else self._missing[key] - nbytes
            if not self._missing[key]:
                del self._missing[key]
            return not self._missing

    def write(self, key: str, tensor: Tensor, row: int = 0, rows: int | None = None) -> bool:
        """Write a tensor (moved to the CPU), or its rows row.. of a tensor of `rows` rows; True when the file is
        complete."""
        data = tensor.detach().to("cpu").contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy()
        shape = data.shape if rows is None else (rows, *data.shape[1:])
        at = row * (raw.size // len(data)) if row else 0
        whole = rows is None and key not in self._ranges
        position = self._position(key, at, raw.size) if key in self._ranges else None
        self._claim(key, raw.size, whole)
        if position is not None:
            if self._blocks is None:
                pwrite_all(self._fd, raw, position)
            else:
                self._blocks.write(raw, position)
        elif whole:
            self._small[key] = raw.tobytes()
        else:
            self._small.setdefault(key, bytearray(self._sizes[key]))[at:at + raw.size] = raw.data
        return self._received(key, DTYPE_NAMES[data.dtype], shape, raw.size, whole)

    def copy(self, key: str, source: Path, info: TensorInfo) -> bool:
        """Write a tensor's stored bytes straight from another safetensors file (in the kernel where possible);
        True when the file is complete."""
        whole = key not in self._ranges
        position = None if whole else self._position(key, 0, info.nbytes)
        self._claim(key, info.nbytes, whole)
        with open(source, "rb", buffering=0) as src:
            if whole:
                self._small[key] = positioned("read", src.fileno(), info.nbytes, info.start)
                if len(self._small[key]) != info.nbytes:
                    raise OSError(f"{str(source)!r} ends before byte {info.end}")
            elif self._blocks is None:
                copy_range(src.fileno(), self._fd, info.start, position, info.nbytes)
            else:
                self._blocks.copy(src.fileno(), info.start, position, info.nbytes)
        return self._received(key, info.dtype, info.shape, info.nbytes, whole)

    def close(self) -> None:
        """Write the small tensors after the others, the header into the reserved space, and close the file."""
        if self._missing:
            raise RuntimeError(f"{self.path.name}: {len(self._missing)} planned tensor(s) were never written")
        if self._blocks is not None:
            self._blocks.close()
        ranges = dict(self._ranges)
        small = b"".join(self._small[key] for key in self._sizes if key in self._small)
        pwrite_all(self._fd, small, 8 + self._reserve + self.nbytes)
        for key in self._sizes:
            if key in self._small:
                ranges[key] = (self.nbytes, self.nbytes + len(self._small[key]))
                self.nbytes += len(self._small[key])
        entries = {key: {"dtype": self._entries[key][0], "shape": self._entries[key][1], "data_offsets": list(ranges[key])}
                   for key in self._sizes}
        header = json.dumps({"__metadata__": self.metadata, **entries}, separators=(",", ":")).encode()
        if len(header) > self._reserve:
            raise RuntimeError(f"{self.path.name}: header of {len(header)} bytes exceeds the {self._reserve} reserved")
        pwrite_all(self._fd, struct.pack("<Q", self._reserve) + header.ljust(self._reserve, b" "), 0)
        self.abort()

    def abort(self) -> None:
        """Close the file (without a header when incomplete: the caller discards it)."""
        if self._blocks is not None:
            self._blocks.abort()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def write_new(path: Path, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to a new file at `path` (`create_new`)."""
    fd = create_new(path)
    try:
        pwrite_all(fd, data.encode() if isinstance(data, str) else data, 0)
    finally:
        os.close(fd)


def plan_shards(units: Sequence[dict[str, int]], max_bytes: int) -> list[dict[str, int]]:
    """Keys and bytes per shard: units (keys written together → their bytes) filled in order up to `max_bytes`
    per shard.

    A unit larger than `max_bytes` gets a shard of its own, as transformers does.
    """
    shards: list[dict[str, int]] = []
    size = max_bytes
    for unit in units:
        nbytes = sum(unit.values())
        if size + nbytes > max_bytes and (not shards or shards[-1]):
            shards.append({})
            size = 0
        shards[-1].update(unit)
        size += nbytes
    return shards


def shard_names(count: int, stem: str = "model") -> list[str]:
    """transformers' file names: model.safetensors for one shard, model-0000i-of-0000n.safetensors for more
    (diffusers' with `stem` diffusion_pytorch_model)."""
    if count == 1:
        return [f"{stem}.safetensors"]
    return [SHARD_NAME.replace("model", stem, 1).format(i + 1, count) for i in range(count)]


def write_index(folder: Path, weight_map: dict[str, str], total_size: int, total_parameters: int,
                name: str = INDEX_NAME) -> None:
    """model.safetensors.index.json (or `name`): metadata (total tensor bytes, parameters) and key → shard file."""
    index = {
        "metadata": {"total_parameters": total_parameters, "total_size": total_size},
        "weight_map": dict(sorted(weight_map.items())),
    }
    write_new(folder / name, json.dumps(index, indent=2) + "\n")


def is_weight_file(name: str) -> bool:
    """True for weight files and their indexes (safetensors, pickles, h5, msgpack, gguf)."""
    return name.endswith(WEIGHT_SUFFIXES)


def hub_cache_roots() -> list[Path]:
    """The Hugging Face cache folders named now: HF_HUB_CACHE (or the older HUGGINGFACE_HUB_CACHE), HF_HOME/hub,
    ~/.cache/huggingface/hub, and huggingface_hub's own setting."""
    named = [os.environ.get("HF_HUB_CACHE"), os.environ.get("HUGGINGFACE_HUB_CACHE"),
             os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None,
             os.path.join("~", ".cache", "huggingface", "hub")]
    try:
        from huggingface_hub import constants
        named.append(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        pass
    return [Path(p).expanduser().resolve() for p in named if p]


def cache_blob(target: Path, root: Path) -> bool:
    """True when `root` is a snapshot of the real Hugging Face cache layout (`<cache>/models--org--name/snapshots/
    <revision>`, the cache one of hub_cache_roots, `blobs/` a real folder of that repository) and `target` (resolved)
    is a regular file in that `blobs/`."""
    repo = root.parent.parent
    if root.parent.name != "snapshots" or not repo.name.startswith(("models--", "datasets--", "spaces--")):
        return False
    blobs = repo / "blobs"
    if blobs.is_symlink() or not blobs.is_dir() or repo.resolve().parent not in hub_cache_roots():
        return False
    return target.parent == blobs.resolve() and target.is_file()


def copy_source(path: Path, root: Path) -> bool:
    """True when file `path` of folder `root` may be copied: a regular file, a link to a file inside `root`'s tree,
    or, where `root` is a snapshot in the Hugging Face cache, a link to a blob of its repository (`cache_blob`). A
    link elsewhere could carry any local file into an output that is then pushed."""
    if not path.is_symlink():
        return True
    target = path.resolve()
    return target.is_relative_to(root.resolve()) or cache_blob(target, root)


def copy_side_files(source: Path, folder: Path, skip: Sequence[str] = (), record_digests: bool = False,
                    weights: bool = False, root: Path | None = None) -> list[str]:
    """Copy the top-level files of `source` that are not weights (config, tokenizer, generation config, ...; with
    `weights` the weights too) into new files of `folder`; a link that points outside the base (`copy_source`) is
    left out with a warning (`root`: the folder links may point into, default `source`). With `record_digests`,
    each file's sha256 is taken from the copy's own read (`adaptools.digests`)."""
    copied = []
    for path in sorted(source.iterdir()):
        if (path.name.startswith(".") or (is_weight_file(path.name) and not weights) or path.name in skip
                or not path.is_file()):
            continue
        if not copy_source(path, root or source):
            warnings.warn(f"{path.name!r} in the base folder links to {str(path.resolve())!r}, outside the base (and "
                          "not to a blob of the Hugging Face cache): it is not copied into the output", stacklevel=2)
            continue
        key = file_key(path) if record_digests else None
        digest = hashlib.sha256()
        with open(path, "rb") as src, os.fdopen(create_new(folder / path.name), "wb") as dst:
            while chunk := src.read(COPY_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
        if key is not None:
            record(key, digest.hexdigest())
        copied.append(path.name)
    return copied


def config_with_dtype(config: dict, dtype: torch.dtype) -> dict:
    """config.json with `dtype` and `torch_dtype` set (transformers 5 reads `dtype`, older versions `torch_dtype`)."""
    name = str(dtype).removeprefix("torch.")
    return {**config, **{key: name for key in DTYPE_CONFIG_KEYS}}


@dataclass
class Layout:
    """Output files → their keys and bytes, in write order; `indexed` when a model.safetensors.index.json is
    written."""

    files: dict[str, dict[str, int]]
    indexed: bool


class OutputSink:
    """One output folder's shards, written from any thread (each file open only while it is filled)."""

    def __init__(self, folder: Path, layout: Layout, metadata: dict[str, str] | None = None, reserve: int = 0,
                 index_name: str = INDEX_NAME):
        """`metadata` and `reserve` (extra header bytes, e.g. for a recipe added later) go to every file."""
        self.folder, self.layout, self.index_name = folder, layout, index_name
        self._metadata, self._reserve = metadata, reserve
        self._file_of = {key: name for name, sizes in layout.files.items() for key in sizes}
        self._direct = sum(sum(sizes.values()) for sizes in layout.files.values()) >= DIRECT_MIN_BYTES
        self._open: dict[str, ShardWriter] = {}
        self._closed: set[str] = set()
        self._lock = threading.Lock()
        self.total_size = 0

    def _writer(self, key: str) -> ShardWriter:
        name = self._file_of[key]
        with self._lock:
            if name in self._closed:
                raise RuntimeError(f"{key!r} arrived after {name} was complete")
            if name not in self._open:
                self._open[name] = ShardWriter(self.folder / name, self.layout.files[name], self._metadata,
                                               self._reserve, self._direct)
            return self._open[name]

    def _finish(self, writer: ShardWriter) -> None:
        writer.close()
        with self._lock:
            del self._open[writer.path.name]
            self._closed.add(writer.path.name)
            self.total_size += writer.nbytes

    def write(self, key: str, tensor: Tensor, row: int = 0, rows: int | None = None) -> None:
        """Write a tensor, or rows row.. of a tensor of `rows` rows (see ShardWriter.write)."""
        writer = self._writer(key)
        if writer.write(key, tensor, row, rows):
            self._finish(writer)

    def copy(self, key: str, source: Path, info: TensorInfo) -> None:
        """Write a tensor kept as stored in another safetensors file, copied file to file."""
        writer = self._writer(key)
        if writer.copy(key, source, info):
            self._finish(writer)

    def close(self, total_parameters: int) -> None:
        """Check that every shard is complete and write the index."""
        missing = sorted(set(self.layout.files) - self._closed)
        if missing:
            raise RuntimeError(f"output shards left incomplete: {', '.join(missing)}")
        if self.layout.indexed:
            weight_map = {key: name for name, sizes in self.layout.files.items() for key in sizes}
            write_index(self.folder, weight_map, self.total_size, total_parameters, self.index_name)

    def abort(self) -> None:
        """Close the files still open; the caller discards the folder."""
        for writer in self._open.values():
            writer.abort()
