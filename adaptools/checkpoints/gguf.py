"""The GGUF container (llama.cpp, ollama; DESIGN §17): a `.gguf` file merged into a `.gguf` file.

Tensors are listed from the validated header (`gguf_file`), named by llama.cpp's tensor names and mapped from
transformers module paths by `names_gguf`. Each merged tensor is decoded to float32 and re-encoded in its own
ggml type (`gguf_quants`: bit-exact with llama.cpp's reference quantizers); a type adaptools cannot encode (IQ*,
...) is refused before anything is written unless `gguf_type` names what to write those tensors as. Untouched
tensors are copied byte for byte; the key/values are copied as stored (their order too), with `general.file_type`
updated only when a type changed; tensor order and alignment are the base's.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, LlamaFileType
from torch import Tensor

from ..errors import BaseMismatchError, InputNotFoundError, InvalidArgumentError
from ..names import listed
from . import gguf_file, gguf_quants
from .container import LOCAL, Container, Files
from .names_gguf import GGUFNames
from .quantizing import ratio, retained_sums
from .safetensors_io import TensorInfo
from .file_writes import copy_range, create_new, pwrite_all
from .stored import CastEncoder, StoredDecoder, TensorSpec, check_range

NAME = "gguf"
T = GGMLQuantizationType
FLOAT_TYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
FILE_TYPES = {T.F32: LlamaFileType.ALL_F32, T.F16: LlamaFileType.MOSTLY_F16, T.BF16: LlamaFileType.MOSTLY_BF16,
              T.Q8_0: LlamaFileType.MOSTLY_Q8_0, T.Q4_0: LlamaFileType.MOSTLY_Q4_0, T.Q4_1: LlamaFileType.MOSTLY_Q4_1,
              T.Q5_0: LlamaFileType.MOSTLY_Q5_0, T.Q5_1: LlamaFileType.MOSTLY_Q5_1, T.Q2_K: LlamaFileType.MOSTLY_Q2_K,
              T.Q3_K: LlamaFileType.MOSTLY_Q3_K_M, T.Q4_K: LlamaFileType.MOSTLY_Q4_K_M,
              T.Q5_K: LlamaFileType.MOSTLY_Q5_K_M, T.Q6_K: LlamaFileType.MOSTLY_Q6_K}
"""llama.cpp's file type named after the type most weights are stored in (written only when a type changed)."""
SURVIVAL_BAND_ELEMENTS = 1 << 20
"""Elements of a merged tensor re-decoded per band by the survival measure (4 MiB of float32)."""


SPLIT_NAME = re.compile(r"(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf")
"""llama.cpp's split file names (gguf-split, convert_hf_to_gguf --split-max-size): PREFIX-0000i-of-0000n.gguf."""


def detect(path: Path, files: Files = LOCAL) -> bool:
    """A file starting with the GGUF magic (elsewhere than on disk: a .gguf file `files` holds)."""
    if files is LOCAL:
        return path.is_file() and gguf_file.detect(path)
    return path.suffix == ".gguf" and files.has(path)


