"""The data model: a `LoraModule` per base module (ΔW = scale · B @ A), the `Adapter` that maps module paths to
them, and their exact algebra by concatenating factors (DESIGN §2)."""
from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import torch
from torch import Tensor

from .errors import (AdapterFormatError, DoraError, InvalidArgumentError, NonFiniteError, RankMismatchError,
                     ShapeMismatchError)
from .finite import all_finite
from .names import listed

LayerKind = Literal["linear", "embedding", "conv"]

KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_", "lycoris_")
"""Prefixes of kohya module names (`lora_unet_down_blocks_0_...`): names not yet mapped to module paths."""


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
        odd = [f"{n} {str(t.dtype).removeprefix('torch.')}" for n, t in (("A", self.A), ("B", self.B))
               if not t.is_floating_point() or t.element_size() < 2]
        if odd:
            raise AdapterFormatError(f"LoRA factors must be float16, bfloat16, float32 or float64, got {', '.join(odd)}")
        if self.A.ndim != 2 or self.B.ndim != 2:
            raise ShapeMismatchError(f"LoRA factors must be 2-D, got A {tuple(self.A.shape)} and B {tuple(self.B.shape)}")
        if self.A.shape[0] != self.B.shape[1]:
            raise RankMismatchError(f"A has rank {self.A.shape[0]} but B has rank {self.B.shape[1]}")
        if 0 in (*self.A.shape, *self.B.shape):
            raise ShapeMismatchError(f"LoRA factors must not be empty (rank ≥ 1), got A {tuple(self.A.shape)} and "
                                     f"B {tuple(self.B.shape)}")
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

    def delta_bound(self) -> float:
        """A bound on every entry of ΔW: |scale|·max_i ‖B_i‖·max_j ‖A_:,j‖ (Cauchy–Schwarz), in float64."""
        rows = torch.linalg.vector_norm(self.B.double(), dim=1).max()
        columns = torch.linalg.vector_norm(self.A.double(), dim=0).max()
        return abs(self.scale) * float(rows * columns)

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
        or in the result of `operation` (its numbers overflowed), where also a ΔW whose entries could leave the
        factors' dtype range (LoraModule.delta_bound) is refused."""
        bad = [f"module {name!r} ({', '.join(roles)})" for name, module in self.modules.items()
               if (roles := [role for role, t in module.tensors() if not all_finite(t)]
                   + ([] if math.isfinite(module.scale) else ["scale"]))]
        bad += [f"tensor {key!r}" for key, t in self.extra.items()
                if t.is_floating_point() and not all_finite(t)]
        if not bad and operation is None:
            return
        if operation is None:
            raise NonFiniteError(f"NaN or Inf in {listed(bad)}")
        if not bad:
            bad = [f"module {name!r} (ΔW)" for name, module in self.modules.items()
                   if module.delta_bound() > torch.finfo(module.dtype).max]
        if not bad:
            return
        dtypes = "/".join(dict.fromkeys(str(m.dtype).removeprefix("torch.") for m in self.modules.values()))
        raise NonFiniteError(f"the result of {operation} would hold NaN or Inf (its numbers overflow {dtypes}) in "
                             f"{listed(bad)}")

    # Exact arithmetic by concatenating factors (DESIGN §2).
    def __add__(self, other: object) -> Adapter:
        return weighted_sum([self, other], [1.0, 1.0]) if isinstance(other, Adapter) else NotImplemented

    def __sub__(self, other: object) -> Adapter:
        return weighted_sum([self, other], [1.0, -1.0]) if isinstance(other, Adapter) else NotImplemented

    def __mul__(self, weight: object) -> Adapter:
        is_number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        return weighted_sum([self], [float(weight)]) if is_number else NotImplemented

    __rmul__ = __mul__

    def __neg__(self) -> Adapter:
        return weighted_sum([self], [-1.0])

    def save(self, path: str | os.PathLike, format: str = "peft", overwrite: bool = False, layout: str = "portable",
             pad_rank: int | None = None) -> None:
        """Write the adapter in a registered format (`adaptools.save_adapter`: "peft", "kohya", "mlx", ...); PEFT
        folders in `layout` ("portable": one rank `pad_rank` for every module, or "compact")."""
        if _writer is None:
            raise InvalidArgumentError("no adapter writer is registered: import adaptools (or adaptools.formats) first")
        _writer(self, path, format, overwrite, layout, pad_rank)


