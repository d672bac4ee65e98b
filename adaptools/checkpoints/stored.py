"""Stored-tensor codecs of the merge engine: how a base tensor becomes the tensor that is merged (a decoder) and
how a result becomes the stored output tensors (an encoder). This module holds the plain ones: as stored, and a
cast to one dtype, and a quantized base written unquantized; `nf4` adds NF4 decode and encode on the same
interface, and `codecs` chooses among them.

A decoder lists the base's tensors as the merge sees them (`TensorSpec`), reads one, and says where the stored
bytes of a tensor kept unchanged lie (copied file to file). An encoder says which dtype a tensor is merged into,
whether an unchanged tensor is kept as stored, which output keys a tensor becomes (with their bytes, to plan
shards), encodes results, and updates config.json.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import InvalidArgumentError, NonFiniteError
from .container import Container
from .safetensors_io import TensorInfo
from .shards import config_with_dtype
from ..names import listed

DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
MERGEABLE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
"""Stored dtypes of tensors the merge can change (float8 has no arithmetic here; integers are not weights)."""
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
"""Architectures whose projections are transformers' Conv1D (weight stored (in, out)): a square weight is transposed."""
CONV1D_MODULES = ("c_attn", "c_proj", "c_fc", "q_attn")
"""transformers' Conv1D projections in CONV1D_MODEL_TYPES architectures (their weights are stored (in, out))."""


