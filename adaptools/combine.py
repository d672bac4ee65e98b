"""Exact adapter arithmetic by concatenating factors (DESIGN §2): weighted sums, interpolation, negation.

Per module, Σ_i w_i·s_i·B_i@A_i = [w_1·s_1·B_1 | w_2·s_2·B_2 | ...] @ [A_1; A_2; ...] with scale 1 and
rank Σ r_i; a module present in some adapters only gets the terms of those. LoRA biases add up as
Σ w_i·s_i·b_i. Nothing is approximated unless a rank policy asks for a re-rank of the result.

Full tensors (`Adapter.extra`: modules_to_save, trained biases) replace base tensors instead of
adding to them, so a weighted sum of them is not defined without the base. They follow mergekit's
`linear` merge: the normalised weighted average Σ w_i·T_i / Σ w_i, which is exact (equal to
W + Σ w_i·(T_i − W) for any base W) when the weights sum to 1, as in `interpolate`. It needs every input
to hold the tensor and weights >= 0 with a positive sum; otherwise `full_tensors="drop"` leaves the
base's tensors in place.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal, overload

import torch
from torch import Tensor

from .adapter import Adapter, LoraModule
from .errors import InvalidArgumentError, ShapeMismatchError
from .formats.kohya import PREFIXES
from .linalg import RankPolicy
from .rerank import FactorStack, Progress, RerankReport, policy_text, refuse_dora, resolve_policy, stack_chunks, truncate_stacks

FullTensors = Literal["average", "drop"]
FULL_TENSOR_MODES: tuple[str, ...] = ("average", "drop")

# Config keys that restrict which modules PEFT targets; a combination's target set is its own.
TARGETING_KEYS = ("layers_to_transform", "layers_pattern", "exclude_modules", "target_parameters")


@dataclass(frozen=True)
class Term:
    """One adapter's contribution w·(s·B@A) to a module."""

    weight: float
    module: LoraModule


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
    kohya = [any(name.startswith(PREFIXES) for name in a.modules) for a in adapters]
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


def plan_terms(adapters: Sequence[Adapter], weights: Sequence[float]) -> dict[str, list[Term]]:
    """Per module (in order of first appearance) the weighted terms of the adapters that hold it; layouts checked."""
    plan: dict[str, list[Term]] = {}
    for adapter, weight in zip(adapters, weights):
        for name, module in adapter.items():
            terms = plan.setdefault(name, [])
            if terms:
                same_layout(name, terms[0].module, module)
            terms.append(Term(weight, module))
    return plan


def concat_factors(terms: Sequence[Term]) -> tuple[Tensor, Tensor]:
    """(B, A) in float32 with B @ A = Σ w·s·B_i@A_i: B = [w_1·s_1·B_1 | ...], A = [A_1; ...]."""
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
    """Full tensors of the combination: Σ w_i·T_i / Σ w_i for "average" (see the module doc), none for "drop"."""
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


def combined_stacks(plan: dict[str, list[Term]]) -> Callable[[], Iterator[FactorStack]]:
    """A re-iterable source of FactorStacks of the combined modules, built one chunk at a time."""
    shapes = {}
    for name, terms in plan.items():
        m = terms[0].module
        shapes[name] = (m.out_features, sum(t.module.rank for t in terms), m.in_features)

    def stacks() -> Iterator[FactorStack]:
        for names in stack_chunks(shapes):
            pairs = [concat_factors(plan[n]) for n in names]
            yield FactorStack(names, torch.stack([b for b, _ in pairs]), torch.stack([a for _, a in pairs]))

    return stacks


@overload
def combine(adapters: Sequence[Adapter], weights: Sequence[float] | None = ..., *, method: Literal["sum"] = ...,
            policy: None = ..., dtype: torch.dtype | None = ..., full_tensors: FullTensors = ...,
            device: str | torch.device = ..., progress: Progress | None = ...) -> Adapter: ...


@overload
def combine(adapters: Sequence[Adapter], weights: Sequence[float] | None = ..., *, method: Literal["sum"] = ...,
            policy: RankPolicy | str, dtype: torch.dtype | None = ..., full_tensors: FullTensors = ...,
            device: str | torch.device = ..., progress: Progress | None = ...) -> tuple[Adapter, RerankReport]: ...