class AdapterWriter(Protocol):
    """What `Adapter.save` calls: `adaptools.formats.save_adapter`, registered by that package (the data model
    does not import the formats)."""

    def __call__(self, adapter: Adapter, path: str | os.PathLike, format: str, overwrite: bool, layout: str,
                 pad_rank: int | None) -> None: ...


_writer: AdapterWriter | None = None


def register_writer(writer: AdapterWriter) -> None:
    """Make `writer` the function behind `Adapter.save`."""
    global _writer
    _writer = writer


# --- The exact algebra (DESIGN §2) --------------------------------------------------------------------------
# Per module, Σ_i w_i·s_i·B_i@A_i = [w_1·s_1·B_1 | w_2·s_2·B_2 | ...] @ [A_1; A_2; ...] with scale 1 and rank
# Σ r_i; a module present in some adapters only gets the terms of those. LoRA biases add up as Σ w_i·s_i·b_i.
#
# Full tensors (`Adapter.extra`: modules_to_save, trained biases) replace base tensors instead of adding to
# them, so a weighted sum of them is not defined without the base. They follow mergekit's `linear` merge: the
# normalised weighted average Σ w_i·T_i / Σ w_i, which is exact (equal to W + Σ w_i·(T_i − W) for any base W)
# when the weights sum to 1. It needs every input to hold the tensor and weights >= 0 with a positive sum;
# otherwise `full_tensors="drop"` leaves the base's tensors in place.

FullTensors = Literal["average", "drop"]
FULL_TENSOR_MODES: tuple[str, ...] = ("average", "drop")

# Config keys that restrict which modules PEFT targets; a combination's target set is its own.
TARGETING_KEYS = ("layers_to_transform", "layers_pattern", "exclude_modules", "target_parameters")


@dataclass(frozen=True)
class Term:
    """One adapter's contribution w·(s·B@A) to a module."""

    weight: float
    module: LoraModule


@dataclass(frozen=True)
class TermPlan:
    """Checked inputs of a weighted combination: per module (in order of first appearance) its terms,
    the result's dtype and its full tensors."""

    adapters: list[Adapter]
    terms: dict[str, list[Term]]
    dtype: torch.dtype
    extra: dict[str, Tensor]


def refuse_dora(adapter: Adapter, operation: str) -> None:
    """Raise DoraError for a DoRA adapter: its update is not the factors' product, so factor arithmetic does not apply."""
    if adapter.is_dora:
        raise DoraError(
            f"cannot {operation} a DoRA adapter{f' ({adapter.name})' if adapter.name else ''}: DoRA rescales each "
            "row of W + s·B·A by its magnitude, so its update is not defined by B and A alone; convert it first "
            "with `adaptools dora to-lora`"
        )


def has_kohya_names(adapter: Adapter) -> bool:
    """True when some module names are kohya names (`lora_unet_...`), not yet mapped to module paths."""
    return any(name.startswith(KOHYA_PREFIXES) for name in adapter.modules)