def split_names(name: str) -> list[str]:
    """The file names of every part of the split GGUF that `name` is a part of ([name] for a single file)."""
    match = SPLIT_NAME.fullmatch(name)
    if match is None:
        return [name]
    count = int(match["count"])
    if not 1 <= int(match["no"]) <= count:
        raise BaseMismatchError(f"{name!r}: part {int(match['no'])} of {count} is not a split file's name")
    return [f"{match['prefix']}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def split_parts(path: Path, files: Files = LOCAL) -> list[Path]:
    """Every part of a split GGUF named by any one of them (all must exist), or [path] for a single file."""
    parts = [path.with_name(name) for name in split_names(path.name)]
    missing = [p.name for p in parts if not files.has(p)]
    if missing:
        raise InputNotFoundError(f"split GGUF {str(path)!r}: {listed(missing)} not found beside it")
    return parts


def parse_type(name: str) -> GGMLQuantizationType:
    """The ggml type of a --gguf-type name (q8_0, q6_k, f16, ...), one adaptools can encode."""
    try:
        qtype = T[name.upper()]
    except KeyError:
        qtype = None
    if qtype is None or not gguf_quants.can_encode(qtype):
        choices = ", ".join(t.name.lower() for t in sorted(gguf_quants.ENCODABLE, key=int))
        raise InvalidArgumentError(f"--gguf-type {name!r} is not a type adaptools encodes (choose {choices})")
    return qtype


@dataclasses.dataclass(frozen=True)
class GGUFSpec(TensorSpec):
    """A GGUF tensor as the merge sees it: float32 (or its own float dtype), with its ggml type."""

    qtype: GGMLQuantizationType = T.F32

    @property
    def encoded(self) -> bool:  # type: ignore[override]
        return self.qtype not in FLOAT_TYPES


class GGUFFile(Container):
    """A GGUF file read lazily: tensor name → (ggml type, shape, byte range) from its validated header."""

    output_is_file = True
    output_suffix = ".gguf"

    def __init__(self, path: str | os.PathLike, files: Files = LOCAL):
        path = Path(path)
        if not files.has(path):
            raise InputNotFoundError(f"base {str(path)!r} does not exist")
        parts = split_parts(path, files)
        super().__init__(path.parent, [p.name for p in parts], files)
        self.headers = {p.name: files.gguf_header(p) for p in parts}
        self.header = self.headers[parts[0].name]
        """The first part's header: the model's metadata."""
        for part, header in self.headers.items():
            for name, tensor in header.tensors.items():
                if name in self.weight_map:
                    raise BaseMismatchError(f"tensor {name!r} is in two parts of {str(path)!r}: "
                                            f"{self.weight_map[name]!r} and {part!r}")
                self.weight_map[name] = part
                self._info[name] = tensor
        self.output_is_file = len(parts) == 1  # a split base gives a folder of parts
        self.label = f"gguf {self.header.architecture or '?'}" + (f" ({len(parts)} parts)" if len(parts) > 1 else "")

    @property
    def file(self) -> Path:
        return self.header.path

    @property
    def config(self) -> dict:
        """The architecture as `model_type`; the names the converter's metadata gives the model (general.name, its
        basename-size-finetune-version, source and repo URLs; with them, the file's name) as the names an adapter's
        base_model is compared with (none: not compared)."""
        get = self.header.get
        parts = [get(f"general.{k}") for k in ("basename", "size_label", "finetune", "version")]
        named = [get("general.name"), "-".join(p for p in parts if isinstance(p, str)),
                 *(get(f"general.{k}") for k in ("source.repo_url", "source.url", "repo_url", "url"))]
        names = [n for n in named if isinstance(n, str) and n]
        return {"model_type": self.header.architecture, "_name_or_path": names[0] if names else None,
                "_aliases": [*names, self.file.name] if names else []}

    @cached_property
    def names(self) -> GGUFNames:
        arch = self.header.architecture
        get = self.header.get
        heads, kv_heads = get(f"{arch}.attention.head_count"), get(f"{arch}.attention.head_count_kv")
        block_count = get(f"{arch}.block_count")
        if not isinstance(block_count, int) or not 0 < block_count <= len(self.weight_map):
            raise BaseMismatchError(f"{str(self.file)!r}: {arch}.block_count is missing or not a block count of its "
                                    f"{len(self.weight_map)} tensors")
        return GGUFNames(self.weight_map, arch, block_count, heads if isinstance(heads, int) else None,
                         kv_heads if isinstance(kv_heads, int) else None, {k: self.shape(k) for k in self.weight_map})

    def qtype(self, key: str) -> GGMLQuantizationType:
        return self.headers[self.weight_map[key]].tensors[key].type

    def dtype(self, key: str) -> torch.dtype:
        """The dtype the merge sees: the stored float dtype, float32 for a quantized type."""
        return FLOAT_TYPES.get(self.qtype(key), torch.float32)

    def mapped(self, key: str) -> Tensor:
        """The stored bytes of `key` (uint8 rows of bytes; F32/F16/BF16 as their dtype), memory-mapped."""
        info = self._info[key]
        qtype = self.qtype(key)
        raw = self._bytes(key, info)
        if qtype in FLOAT_TYPES:
            return raw.view(FLOAT_TYPES[qtype]).reshape(info.shape)
        return raw.reshape(*info.shape[:-1], gguf_quants.row_bytes(qtype, info.shape[-1]))

    def _bytes(self, key: str, info: TensorInfo) -> Tensor:
        array = np.memmap(self.path(key), dtype=np.uint8, mode="c", offset=info.start, shape=(info.nbytes,)) \
            if info.nbytes else np.empty(0, dtype=np.uint8)
        return torch.from_numpy(array)

    def get(self, key: str, out: Tensor | None = None) -> Tensor:
        return self.mapped(key).clone()

    def decoder(self) -> GGUFDecoder:
        return GGUFDecoder()

    def codecs(self, dtype: str | torch.dtype | None, *, device: torch.device, gguf_type: str | None = None,
               **options: Any) -> tuple[GGUFDecoder, GGUFEncoder]:
        given = sorted(k for k, v in options.items() if v is not None)
        if dtype is not None or given:
            raise InvalidArgumentError(f"a GGUF base keeps each tensor's ggml type: {'--dtype' if dtype else ''}"
                                       f"{' '.join('--' + k.replace('_', '-') for k in given)} does not apply "
                                       "(--gguf-type names the type of merged tensors stored in types adaptools "
                                       "cannot encode)")
        return GGUFDecoder(), GGUFEncoder(self, None if gguf_type is None else parse_type(gguf_type))

    def plan_layout(self, units: Sequence[tuple[dict[str, int], str]], max_shard_bytes: int | None) -> list:
        if max_shard_bytes is not None:
            raise InvalidArgumentError("a GGUF output keeps the base's file: --max-shard-size does not apply")
        return [key for entries, _ in units for key in entries]

    def open_output(self, folder: Path, encoder: Any, layout: Any, *, hash_inputs: bool = False,
                    skip: Sequence[str] = ()) -> GGUFSink | SplitSink:
        """The output file `folder` with the base's header, types updated; for a split base, the folder `folder`
        holding one part per base part (`<folder name>-0000i-of-0000n.gguf`, each with its part's header)."""
        file_type = encoder.file_type()
        if len(self.headers) == 1:
            return GGUFSink(folder, self.header, encoder.types, file_type)
        folder.mkdir(parents=True, exist_ok=True)
        count = len(self.headers)
        return SplitSink({part: GGUFSink(folder / f"{folder.name}-{i:05d}-of-{count:05d}.gguf", header, encoder.types,
                                         file_type if i == 1 else None)
                          for i, (part, header) in enumerate(self.headers.items(), start=1)}, self.weight_map)


class GGUFDecoder(StoredDecoder):
    """GGUF tensors decoded to float32 (F32/F16/BF16 read as stored) by `gguf_quants.decode`."""

    def specs(self, ckpt: GGUFFile) -> dict[str, TensorSpec]:
        return {k: GGUFSpec(ckpt.shape(k), ckpt.dtype(k), ckpt.weight_map[k], ckpt.nbytes(k), qtype=ckpt.qtype(k))
                for k in ckpt.keys()}

    def read(self, ckpt: GGUFFile, key: str) -> Tensor:
        return self.read_into(ckpt, key, lambda shape, dtype: torch.empty(shape, dtype=dtype))

    def read_into(self, ckpt: GGUFFile, key: str, take: Callable[[tuple[int, ...], torch.dtype], Tensor]) -> Tensor:
        stored = ckpt.mapped(key)
        qtype = ckpt.qtype(key)
        if qtype in FLOAT_TYPES:
            return stored
        out = take(ckpt.shape(key), torch.float32)
        gguf_quants.decode(stored.numpy(), qtype, ckpt.shape(key), out=out.numpy())
        return out


class GGUFEncoder(CastEncoder):
    """Merged tensors re-encoded in their own ggml type (those adaptools cannot encode in `override`, when given);
    untouched tensors copied as stored."""

    row_wise = False  # whole tensors: the survival of each merged weight is measured after re-encoding

    def __init__(self, ckpt: GGUFFile, override: GGMLQuantizationType | None):
        super().__init__(None)
        self.ckpt = ckpt
        self.override = override
        self.types = {key: ckpt.qtype(key) for key in ckpt.keys()}
        """Output ggml type of every tensor."""

    @property
    def label(self) -> str:
        return "each tensor's ggml type"

    @property
    def quantized(self) -> int:
        return sum(qtype not in FLOAT_TYPES for qtype in self.types.values())

    def check(self, changed: Iterable[str]) -> None:
        """Before anything is written: the changed tensors whose type adaptools cannot encode take `override`, or
        are refused by name and type."""
        foreign = [k for k in changed if not gguf_quants.can_encode(self.types[k])]
        if foreign and self.override is None:
            raise BaseMismatchError(
                f"{len(foreign)} merged tensor(s) are stored in ggml types adaptools cannot encode: "
                f"{listed([f'{k} ({self.types[k].name})' for k in foreign])}; pass --gguf-type (q8_0, q6_k, f16, ...) "
                "to write them in that type")
        block = gguf_quants.block_shape(self.override)[0] if foreign else 1
        misfit = [k for k in foreign if self.ckpt.shape(k)[-1] % block]
        if misfit:
            raise InvalidArgumentError(f"--gguf-type {self.override.name.lower()}: rows of {listed(misfit)} are not "
                                       f"a multiple of its block of {block}")
        for key in foreign:
            self.types[key] = self.override

    def dtype_for(self, spec: TensorSpec) -> torch.dtype:
        return torch.float32

    def keeps(self, key: str, spec: TensorSpec) -> bool:
        return True

    def entries(self, key: str, spec: TensorSpec) -> dict[str, int]:
        return {key: gguf_file.tensor_nbytes(spec.shape, self.types[key])}

    def encode(self, key: str, tensor: Tensor) -> dict[str, Tensor]:
        qtype = self.types[key]
        if qtype in (T.F16, T.BF16):
            check_range([key], tensor.unsqueeze(0), FLOAT_TYPES[qtype])
        values = tensor.detach().to("cpu", torch.float32).numpy()
        encoded = gguf_quants.encode(values.reshape(-1, values.shape[-1]), qtype)
        return {key: torch.from_numpy(encoded.reshape(-1))}

    def survival(self, key: str, base: Tensor, merged: Tensor, encoded: dict[str, Tensor]) -> float | None:
        qtype = self.types[key]
        if qtype in FLOAT_TYPES or merged.numel() == 0:
            return None
        # decoded in bands of rows into one small scratch: never a second whole-tensor copy (an embedding is 262 MB)
        columns = merged.shape[-1]
        rows = merged.numel() // columns
        raw = encoded[key].numpy().reshape(rows, -1)
        base, merged = base.reshape(rows, columns), merged.reshape(rows, columns)
        step = max(1, SURVIVAL_BAND_ELEMENTS // columns)
        scratch = np.empty((min(step, rows), columns), dtype=np.float32)
        sums = torch.zeros(2, dtype=torch.float64)
        for first in range(0, rows, step):
            last = min(rows, first + step)
            after = gguf_quants.decode(raw[first:last], qtype, (last - first, columns), out=scratch[:last - first])
            sums += retained_sums(base[first:last], torch.from_numpy(after), merged[first:last])
        return ratio(sums)

    def file_type(self) -> int | None:
        """general.file_type for the output: None (keep the base's) unless a tensor's type changed."""
        if all(qtype == self.ckpt.qtype(key) for key, qtype in self.types.items()):
            return None
        weights = Counter(qtype for key, qtype in self.types.items() if len(self.ckpt.shape(key)) > 1)
        return FILE_TYPES.get(weights.most_common(1)[0][0]) if weights else None


class GGUFSink:
    """One GGUF output file: the base's header (key/values copied as stored, types and offsets updated) written
    first, every tensor then written at its planned offset, in any order, from any thread."""

    def __init__(self, path: Path, header: gguf_file.GGUFHeader, types: dict[str, GGMLQuantizationType],
                 file_type: int | None = None, extra: dict[str, str] | None = None):
        self.path = Path(path)
        self.types = types
        self.offsets, data_size = plan_offsets(header, types)
        head = gguf_file.header_bytes(header, types, self.offsets, file_type, extra or {})
        self.data_start = len(head)
        self.total_size = self.data_start + data_size
        self._missing = set(header.tensors)
        self._fd = create_new(self.path)
        os.ftruncate(self._fd, self.total_size)  # zero padding between tensors, as the format wants
        pwrite_all(self._fd, head, 0)

    def write(self, key: str, tensor: Tensor, row: int = 0, rows: int | None = None) -> None:
        """Write the whole encoded tensor `key` (GGUFEncoder is not row-wise)."""
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        pwrite_all(self._fd, raw, self.data_start + self.offsets[key])
        self._missing.discard(key)

    def copy(self, key: str, source: Path, info: TensorInfo) -> None:
        with open(source, "rb", buffering=0) as src:
            copy_range(src.fileno(), self._fd, info.start, self.data_start + self.offsets[key], info.nbytes)
        self._missing.discard(key)

    def close(self, total_parameters: int = 0) -> None:
        if self._missing:
            raise RuntimeError(f"{self.path.name}: {len(self._missing)} tensor(s) were never written")
        os.fsync(self._fd)
        self.abort()

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def plan_offsets(header: gguf_file.GGUFHeader, types: dict[str, GGMLQuantizationType]) -> tuple[dict[str, int], int]:
    """Data offsets of every tensor and the data section's size: the base's own when no type changed (the same
    bytes in the same places), else the base's data order re-packed at its alignment."""
    tensors = header.tensors
    align = header.alignment
    if all(types[name] == t.type for name, t in tensors.items()):
        offsets = {name: t.start - header.data_start for name, t in tensors.items()}
    else:
        offsets, at = {}, 0
        for name in sorted(tensors, key=lambda n: tensors[n].start):
            offsets[name] = at
            at += -(-gguf_file.tensor_nbytes(tensors[name].shape, types[name]) // align) * align
    end = max((offsets[n] + gguf_file.tensor_nbytes(t.shape, types[n]) for n, t in tensors.items()), default=0)
    return offsets, -(-end // align) * align


class SplitSink:
    """The parts of a split GGUF output: each tensor goes to the part its base part maps to."""

    def __init__(self, parts: dict[str, GGUFSink], weight_map: dict[str, str]):
        self.parts = parts
        self.weight_map = weight_map

    @property
    def total_size(self) -> int:
        return sum(part.total_size for part in self.parts.values())

    def write(self, key: str, tensor: Tensor, row: int = 0, rows: int | None = None) -> None:
        self.parts[self.weight_map[key]].write(key, tensor, row, rows)

    def copy(self, key: str, source: Path, info: TensorInfo) -> None:
        self.parts[self.weight_map[key]].copy(key, source, info)

    def close(self, total_parameters: int = 0) -> None:
        for part in self.parts.values():
            part.close(total_parameters)

    def abort(self) -> None:
        for part in self.parts.values():
            part.abort()
