"""The data model: a `LoraModule` per base module (ΔW = scale · B @ A) and the `Adapter` that maps module paths to them."""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from .errors import NonFiniteError, RankMismatchError, ShapeMismatchError
from .names import listed

if TYPE_CHECKING:
    import os

LayerKind = Literal["linear", "embedding", "conv"]


@dataclass(repr=False)
class LoraModule:
    """One low-rank update ΔW = scale · B @ A, in the canonical (out_features, in_features) orientation.

    `A` is (r, in_features) and `B` is (out_features, r). For a convolution, `in_features` is
    in_channels·prod(kernel) and ΔW is reshaped to (out, in, *kernel); for an embedding and a
    fan_in_fan_out layer (GPT-2 Conv1D) the base weight stores ΔWᵀ. `magnitude` is DoRA's per-output-row
    magnitude m (DESIGN §6); `bias` is a LoRA bias on B, contributing scale · bias to the layer's bias.
    """

    A: Tensor
    B: Tensor
    scale: float = 1.0
    kind: LayerKind = "linear"
    fan_in_fan_out: bool = False
    kernel: tuple[int, ...] = ()
    magnitude: Tensor | None = None
    bias: Tensor | None = None

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2:
            raise ShapeMismatchError(f"LoRA factors must be 2-D, got A {tuple(self.A.shape)} and B {tuple(self.B.shape)}")
        if self.A.shape[0] != self.B.shape[1]:
            raise RankMismatchError(f"A has rank {self.A.shape[0]} but B has rank {self.B.shape[1]}")
        if self.magnitude is not None and self.magnitude.shape != (self.out_features,):
            raise ShapeMismatchError(
                f"DoRA magnitude has shape {tuple(self.magnitude.shape)}, expected ({self.out_features},)"
            )
        if self.bias is not None and self.bias.shape != (self.out_features,):
            raise ShapeMismatchError(f"LoRA bias has shape {tuple(self.bias.shape)}, expected ({self.out_features},)")

    def __repr__(self) -> str:
        dora = ", dora" if self.is_dora else ""
        return f"LoraModule({self.kind}, {self.out_features}x{self.in_features}, rank {self.rank}, scale {self.scale:g}{dora})"

    @property
    def rank(self) -> int:
        """r, the inner dimension of B @ A."""
        return self.A.shape[0]

    @property
    def out_features(self) -> int:
        return self.B.shape[0]

    @property
    def in_features(self) -> int:
        return self.A.shape[1]

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    @property
    def num_params(self) -> int:
        """Stored parameters: r·(in + out), plus magnitude and bias when present."""
        extra = sum(t.numel() for t in (self.magnitude, self.bias) if t is not None)
        return self.A.numel() + self.B.numel() + extra

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base weight this update is added to."""
        if self.kind == "conv":
            in_channels = self.in_features // max(1, math.prod(self.kernel))
            return (self.out_features, in_channels, *self.kernel)
        if self.kind == "embedding" or self.fan_in_fan_out:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)

    @property
    def transposed(self) -> bool:
        """True where the base weight stores ΔWᵀ (embeddings, fan_in_fan_out layers)."""
        return self.kind == "embedding" or (self.kind == "linear" and self.fan_in_fan_out)

    def to_base_layout(self, matrix: Tensor) -> Tensor:
        """Map canonical (..., out, in) matrices to the base weight's layout (transpose or reshape)."""
        if self.kind == "conv":
            return matrix.reshape(*matrix.shape[:-2], *self.weight_shape)
        return matrix.transpose(-1, -2) if self.transposed else matrix

    def from_base_layout(self, weight: Tensor) -> Tensor:
        """Map a base weight (..., *weight_shape) to the canonical (..., out, in) matrix."""
        if self.kind == "conv":
            lead = weight.shape[: weight.ndim - len(self.weight_shape)]
            return weight.reshape(*lead, self.out_features, self.in_features)
        return weight.transpose(-1, -2) if self.transposed else weight

    def base_factors(self, B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
        """(L, R) with L @ R the update B @ A on the base weight's 2-D view (first dimension by the rest
        flattened): (B, A), or (Aᵀ, Bᵀ) where the base stores ΔWᵀ."""
        return (A.T, B.T) if self.transposed else (B, A)

    def delta(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense ΔW = scale · B @ A in the base weight's layout (built only on request)."""
        dense = (self.B.to(dtype) @ self.A.to(dtype)) * self.scale
        return self.to_base_layout(dense)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LoraModule:
        """A copy with every tensor moved to `device` and/or cast to `dtype`."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return replace(self, A=move(self.A), B=move(self.B), magnitude=move(self.magnitude), bias=move(self.bias))

    def with_factors(self, B: Tensor, A: Tensor, scale: float = 1.0) -> LoraModule:
        """The same layer with new factors (rank may change); magnitude and bias are kept."""
        return replace(self, A=A, B=B, scale=scale)

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        """(role, tensor) pairs of what is stored: A, B and, when present, magnitude and bias."""
        yield "A", self.A
        yield "B", self.B
        if self.magnitude is not None:
            yield "magnitude", self.magnitude
        if self.bias is not None:
            yield "bias", self.bias


@dataclass(repr=False)
class Adapter:
    """An ordered mapping from base module path (checkpoint key without `.weight`) to `LoraModule`.

    `extra` holds full tensors keyed by their base checkpoint key (`lm_head.weight` of
    `modules_to_save`, trained biases, a stored base embedding); they replace the base's tensors on merge.
    `config` is the source format's configuration, passed through untouched where it still applies.
    """

    modules: dict[str, LoraModule]
    extra: dict[str, Tensor] = field(default_factory=dict)
    base_model: str | None = None
    config: dict = field(default_factory=dict)
    source_format: str = "peft"
    name: str | None = None

    def __repr__(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        shown = f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else (str(ranks[0]) if ranks else "-")
        return (f"Adapter({self.name or 'unnamed'}, {self.source_format}, {len(self)} modules, rank {shown}, "
                f"{self.num_params:,} parameters{', dora' if self.is_dora else ''})")

    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __getitem__(self, name: str) -> LoraModule:
        return self.modules[name]

    def __contains__(self, name: object) -> bool:
        return name in self.modules

    def items(self) -> Iterator[tuple[str, LoraModule]]:
        return iter(self.modules.items())

    @property
    def is_dora(self) -> bool:
        return any(m.is_dora for m in self.modules.values())

    @property
    def num_params(self) -> int:
        """Parameters of all LoRA modules (extra full tensors not counted)."""
        return sum(m.num_params for m in self.modules.values())

    @property
    def ranks(self) -> dict[str, int]:
        return {name: m.rank for name, m in self.modules.items()}

    def delta(self, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense ΔW of one module in the base weight's layout (built only on request)."""
        return self.modules[name].delta(dtype)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Adapter:
        """A copy with every LoRA tensor moved/cast (extra full tensors are moved, never cast)."""
        return replace(
            self,
            modules={n: m.to(device, dtype) for n, m in self.modules.items()},
            extra={k: t.to(device=device) for k, t in self.extra.items()},
        )

    def with_modules(self, modules: Mapping[str, LoraModule], **changes: object) -> Adapter:
        """A copy with other modules (and optionally other fields)."""
        return replace(self, modules=dict(modules), **changes)

    def check_finite(self, operation: str | None = None) -> None:
        """Raise NonFiniteError naming every module and tensor that holds NaN or Inf: in an input (no `operation`),
        or in the result of `operation` (its numbers overflowed)."""
        bad = [f"module {name!r} ({', '.join(roles)})" for name, module in self.modules.items()
               if (roles := [role for role, t in module.tensors() if not bool(torch.isfinite(t).all())])]
        bad += [f"tensor {key!r}" for key, t in self.extra.items()
                if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if not bad:
            return
        if operation is None:
            raise NonFiniteError(f"NaN or Inf in {listed(bad)}")
        dtypes = "/".join(dict.fromkeys(str(m.dtype).removeprefix("torch.") for m in self.modules.values()))
        raise NonFiniteError(f"the result of {operation} would hold NaN or Inf (its numbers overflow {dtypes}) in "
                             f"{listed(bad)}")

    # Exact arithmetic by concatenating factors (DESIGN §2); see adaptools.combine.
    def __add__(self, other: object) -> Adapter:
        from .combine import combine

        return combine([self, other], [1.0, 1.0]) if isinstance(other, Adapter) else NotImplemented

    def __sub__(self, other: object) -> Adapter:
        from .combine import combine

        return combine([self, other], [1.0, -1.0]) if isinstance(other, Adapter) else NotImplemented

    def __mul__(self, weight: object) -> Adapter:
        from .combine import scale

        is_number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        return scale(self, float(weight)) if is_number else NotImplemented

    __rmul__ = __mul__

    def __neg__(self) -> Adapter:
        from .combine import negate

        return negate(self)

    def save(self, path: str | os.PathLike, format: str = "peft", overwrite: bool = False) -> None:
        """Write the adapter as a PEFT folder (`format="peft"`) or a kohya safetensors file (`"kohya"`)."""
        from .formats import save_adapter

        save_adapter(self, path, format=format, overwrite=overwrite)