def check_weights(adapters: Sequence[Adapter], weights: Sequence[float] | None) -> list[float]:
    """The weights as floats (default 1 each), one finite number per adapter."""
    if not adapters:
        raise InvalidArgumentError("combine needs at least one adapter")
    if weights is None:
        return [1.0] * len(adapters)
    weights = list(weights)
    if len(weights) != len(adapters):
        raise InvalidArgumentError(f"got {len(weights)} weight(s) for {len(adapters)} adapter(s)")
    if not all(isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise InvalidArgumentError(f"weights must be finite numbers, got {weights}")
    return [float(w) for w in weights]


def check_names(adapters: Sequence[Adapter]) -> None:
    """Refuse a mix of unmapped kohya names and module paths: they would never meet."""
    kohya = [has_kohya_names(a) for a in adapters]
    if any(kohya) and not all(kohya):
        raise InvalidArgumentError(
            "some adapters use kohya module names and others module paths: load the kohya ones with base=... "
            "(--base) so their modules map to the base's paths"
        )


def same_layout(name: str, first: LoraModule, other: LoraModule) -> None:
    """Raise ShapeMismatchError when two adapters' modules at `name` do not update the same weight the same way."""
    fields = ("kind", "fan_in_fan_out", "kernel", "out_features", "in_features")
    for attr in fields:
        if getattr(first, attr) != getattr(other, attr):
            raise ShapeMismatchError(
                f"module {name!r} differs between adapters: {attr} {getattr(first, attr)!r} vs {getattr(other, attr)!r}"
            )


def as_conv_of(conv: LoraModule, module: LoraModule) -> LoraModule | None:
    """`module` laid out as the convolution `conv` when it is a linear update of the same (out, in·prod(kernel))
    (LoHa and LoKr store conv factors flattened, without the kernel); else None."""
    if (conv.kind == "conv" and module.kind == "linear" and not module.fan_in_fan_out
            and (conv.out_features, conv.in_features) == (module.out_features, module.in_features)):
        return replace(module, kind="conv", kernel=conv.kernel)
    return None


def plan_terms(adapters: Sequence[Adapter], weights: Sequence[float]) -> dict[str, list[Term]]:
    """Per module (in order of first appearance) the weighted terms of the adapters that hold it; layouts checked
    (conv factors stored flattened take the kernel of a convolution among the terms)."""
    plan: dict[str, list[Term]] = {}
    for adapter, weight in zip(adapters, weights):
        for name, module in adapter.items():
            terms = plan.setdefault(name, [])
            if terms:
                module = as_conv_of(terms[0].module, module) or module
                terms[:] = [replace(t, module=as_conv_of(module, t.module) or t.module) for t in terms]
                same_layout(name, terms[0].module, module)
            terms.append(Term(weight, module))
    return plan


def concat_factors(terms: Sequence[Term]) -> tuple[Tensor, Tensor]:
    """(B, A) in float32 with B @ A = Σ w·s·B_i@A_i: B = [w_1·s_1·B_1 | ...], A = [A_1; ...]."""
    if len(terms) == 1:  # nothing to concatenate (A may be the module's own tensor: callers do not change it)
        (term,) = terms
        return (term.module.B.to(torch.float32, copy=True).mul_(term.weight * term.module.scale),
                term.module.A.float())
    B = torch.cat([t.module.B.float() * (t.weight * t.module.scale) for t in terms], dim=1)
    A = torch.cat([t.module.A.float() for t in terms], dim=0)
    return B, A


def combined_bias(terms: Sequence[Term], dtype: torch.dtype) -> Tensor | None:
    """Σ w·s·b over the terms that have a LoRA bias (None when none has)."""
    parts = [t.module.bias.float() * (t.weight * t.module.scale) for t in terms if t.module.bias is not None]
    return None if not parts else torch.stack(parts).sum(0).to(dtype)


def combined_module(terms: Sequence[Term], B: Tensor, A: Tensor, dtype: torch.dtype) -> LoraModule:
    """The module of the combination with factors (B, A) at scale 1, in `dtype`."""
    return replace(terms[0].module, A=A.to(dtype), B=B.to(dtype), scale=1.0, magnitude=None,
                   bias=combined_bias(terms, dtype))


def result_dtype(adapters: Sequence[Adapter], dtype: torch.dtype | None) -> torch.dtype:
    """`dtype`, else the promotion of the inputs' factor dtypes (fp16 + bf16 → fp32)."""
    if dtype is not None:
        return dtype
    dtypes = [m.dtype for a in adapters for _, m in a.items()]
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def combine_full_tensors(adapters: Sequence[Adapter], weights: Sequence[float], mode: str) -> dict[str, Tensor]:
    """Full tensors of the combination: Σ w_i·T_i / Σ w_i for "average" (see above), none for "drop"."""
    if mode not in FULL_TENSOR_MODES:
        raise InvalidArgumentError(f"unknown full_tensors mode {mode!r} (choose {' or '.join(FULL_TENSOR_MODES)})")
    keys = list(dict.fromkeys(k for a in adapters for k in a.extra))
    if mode == "drop" or not keys:
        return {}
    hint = "pass full_tensors='drop' (--full-tensors drop) to keep the base's tensors instead"
    missing = [k for k in keys if not all(k in a.extra for a in adapters)]
    if missing:
        raise InvalidArgumentError(
            f"full tensor {missing[0]!r} (modules_to_save or a trained bias) is held by some adapters only; it replaces "
            f"the base tensor, so without the base it cannot be weighted; {hint}"
        )
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise InvalidArgumentError(
            f"the adapters hold full tensors ({', '.join(keys[:3])}); these are averaged with the weights, which needs "
            f"weights >= 0 with a positive sum (got {list(weights)}); {hint}"
        )
    total = sum(weights)
    extra = {}
    for key in keys:
        tensors = [a.extra[key] for a in adapters]
        if any(t.shape != tensors[0].shape for t in tensors):
            raise ShapeMismatchError(f"full tensor {key!r} has shapes {[tuple(t.shape) for t in tensors]} across adapters")
        if not tensors[0].is_floating_point():
            extra[key] = tensors[0]
            continue
        average = sum(t.float() * (w / total) for t, w in zip(tensors, weights))
        extra[key] = average.to(tensors[0].dtype)
    return extra


def plan_combination(adapters: Sequence[Adapter], weights: Sequence[float] | None, operation: str, *,
                     dtype: torch.dtype | None = None, full_tensors: str = "average") -> TermPlan:
    """Check the inputs of a weighted combination (weights, no DoRA, names, layouts, full tensors) and plan its terms."""
    adapters = list(adapters)
    checked = check_weights(adapters, weights)
    for adapter in adapters:
        refuse_dora(adapter, operation)
    check_names(adapters)
    terms = plan_terms(adapters, checked)
    return TermPlan(adapters, terms, result_dtype(adapters, dtype), combine_full_tensors(adapters, checked, full_tensors))


def result_adapter(adapters: Sequence[Adapter], modules: dict[str, LoraModule], extra: dict[str, Tensor]) -> Adapter:
    """The combination's Adapter: the first input's metadata, without config keys that restrict its targets;
    its format is the inputs' common format (PEFT for a mix)."""
    first = adapters[0]
    config = {k: v for k, v in first.config.items() if k not in TARGETING_KEYS}
    if not extra and "modules_to_save" in config:
        config["modules_to_save"] = None
    base_model = next((a.base_model for a in adapters if a.base_model), None)
    formats = {a.source_format for a in adapters}
    return Adapter(modules=modules, extra=extra, base_model=base_model, config=config,
                   source_format=formats.pop() if len(formats) == 1 else "peft", name=None)


def weighted_sum(adapters: Sequence[Adapter], weights: Sequence[float] | None = None, *,
                 dtype: torch.dtype | None = None, full_tensors: str = "average") -> Adapter:
    """Σ_i w_i·a_i, exact: per module B = [w_1·s_1·B_1 | ...], A = [A_1; ...], scale 1, rank Σ r_i."""
    plan = plan_combination(adapters, weights, "combine", dtype=dtype, full_tensors=full_tensors)
    modules = {name: combined_module(terms, *concat_factors(terms), plan.dtype) for name, terms in plan.terms.items()}
    result = result_adapter(plan.adapters, modules, plan.extra)
    result.check_finite("combine")
    return result
