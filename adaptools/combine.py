"""Weighted combinations of adapters: the exact sum (the data model's algebra, DESIGN §2), optionally re-ranked
one chunk at a time, a merge method of `adaptools.methods` (TIES, DARE, KnOTS) or of `adaptools.core_space`
(TSV-M, Iso-C, Iso-CTS, core TIES/DARE, Compress-then-Merge), each optionally Pico-calibrated
(`adaptools.pico`), and the shorthands interpolate, negate and scale. Full tensors follow
`adaptools.adapter.combine_full_tensors`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Literal, overload

import torch

from .adapter import (
    FULL_TENSOR_MODES,
    Adapter,
    FullTensors,
    Term,
    combined_module,
    concat_factors,
    plan_combination,
    result_adapter,
    result_dtype,
    weighted_sum,
)
from .core_space import CORE_METHODS, check_core_options, core_merge
from .errors import InvalidArgumentError
from .linalg import RankPolicy
from .methods import METHODS, check_options, merge_with_method
from .pico import check_calibration, pico_calibrate, pico_rescale
from .rerank import FactorStack, Progress, RerankReport, policy_text, resolve_policy, stack_chunks, truncate_stacks


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
            density: float | None = ..., majority_sign: str = ..., seed: int = ..., beta: float | None = ...,
            calibrate: str | None = ..., policy: RankPolicy | str | None = ...,
            dtype: torch.dtype | None = ..., full_tensors: FullTensors = ..., device: str | torch.device = ...,
            progress: Progress | None = ...) -> tuple[Adapter, RerankReport]: ...


ALL_METHODS: tuple[str, ...] = METHODS + CORE_METHODS


def check_method(method: str, density: float | None, majority_sign: str, beta: float | None, calibrate: str | None,
                 policy: RankPolicy | str | None, seed: int) -> None:
    """InvalidArgumentError for an unknown method or calibration, or options the method does not take or needs."""
    if method not in ALL_METHODS:
        raise InvalidArgumentError(f"unknown merge method {method!r} (choose from {', '.join(ALL_METHODS)})")
    check_calibration(calibrate)
    if method in CORE_METHODS:
        check_core_options(method, density, beta, policy, majority_sign, seed)
        return
    if beta is not None:
        raise InvalidArgumentError(f"--beta applies to ctm only, not to {method!r}")
    check_options(method, density, majority_sign)


def combine(adapters, weights=None, *, method="sum", density=None, majority_sign="total", seed=0, beta=None,
            calibrate=None, policy=None, dtype=None, full_tensors="average", device="auto", progress=None):
    """Σ_i w_i·a_i, exact: per module B = [w_1·s_1·B_1 | w_2·s_2·B_2 | ...], A = [A_1; A_2; ...], scale 1, rank Σ r_i.

    Args:
        adapters: LoRA adapters over the same base (any mix of ranks, alphas, rsLoRA, patterns, target sets).
        weights: one number per adapter (default 1 each); negative weights subtract.
        method: "sum" (this exact sum), or "ties", "dare_linear", "dare_ties", "magnitude_prune", "knots_ties",
            "knots_dare" with density, majority_sign ("total"/"frequency") and seed: see `adaptools.methods`
            (a dense merge per module refactored to rank Σ r_i or `policy`); or the core-space methods "tsv",
            "iso_c", "iso_cts", "core_ties", "core_dare" (density, seed), "ctm" (policy "rank=R", density, beta):
            see `adaptools.core_space`. Methods other than "sum" always return a report.
        calibrate: "pico" calibrates the inputs' B factors before the method and rescales its result
            (`adaptools.pico`); None does not.
        policy: a RankPolicy or "kind=value" spec (e.g. "rank=16", "energy=0.99"): re-rank the result,
            one chunk of same-shape modules at a time (the exact, rank-Σr adapter is never held whole).
        dtype: dtype of the result (default: the inputs' promoted dtype); the arithmetic runs in float32.
        full_tensors: "average" or "drop" for `extra` full tensors (see the module doc).
        device: where re-rank SVDs run. progress: called with a count of modules done (re-rank only).

    Returns:
        The combined Adapter, or (Adapter, RerankReport) when a policy or a method other than "sum" is given.

    Raises:
        InvalidArgumentError (method, its options, weights, full tensors, policy), ShapeMismatchError (a module's
        layout differs between adapters), DoraError (a DoRA input: a sum of DoRA adapters is not defined by their
        factors).
    """
    check_method(method, density, majority_sign, beta, calibrate, policy, seed)
    targets = None
    if calibrate is not None:
        dtype = result_dtype(list(adapters), dtype)
        calibration = pico_calibrate(adapters, weights, device=device)
        adapters, targets = calibration.adapters, calibration.targets
    result = _combine(adapters, weights, method=method, density=density, majority_sign=majority_sign, seed=seed,
                      beta=beta, policy=policy, dtype=dtype, full_tensors=full_tensors, device=device,
                      progress=progress)
    if targets is None:
        return result
    if isinstance(result, Adapter):
        return pico_rescale(result, None, targets)[0]
    return pico_rescale(*result, targets)


def _combine(adapters, weights, *, method, density, majority_sign, seed, beta, policy, dtype, full_tensors, device,
             progress):
    """`combine` without the calibration."""
    if method in CORE_METHODS:
        result = core_merge(adapters, weights, method, density=density, seed=seed, beta=beta, policy=policy,
                            majority_sign=majority_sign, dtype=dtype, full_tensors=full_tensors, device=device,
                            progress=progress)
        result[0].check_finite(f"combine ({method})")
        return result
    if method != "sum":
        result = merge_with_method(adapters, weights, method, density=density, majority_sign=majority_sign, seed=seed,
                                   policy=policy, dtype=dtype, full_tensors=full_tensors, device=device,
                                   progress=progress)
        result[0].check_finite(f"combine ({method})")
        return result
    if policy is None:
        return weighted_sum(adapters, weights, dtype=dtype, full_tensors=full_tensors)
    chosen = resolve_policy(policy)
    plan = plan_combination(adapters, weights, "combine", dtype=dtype, full_tensors=full_tensors)
    results = truncate_stacks(combined_stacks(plan.terms), chosen, device=device, progress=progress)
    modules = {name: combined_module(terms, *results[name][:2], plan.dtype) for name, terms in plan.terms.items()}
    report = RerankReport(policy_text(chosen), {name: results[name][2] for name in plan.terms})
    result = result_adapter(plan.adapters, modules, plan.extra)
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


__all__ = ["combine", "interpolate", "negate", "scale", "FULL_TENSOR_MODES", "ALL_METHODS"]
