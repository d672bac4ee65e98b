"""Writing checkpoints: safetensors shards streamed tensor by tensor, the shard index, side files, config.json.

A shard is written data first: its header space is reserved from the key names, tensors are appended as they
arrive, and the header (padded with spaces, as the format allows) is written last. So a merge holds one
tensor (or one batch) at a time, never a whole shard. Writes run on a background thread (`WriteQueue`), so the
next tensors are computed while the last ones are written.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import InvalidArgumentError
from .checkpoint import DTYPE_NAMES, INDEX_NAME, SINGLE_NAME, TensorInfo

SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
HEADER_BYTES_PER_KEY = 256
"""Header space reserved per tensor besides its name: dtype, up to 8 dimensions and two offsets fit with room."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
"""Files of these kinds are weights (or their index) and are not copied beside a merged checkpoint."""
DTYPE_CONFIG_KEYS = ("dtype", "torch_dtype")
COPY_CHUNK = 16 * 2**20
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
    """One safetensors file filled as tensors arrive, in any order, each exactly once; `close` writes the header."""

    def __init__(self, path: Path, keys: Sequence[str], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending = set(keys)
        self._entries: dict[str, dict] = {}
        self._reserve = header_reserve(keys, self.metadata)
        self._file = open(self.path, "wb", buffering=0)
        self._file.seek(8 + self._reserve)
        self.nbytes = 0

    @property
    def done(self) -> bool:
        """True when every planned tensor has been written."""
        return not self._pending

    def _add(self, key: str, dtype: str, shape: Sequence[int], nbytes: int) -> None:
        if key not in self._pending:
            raise KeyError(f"{key!r} is not planned for {self.path.name} or was written already")
        self._entries[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [self.nbytes, self.nbytes + nbytes]}
        self.nbytes += nbytes
        self._pending.discard(key)

    def write(self, key: str, tensor: Tensor) -> None:
        """Append one tensor's bytes (moved to the CPU, made contiguous)."""
        data = tensor.detach().to("cpu").contiguous()
        raw = data.reshape(-1).view(torch.uint8)
        _write_all(self._file, raw.numpy().data)
        self._add(key, DTYPE_NAMES[data.dtype], data.shape, raw.numel())

    def copy(self, key: str, source: Path, info: TensorInfo) -> None:
        """Append a tensor's stored bytes straight from another safetensors file (in the kernel where possible)."""
        with open(source, "rb", buffering=0) as src:
            _copy_range(src, self._file, info.start, info.nbytes)
        self._add(key, info.dtype, info.shape, info.nbytes)

    def close(self) -> None:
        """Write the header into the reserved space and close the file."""
        if self._pending:
            raise RuntimeError(f"{self.path.name}: {len(self._pending)} planned tensor(s) were never written")
        header = json.dumps({"__metadata__": self.metadata, **self._entries}, separators=(",", ":")).encode()
        if len(header) > self._reserve:
            raise RuntimeError(f"{self.path.name}: header of {len(header)} bytes exceeds the {self._reserve} reserved")
        self._file.seek(0)
        _write_all(self._file, struct.pack("<Q", self._reserve) + header.ljust(self._reserve, b" "))
        self._file.close()

    def abort(self) -> None:
        """Close the file without a header (the caller discards it)."""
        self._file.close()


def _write_all(f, data) -> None:
    """Write every byte of `data` to an unbuffered file (a raw write may take only part)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[f.write(view):]


def _copy_range(src, dst, offset: int, count: int) -> None:
    """Copy `count` bytes of `src` from `offset` to the current position of `dst` (copy_file_range where available)."""
    if hasattr(os, "copy_file_range"):
        try:
            while count:
                n = os.copy_file_range(src.fileno(), dst.fileno(), count, offset)
                if n == 0:
                    raise OSError(f"{src.name!r} ends before byte {offset + count}")
                offset, count = offset + n, count - n
            return
        except OSError as exc:  # e.g. unsupported by the file system: copy through memory from where it stopped
            if exc.errno is None:
                raise
    src.seek(offset)
    while count:
        chunk = src.read(min(count, COPY_CHUNK))
        if not chunk:
            raise OSError(f"{src.name!r} ends before byte {offset + count}")
        _write_all(dst, chunk)
        count -= len(chunk)
        offset += len(chunk)


def plan_shards(units: Sequence[tuple[Sequence[str], int]], max_bytes: int) -> list[list[str]]:
    """Keys per shard: units (keys written together, their bytes) filled in order up to `max_bytes` per shard.

    A unit larger than `max_bytes` gets a shard of its own, as transformers does.
    """
    shards: list[list[str]] = []
    size = max_bytes
    for keys, nbytes in units:
        if size + nbytes > max_bytes and (not shards or shards[-1]):
            shards.append([])
            size = 0
        shards[-1].extend(keys)
        size += nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """transformers' file names: model.safetensors for one shard, model-0000i-of-0000n.safetensors for more."""
    return [SINGLE_NAME] if count == 1 else [SHARD_NAME.format(i + 1, count) for i in range(count)]


def write_index(folder: Path, weight_map: dict[str, str], total_size: int, total_parameters: int) -> None:
    """model.safetensors.index.json: metadata (total tensor bytes, parameters) and key → shard file."""
    index = {
        "metadata": {"total_parameters": total_parameters, "total_size": total_size},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def is_weight_file(name: str) -> bool:
    """True for weight files and their indexes (safetensors, pickles, h5, msgpack, gguf)."""
    return name.endswith(WEIGHT_SUFFIXES)


def copy_side_files(source: Path, folder: Path, skip: Sequence[str] = ()) -> list[str]:
    """Copy the top-level files of `source` that are not weights (config, tokenizer, generation config, ...)."""
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.startswith(".") and not is_weight_file(path.name) and path.name not in skip:
            shutil.copyfile(path, folder / path.name)
            copied.append(path.name)
    return copied


def config_with_dtype(config: dict, dtype: torch.dtype) -> dict:
    """config.json with `dtype` and `torch_dtype` set (transformers 5 reads `dtype`, older versions `torch_dtype`)."""
    name = str(dtype).removeprefix("torch.")
    return {**config, **{key: name for key in DTYPE_CONFIG_KEYS}}


@dataclass
class Layout:
    """Output files → their keys; `indexed` when a model.safetensors.index.json is written."""

    files: dict[str, list[str]]
    indexed: bool


class WriteQueue:
    """File operations on one background thread, in submission order, so that computing overlaps with writing.

    At most `max_pending` bytes of tensors wait in the queue (`submit` blocks beyond that). The first failing
    operation cancels the later ones; its exception is raised in the caller's thread by the next `submit`,
    `wait` or `drain`.
    """

    def __init__(self, max_pending: int = 2**28) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adaptools-writer")
        self._pending: deque[tuple[Future, int]] = deque()
        self._pending_bytes = 0
        self._max_pending = max_pending
        self._error: BaseException | None = None
        self.last: Future | None = None

    def _run(self, fn: Callable[..., None], args: tuple) -> None:
        if self._error is None:
            try:
                fn(*args)
            except BaseException as exc:  # handed to the caller's thread
                self._error = exc

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, fn: Callable[..., None], *args: object, nbytes: int = 0) -> None:
        """Queue `fn(*args)`; `nbytes` is the memory the queued arguments hold until it has run."""
        while self._pending and (self._pending[0][0].done() or self._pending_bytes + nbytes > self._max_pending):
            future, size = self._pending.popleft()
            future.result()
            self._pending_bytes -= size
        self._check()
        self.last = self._pool.submit(self._run, fn, args)
        self._pending.append((self.last, nbytes))
        self._pending_bytes += nbytes

    def wait(self, future: Future | None) -> None:
        """Block until `future` (an operation of this queue) has run."""
        if future is not None:
            future.result()
        self._check()

    def drain(self) -> None:
        """Block until every queued operation has run."""
        self.wait(self.last)

    def close(self) -> None:
        """Stop the thread: the running operation finishes, queued ones are dropped."""
        self._pool.shutdown(wait=True, cancel_futures=True)


class OutputSink:
    """One output folder's shards, filled through a WriteQueue (each file open only while it is filled)."""

    def __init__(self, folder: Path, layout: Layout, queue: WriteQueue):
        self.folder, self.layout, self.queue = folder, layout, queue
        self._file_of = {key: name for name, keys in layout.files.items() for key in keys}
        self._open: dict[str, ShardWriter] = {}
        self.total_size = 0

    def _writer(self, key: str) -> ShardWriter:
        name = self._file_of[key]
        if name not in self._open:
            self._open[name] = ShardWriter(self.folder / name, self.layout.files[name])
        return self._open[name]

    def _done(self, writer: ShardWriter) -> None:
        if writer.done:
            writer.close()
            self.total_size += writer.nbytes
            del self._open[writer.path.name]

    def _write(self, tensors: dict[str, Tensor]) -> None:
        for key, tensor in tensors.items():
            writer = self._writer(key)
            writer.write(key, tensor)
            self._done(writer)

    def _copy(self, key: str, source: Path, info: TensorInfo) -> None:
        writer = self._writer(key)
        writer.copy(key, source, info)
        self._done(writer)

    def write(self, tensors: dict[str, Tensor]) -> None:
        """Queue tensors for writing (they must stay unchanged until written: see WriteQueue)."""
        self.queue.submit(self._write, tensors, nbytes=sum(t.numel() * t.element_size() for t in tensors.values()))

    def copy(self, key: str, source: Path, info: TensorInfo) -> None:
        """Queue a tensor kept as stored in another safetensors file, copied file to file."""
        self.queue.submit(self._copy, key, source, info)

    def close(self, total_parameters: int) -> None:
        """Wait for the queued writes, check every shard is complete, write the index."""
        self.queue.drain()
        if self._open:
            raise RuntimeError(f"output shards left incomplete: {', '.join(self._open)}")
        if self.layout.indexed:
            weight_map = {key: name for name, keys in self.layout.files.items() for key in keys}
            write_index(self.folder, weight_map, self.total_size, total_parameters)

    def abort(self) -> None:
        """Close the files still open (after the queue was closed); the caller discards the folder."""
        for writer in self._open.values():
            writer.abort()