@overload
def combine(adapters: Sequence[Adapter], weights: Sequence[float] | None = ..., *, method: str,
            density: float | None = ..., majority_sign: str = ..., seed: int = ..., policy: RankPolicy | str | None = ...,
            dtype: torch.dtype | None = ..., full_tensors: FullTensors = ..., device: str | torch.device = ...,
            progress: Progress | None = ...) -> tuple[Adapter, RerankReport]: ...


def combine(adapters, weights=None, *, method="sum", density=None, majority_sign="total", seed=0, policy=None,
            dtype=None, full_tensors="average", device="auto", progress=None):
    """Σ_i w_i·a_i, exact: per module B = [w_1·s_1·B_1 | w_2·s_2·B_2 | ...], A = [A_1; A_2; ...], scale 1, rank Σ r_i.

    Args:
        adapters: LoRA adapters over the same base (any mix of ranks, alphas, rsLoRA, patterns, target sets).
        weights: one number per adapter (default 1 each); negative weights subtract.
        method: "sum" (this exact sum), or "ties", "dare_linear", "dare_ties", "magnitude_prune", "knots_ties",
            "knots_dare" with density, majority_sign ("total"/"frequency") and seed: see `adaptools.methods`
            (a dense merge per module refactored to rank Σ r_i or `policy`; always returns a report).
        policy: a RankPolicy or "kind=value" spec (e.g. "rank=16", "energy=0.99"): re-rank the result,
            one chunk of same-shape modules at a time (the exact, rank-Σr adapter is never held whole).
        dtype: dtype of the result (default: the inputs' promoted dtype); the arithmetic runs in float32.
        full_tensors: "average" or "drop" for `extra` full tensors (see the module doc).
        device: where re-rank SVDs run. progress: called with a count of modules done (re-rank only).

    Returns:
        The combined Adapter, or (Adapter, RerankReport) when a policy is given.

    Raises:
        InvalidArgumentError (weights, full tensors, policy), ShapeMismatchError (a module's layout
        differs between adapters), DoraError (a DoRA input: a sum of DoRA adapters is not defined by their factors).
    """
    from .methods import check_options, merge_with_method

    check_options(method, density, majority_sign)
    if method != "sum":
        result = merge_with_method(adapters, weights, method, density=density, majority_sign=majority_sign, seed=seed,
                                   policy=policy, dtype=dtype, full_tensors=full_tensors, device=device,
                                   progress=progress)
        result[0].check_finite(f"combine ({method})")
        return result
    adapters = list(adapters)
    weights = check_weights(adapters, weights)
    chosen = None if policy is None else resolve_policy(policy)
    for adapter in adapters:
        refuse_dora(adapter, "combine")
    check_names(adapters)
    plan = plan_terms(adapters, weights)
    out = result_dtype(adapters, dtype)
    extra = combine_full_tensors(adapters, weights, full_tensors)
    if chosen is None:
        modules = {name: combined_module(terms, *concat_factors(terms), out) for name, terms in plan.items()}
        result = result_adapter(adapters, modules, extra)
        result.check_finite("combine")
        return result
    results = truncate_stacks(combined_stacks(plan), chosen, device=device, progress=progress)
    modules = {name: combined_module(terms, *results[name][:2], out) for name, terms in plan.items()}
    report = RerankReport(policy_text(chosen), {name: results[name][2] for name in plan})
    result = result_adapter(adapters, modules, extra)
    result.check_finite("combine")
    return result, report


def interpolate(a: Adapter, b: Adapter, t: float, **options) -> Adapter:
    """(1 − t)·a + t·b, exact (rank r_a + r_b); `options` as for `combine` (without a policy)."""
    return combine([a, b], [1.0 - t, t], **options)


def negate(adapter: Adapter, **options) -> Adapter:
    """−a, exact at the same rank (B → −s·B, scale 1); `options` as for `combine` (without a policy)."""
    return combine([adapter], [-1.0], **options)


def scale(adapter: Adapter, weight: float, **options) -> Adapter:
    """w·a, exact at the same rank (B → w·s·B, scale 1); `options` as for `combine` (without a policy)."""
    return combine([adapter], [weight], **options)


__all__ = ["combine", "interpolate", "negate", "scale", "FULL_TENSOR_MODES"]