def is_conv1d(model_type: str | None, key: str) -> bool:
    """True when weight `key` is a transformers Conv1D (stored (in, out)) of a GPT-2-style architecture."""
    module = key.removesuffix(".weight").rsplit(".", 1)[-1]
    return model_type in CONV1D_MODEL_TYPES and module in CONV1D_MODULES


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """torch dtype of "fp16"/"bf16"/"fp32" (and their long names); None keeps each base tensor's dtype."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise InvalidArgumentError(f"unsupported output dtype {dtype!r} (choose fp16, bf16 or fp32)")


def check_range(names: Sequence[str], values: Tensor, dtype: torch.dtype) -> None:
    """NonFiniteError naming the stacked tensors (b, ...) that hold NaN/Inf or values beyond the range of `dtype`.

    Fast pass: ‖x‖_F of all of them, then per tensor; when it is finite and below the dtype's largest value, so
    is every |x_i|. Tensors failing it get the exact test: max |x| cast to `dtype` overflows exactly when some
    element does.
    """
    if values.numel() == 0 or not values.is_floating_point():
        return
    if values.dtype not in MERGEABLE_DTYPES:  # float8 (cast to a wider dtype): torch reduces it only as float32
        values = values.float()
    limit = torch.finfo(dtype).max
    if torch.linalg.vector_norm(values, dtype=torch.float32).item() < limit:
        return
    flat = values.reshape(len(names), -1)
    norms = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float32)
    suspects = (~(norms < limit)).nonzero().flatten().tolist()
    if not suspects:
        return
    low, high = torch.aminmax(flat[suspects].float(), dim=1)
    peak = torch.maximum(high, -low)
    fits, finite = torch.isfinite(peak.to(dtype)).tolist(), torch.isfinite(peak).tolist()
    bad = [j for j in range(len(suspects)) if not fits[j]]
    if not bad:
        return
    names_bad = listed([names[suspects[j]] for j in bad])
    if all(finite[j] for j in bad):
        raise NonFiniteError(
            f"merged values exceed the {str(dtype).removeprefix('torch.')} range (|x| > {torch.finfo(dtype).max:g}) "
            f"in {len(bad)} tensor(s): {names_bad}; merge to bf16 or fp32 (--dtype)"
        )
    raise NonFiniteError(f"the merge gives NaN or Inf in {len(bad)} tensor(s): {names_bad}")


@dataclass(frozen=True)
class TensorSpec:
    """A base tensor as the merge sees it: shape and dtype (after decoding), its shard and stored bytes."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    shard: str
    nbytes: int
    encoded = False
    """True for a tensor decoded from a quantized encoding (its stored bytes are not the tensor's own)."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class StoredDecoder:
    """Base tensors as stored, one checkpoint key each (the NF4 decoder groups and dequantizes keys here)."""

    def specs(self, ckpt: Container) -> dict[str, TensorSpec]:
        """{key: spec} for every tensor, in shard order."""
        return {k: TensorSpec(ckpt.shape(k), ckpt.dtype(k), ckpt.weight_map[k], ckpt.nbytes(k)) for k in ckpt.keys()}

    def read(self, ckpt: Container, key: str) -> Tensor:
        """The tensor to merge (memory-mapped: its pages are read as they are used and released with it)."""
        return ckpt.mapped(key)

    def read_into(self, ckpt: Container, key: str, take: Callable[[tuple[int, ...], torch.dtype], Tensor]) -> Tensor:
        """`read`, where a decoder decodes into scratch memory `take(shape, dtype)` (reused from step to step: a
        fresh large tensor faults in every page again); stored tensors are memory-mapped as in `read`."""
        return self.read(ckpt, key)

    def sources(self, ckpt: Container, key: str) -> dict[str, tuple[Path, TensorInfo]]:
        """Where the stored bytes of `key` lie, per output key, for outputs that keep it unchanged (copied file to
        file)."""
        return {key: (ckpt.path(key), ckpt.info(key))}


class CastEncoder:
    """Output tensors written as plain entries, floating ones in `dtype` (None keeps each base tensor's dtype)."""

    quantized = 0
    """Weights each output stores quantized."""
    row_wise = True
    """`encode` works on any rows of a tensor (so merged weights may arrive in tiles of rows)."""

    def __init__(self, dtype: torch.dtype | None = None):
        self.dtype = dtype

    @property
    def label(self) -> str | None:
        """The output's dtype for reports (None: each base tensor's own)."""
        return None if self.dtype is None else str(self.dtype).removeprefix("torch.")

    def dtype_for(self, spec: TensorSpec) -> torch.dtype:
        """The dtype the executor hands `encode` for a tensor of this spec (the same for equal shape and dtype)."""
        return self.dtype if self.dtype is not None and spec.dtype.is_floating_point else spec.dtype

    def keeps(self, key: str, spec: TensorSpec) -> bool:
        """True when an unchanged tensor is written exactly as stored (its bytes are then copied, never loaded)."""
        return self.dtype_for(spec) == spec.dtype

    def check(self, changed: set[str]) -> None:
        """Before anything is written: refuse (or settle the encoding of) the tensors some output changes."""

    def entries(self, key: str, spec: TensorSpec) -> dict[str, int]:
        """Output keys written for `key`, with their bytes (to plan shards)."""
        return {key: spec.numel * self.dtype_for(spec).itemsize}

    def encode(self, key: str, tensor: Tensor) -> dict[str, Tensor]:
        """The output tensors of `key` from its result (here: itself)."""
        return {key: tensor}

    def survival(self, key: str, base: Tensor, merged: Tensor, encoded: dict[str, Tensor]) -> float | None:
        """The fraction of the change merged − base that the encoded tensors keep; None when not measured."""
        return None

    def encode_merged(self, key: str, merged: Tensor, base: Tensor) -> tuple[dict[str, Tensor], float | None]:
        """`encode` of a whole merged weight and its `survival` against the stored `base` (encoders that can
        measure while they encode do both in one pass)."""
        encoded = self.encode(key, merged)
        return encoded, self.survival(key, base, merged, encoded)

    def update_config(self, config: dict) -> dict:
        """config.json of the output."""
        return config if self.dtype is None else config_with_dtype(config, self.dtype)


class DequantizedEncoder(CastEncoder):
    """A quantized base's merge written unquantized in `dtype`, without `quantization_config`."""

    def keeps(self, key: str, spec: TensorSpec) -> bool:
        return not spec.encoded and super().keeps(key, spec)

    def update_config(self, config: dict) -> dict:
        return config_with_dtype({k: v for k, v in config.items() if k != "quantization_config"}, self.dtype)
