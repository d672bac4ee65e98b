"""IA3 (PEFT's multiplicative family): learned vectors that scale a layer's weight, W' = W ⊙ l; not a LoRA ΔW.

An `IA3Module` scales each output row of the weight (and the bias), or with `feedforward` each input column
(per channel for a convolution), as PEFT's IA3 layers merge. There is no arithmetic on IA3 adapters: a sum of
them is not a weight update, so they are only merged into a base (adaptools.merge).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from .errors import NonFiniteError, ShapeMismatchError, UnsupportedAdapterError
from .finite import all_finite

IA3_REFUSAL = (
    "IA3 multiplies weights by learned vectors; a sum of IA3 adapters is not a weight update, so adaptools "
    "only merges them into a base (adaptools merge)"
)


@dataclass(repr=False)
class IA3Module:
    """W' = W ⊙ l on one layer: `vector` l scales output rows (and the bias), or input columns with `feedforward`.

    `fan_in_fan_out` is PEFT's flag for layers whose weight is stored (in, out) (GPT-2's Conv1D); a convolution
    scales whole channels.
    """

    vector: Tensor
    feedforward: bool
    kind: Literal["linear", "conv"] = "linear"
    fan_in_fan_out: bool = False

    def __post_init__(self) -> None:
        if self.vector.ndim != 1:
            raise ShapeMismatchError(f"an IA3 vector must be 1-D, got shape {tuple(self.vector.shape)}")

    def __repr__(self) -> str:
        side = "input columns" if self.feedforward else "output rows"
        return f"IA3Module({self.kind}, {len(self.vector)} {side})"

    @property
    def scales_bias(self) -> bool:
        """PEFT scales the layer's bias too when the vector is on the output side."""
        return not self.feedforward

    def on_weight(self, shape: tuple[int, ...], transposed: bool) -> tuple[Tensor, bool] | None:
        """(vector, columns): the scaling of a base weight of `shape` as its 2-D view (first dimension by the rest)
        sees it, rows (columns False) or columns; None when the vector fits no side. `transposed`: a linear weight
        stored (in, out), used when both orientations fit (a square weight)."""
        n = len(self.vector)
        if self.kind == "conv":
            if len(shape) < 3:
                return None
            if not self.feedforward:
                return (self.vector, False) if shape[0] == n else None
            return (self.vector.repeat_interleave(math.prod(shape[2:])), True) if shape[1] == n else None
        if len(shape) != 2:
            return None
        # the output side is the rows of an (out, in) weight and the columns of an (in, out) one
        fits = [t for t in (transposed, not transposed) if shape[1 if t != self.feedforward else 0] == n]
        if not fits:
            return None
        return self.vector, fits[0] != self.feedforward


@dataclass(repr=False)
class IA3Adapter:
    """An ordered mapping from base module path to `IA3Module`, with PEFT's config and `modules_to_save` tensors."""

    modules: dict[str, IA3Module]
    extra: dict[str, Tensor] = field(default_factory=dict)
    base_model: str | None = None
    config: dict = field(default_factory=dict)
    source_format: str = "peft-ia3"
    name: str | None = None

    def __repr__(self) -> str:
        return f"IA3Adapter({self.name or 'unnamed'}, {len(self)} modules)"

    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __getitem__(self, name: str) -> IA3Module:
        return self.modules[name]

    def items(self) -> Iterator[tuple[str, IA3Module]]:
        return iter(self.modules.items())

    @property
    def num_params(self) -> int:
        return sum(len(m.vector) for m in self.modules.values())

    def check_finite(self) -> None:
        """Raise NonFiniteError naming the first vector or tensor that holds NaN or Inf."""
        for key, tensor in [*((f"{n}.ia3_l", m.vector) for n, m in self.items()), *self.extra.items()]:
            if tensor.is_floating_point() and not all_finite(tensor):
                raise NonFiniteError(f"tensor {key!r} holds NaN or Inf")

    def _refuse(self, *_: object) -> None:
        raise UnsupportedAdapterError(IA3_REFUSAL)

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __neg__ = _refuse
