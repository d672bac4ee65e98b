"""Base containers (DESIGN §14): what the merge, extract, dora and spectrum read a base checkpoint through.

A container lists tensors (key → shape, stored dtype, byte range in one of its files) from its headers alone,
reads one tensor at a time (memory-mapped), maps adapter module paths to its keys (`names`), picks the codecs
that decode its stored tensors to float32 and encode merged ones back (`codecs`), and writes an output of its own
kind (`plan_layout`, `open_output`). Containers of safetensors files (a Hugging Face folder, a single-file
checkpoint, a pipeline's components) fill `weight_map` and `_info` from validated headers (`read_shards`) and
take every listing method from this class.

Where a container finds its safetensors files is a `Files`: `LOCAL` (the disk) unless it is opened for names only
from a Hub base, whose `Files` (adaptools.sources) lists the repo and fetches only the headers of its weights.
"""
from __future__ import annotations

import mmap
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from ..errors import BaseMismatchError
from ..names import shown
from . import gguf_file
from .gguf_file import GGUFHeader
from .names import NameMap
from .safetensors_io import DTYPES, TensorInfo, read_header, read_tensor


class Sink(Protocol):
    """One output of a container kind, written tensor by tensor from any thread."""

    total_size: int

    def write(self, key: str, tensor: Tensor, row: int = 0, rows: int | None = None) -> None: ...

    def copy(self, key: str, source: Path, info: TensorInfo) -> None: ...

    def close(self, total_parameters: int) -> None: ...

    def abort(self) -> None: ...


class Files:
    """Where a container finds its safetensors files: whether one is there, the names and sub-folders in a folder,
    and their validated headers (here: on disk). A container opened on other `Files` lists keys, shapes and dtypes
    and maps names, but reads no tensor."""

    def has(self, path: Path) -> bool:
        return path.is_file()

    def safetensors(self, folder: Path) -> list[str]:
        """Names of the *.safetensors files in `folder`, sorted."""
        return sorted(p.name for p in folder.glob("*.safetensors"))

    def folders(self, folder: Path) -> list[str]:
        """Names of the sub-folders of `folder` (hidden ones left out), sorted."""
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))

    def header(self, path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        """Tensor infos and `__metadata__` of the safetensors file `path` (validated: safetensors_io.parse_header)."""
        return read_header(path)

    def gguf_header(self, path: Path) -> GGUFHeader:
        """The validated header of the GGUF file `path` (gguf_file.read_header)."""
        return gguf_file.read_header(path)


LOCAL = Files()
"""The files on disk."""


class Container:
    """A base checkpoint: tensors listed by key without loading them, read one at a time."""

    label = "checkpoint"
    """What the container is, for summaries ("hf folder", "sdxl single file", ...)."""
    output_is_file = False
    """True when an output of this kind is one file (`-o OUT.safetensors`), False for a folder."""
    output_suffix = ".safetensors"
    """The suffix of each file of a file-kind output written per adapter into a folder (merge --each)."""

    def __init__(self, root: Path, shards: Sequence[str], files: Files = LOCAL):
        self.root = root
        self.files = files
        self.shards = list(shards)
        self.weight_map: dict[str, str] = {}
        self._info: dict[str, TensorInfo] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        """Each shard's safetensors `__metadata__`."""

    def read_shards(self) -> None:
        """Fill the listing from the shards' validated headers (a key in two shards is an error)."""
        for shard in self.shards:
            infos, self.metadata[shard] = self.files.header(self.root / shard)
            for key, info in infos.items():
                if key in self.weight_map:
                    raise BaseMismatchError(f"tensor {shown(key)} is in two shards of {str(self.root)!r}: "
                                            f"{self.weight_map[key]!r} and {shard!r}")
                self.weight_map[key] = shard
                self._info[key] = info

    @property
    def config(self) -> dict:
        """The model's config (config.json of a folder); {} when the container has none."""
        return {}

    @property
    def indexed(self) -> bool:
        """True when the container's tensors are listed by an index file."""
        return False

    @cached_property
    def names(self) -> NameMap:
        """Where adapter module paths land in this container (keys `<module>.weight` by default)."""
        return NameMap(self.weight_map)

    def decoder(self) -> Any:
        """The decoder of the container's stored tensors (quantized weights decoded to their float layout)."""
        raise NotImplementedError

    def codecs(self, dtype: str | torch.dtype | None, *, device: torch.device, **options: Any) -> tuple[Any, Any]:
        """(decoder, encoder) of the merge for an output `dtype` (None keeps each tensor's stored encoding)."""
        raise NotImplementedError

    def plan_layout(self, units: Sequence[tuple[dict[str, int], str]], max_shard_bytes: int | None) -> Any:
        """The output files: `units` are (output key → bytes, base shard) in write order."""
        raise NotImplementedError

    def open_output(self, folder: Path, encoder: Any, layout: Any, *, hash_inputs: bool = False,
                    skip: Sequence[str] = ()) -> Sink:
        """An output of this kind in the staging folder `folder`, with the base's side files (except `skip`)."""
        raise NotImplementedError

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
