"""Merge methods beyond a weighted sum: TIES, DARE, magnitude pruning and KnOTS, on the updates ΔW_i.

Task vectors are the modules' updates τ_i = ΔW_i = s_i·B_i@A_i (canonical (out, in) orientation). Weights
follow mergekit's generalized task arithmetic (`ties`, `dare_ties`, `dare_linear`), in four steps per
module:
  1. sparsify each τ_i: TIES trim ("magnitude") keeps the entries with |τ| >= the k-th largest |τ| of
     that matrix, k = max(1, ⌊density·m·n⌋) (per module and task, as mergekit and PEFT do; the TIES
     paper trims the whole model's vector at once); DARE ("random") keeps each entry with probability
     `density` and rescales the kept ones by 1/density;
  2. weight: τ'_i = w_i·sparsify(τ_i);
  3. with a sign election, the majority sign per entry is sign(Σ_i τ'_i) ("total", mergekit's "sum") or
     the majority of sign(τ'_i) ("frequency", mergekit's "count"), ties going to +; entry i agrees
     when sign(τ'_i) equals it (zeros never agree). Merged = Σ_i agree_i·τ'_i, divided by Σ_i agree_i·w_i
     (0 → 1) when the method normalises (TIES: the disjoint mean, so weights are relative);
  4. without an election, merged = Σ_i τ'_i.
PEFT's `ties` elects on unweighted tensors and divides by the count of agreeing entries: the same as
ours when every weight is 1 (at equal weights w, PEFT's result is w times ours). `dare_ties` does not
normalise (mergekit); PEFT's does. `magnitude_prune` is PEFT's: trimmed task arithmetic, Σ_i w_i·trim(τ_i).

The merged ΔW is dense, so each chunk of same-shape modules holds T dense (m, n) task matrices (bounded
by `max_elements`); it is refactored to LoRA by a truncated SVD (`exact_svd_dense` up to
DENSE_EXACT_MAX_DIM, `randomized_svd` above) at rank Σ r_i (capped by min(m, n)) or a rank policy, and
the error ‖merged − B'A'‖_F is reported per module.

KnOTS (Stoica et al. 2024) never forms ΔW: the SVD of [ΔW_1 … ΔW_T] = [s_1B_1 … s_TB_T]·blockdiag(A_1 … A_T)
= U·S·[V_1ᵀ … V_Tᵀ] is a factored SVD; TIES/DARE then merge the per-task coefficient blocks C_i = S·V_iᵀ
(k x n, k <= Σ r_i) in the shared basis U, and the result U@merge(C) is refactored by a factored SVD
(`knots_dare` = DARE then the TIES election on C_i, as in the KnOTS code). KnOTS works in float64: its
matrices are small, and TIES' trim and disjoint mean are discontinuous (an entry crossing the threshold
changes its neighbours' mean), so float32 rounding of the coefficients would flip entries (measured: 3e-3
relative error against the float64 definition at 2048 x 2048, rank 16 + 16).

DARE masks come from a torch.Generator per module seeded by (seed, module name) and drawn on the CPU,
so a result depends on neither the batching nor the device.
"""
from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from .adapter import Adapter, Term, TermPlan, combined_module, plan_combination, result_adapter
from .device import resolve_device
from .bounds import check_peak
from .errors import InvalidArgumentError
from .linalg import (
    SVD,
    RankPolicy,
    balanced_factors,
    choose_ranks,
    exact_svd_dense,
    factored_svd,
    group_by,
    randomized_svd,
    select_ranks,
    truncation_error,
)
from .report import relative
from .rerank import ModuleRerank, Progress, RerankReport, policy_text, require_finite, resolve_policy

Method = Literal["sum", "ties", "dare_linear", "dare_ties", "magnitude_prune", "knots_ties", "knots_dare"]
METHODS: tuple[str, ...] = get_args(Method)
MajoritySign = Literal["total", "frequency"]
MAJORITY_SIGNS: tuple[str, ...] = get_args(MajoritySign)

MAX_DENSE_ELEMENTS = 2**25
"""Most elements of one chunk's stacked task matrices (T·G·m·n; 128 MiB in float32); peak memory is a few times this."""

DENSE_EXACT_MAX_DIM = 512
"""Largest min(m, n) refactored by an exact dense SVD; above it `randomized_svd` (same result to ~σ_{k+1}, far faster)."""


@dataclass(frozen=True)
class MethodSpec:
    """One method as mergekit's generalized task arithmetic: sparsification, sign election, normalisation."""

    sparsify: Literal["magnitude", "random"] | None
    elect: bool
    normalize: bool
    knots: bool = False


SPECS: dict[str, MethodSpec] = {
    "sum": MethodSpec(None, elect=False, normalize=False),
    "ties": MethodSpec("magnitude", elect=True, normalize=True),
    "dare_linear": MethodSpec("random", elect=False, normalize=False),
    "dare_ties": MethodSpec("random", elect=True, normalize=False),
    "magnitude_prune": MethodSpec("magnitude", elect=False, normalize=False),
    "knots_ties": MethodSpec("magnitude", elect=True, normalize=True, knots=True),
    "knots_dare": MethodSpec("random", elect=True, normalize=False, knots=True),
}


def method_spec(method: str) -> MethodSpec:
    """The MethodSpec of a method name (InvalidArgumentError for an unknown one)."""
    if method not in SPECS:
        raise InvalidArgumentError(f"unknown merge method {method!r} (choose from {', '.join(METHODS)})")
    return SPECS[method]


def check_options(method: str, density: float | None, majority_sign: str) -> float:
    """Validate a method's options; returns the density to use (1 for methods that keep everything)."""
    spec = method_spec(method)
    if majority_sign not in MAJORITY_SIGNS:
        raise InvalidArgumentError(f"unknown majority sign method {majority_sign!r} (choose {' or '.join(MAJORITY_SIGNS)})")
    if spec.sparsify is None:
        if density is not None:
            raise InvalidArgumentError(f"density applies to sparsifying methods only, not to {method!r}")
        return 1.0
    if density is None:
        raise InvalidArgumentError(f"method {method!r} needs a density (--density: the fraction of entries kept, e.g. 0.2)")
    if not 0 < density <= 1:
        raise InvalidArgumentError(f"density must be in (0, 1], got {density}")
    return float(density)


# --------------------------------------------------------------------------- elementwise steps


def magnitude_keep(tau: Tensor, density: float) -> Tensor:
    """TIES trim mask of (..., m, n) matrices: |τ| >= the k-th largest |τ| per matrix, k = max(1, ⌊density·m·n⌋)."""
    flat = tau.abs().flatten(-2)
    size = flat.shape[-1]
    k = max(1, int(density * size))
    if k >= size:
        return torch.ones_like(tau, dtype=torch.bool)
    threshold = torch.kthvalue(flat, size - k + 1, dim=-1, keepdim=True).values
    return (flat >= threshold).view(tau.shape)


def module_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, module name) by SHA-256, the same in every process."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def random_keep(shape: Sequence[int], density: float, generator: torch.Generator) -> Tensor:
    """DARE keep mask: each entry kept with probability `density` (uniform < density), drawn on the CPU."""
    return torch.rand(tuple(shape), generator=generator) < density


def elect_sign(weighted: Tensor, majority_sign: str = "total") -> Tensor:
    """Majority sign (±1) per entry of weighted task tensors (..., T, m, n): of Σ_i τ'_i, or of Σ_i sign(τ'_i)."""
    votes = weighted.sum(-3) if majority_sign == "total" else weighted.sign().sum(-3)
    return torch.where(votes >= 0, 1.0, -1.0).to(weighted.dtype)


def merge_tasks(tau: Tensor, weights: Tensor, method: str, *, density: float = 1.0, majority_sign: str = "total",
                keep: Tensor | None = None) -> Tensor:
    """Merge task tensors τ (..., T, m, n) with weights (T,) by `method`'s rules (module doc, steps 1–4) → (..., m, n).

    `keep` is the DARE keep mask (bool, τ's shape), required by the random-sparsifying methods. The
    `knots_*` methods apply their TIES/DARE rules here (to coefficient blocks).
    """
    spec = method_spec(method)
    if spec.sparsify == "magnitude" and density < 1:
        tau = tau * magnitude_keep(tau, density)
    elif spec.sparsify == "random":
        if keep is None or keep.shape != tau.shape:
            raise InvalidArgumentError(f"method {method!r} needs a keep mask of shape {tuple(tau.shape)}")
        tau = tau * keep.to(tau.device) / density
    w = weights.to(tau.device, tau.dtype).view(-1, 1, 1)
    weighted = tau * w
    if not spec.elect:
        return weighted.sum(-3)
    agree = weighted.sign() == elect_sign(weighted, majority_sign).unsqueeze(-3)
    merged = torch.where(agree, weighted, 0).sum(-3)
    if spec.normalize:
        divisor = (agree * w).sum(-3)
        merged = merged / torch.where(divisor == 0, 1, divisor)
    return merged


# --------------------------------------------------------------------------- KnOTS


def knots_basis(Bs: Sequence[Tensor], As: Sequence[Tensor], *, device: str | torch.device = "auto") -> tuple[Tensor, Tensor]:
    """Shared basis and coefficient blocks of T updates ΔW_t = B_t @ A_t (..., m, n): ΔW_t = U @ C_t, exactly.

    From the factored SVD [ΔW_1 … ΔW_T] = [B_1 … B_T]·blockdiag(A_1 … A_T) = U·S·Vh: U (..., m, k) and
    C (..., T, k, n) with C_t = S·Vh[:, t·n:(t+1)·n], k = min(m, Σ r_t, T·n). Bs[t] (..., m, r_t) with the
    scale folded in, As[t] (..., r_t, n); results on the inputs' device.
    """
    n = As[0].shape[-1]
    B = torch.cat(list(Bs), dim=-1)
    A = B.new_zeros(*B.shape[:-2], B.shape[-1], len(As) * n)
    row = 0
    for t, part in enumerate(As):
        A[..., row:row + part.shape[-2], t * n:(t + 1) * n] = part
        row += part.shape[-2]
    U, S, Vh = factored_svd(B, A, device=device)
    C = (S.unsqueeze(-1) * Vh).unflatten(-1, (len(As), n)).movedim(-2, -3)
    return U, C


# --------------------------------------------------------------------------- adapters


@dataclass(frozen=True)
class Merged:
    """One module's merged update as a truncated SVD, with what the truncation left out beyond it."""

    svd: SVD
    residual: float  # ‖merged − U S Vh‖_F (0 for KnOTS: its SVD is exact)
    norm: float      # ‖merged‖_F
    rank: int        # Σ r_i of the terms


def merge_keys(plan: Mapping[str, list[Term]]) -> dict[str, tuple]:
    """Per module the batching key (m, n, ranks of the terms, weights of the terms): equal keys stack."""
    keys = {}
    for name, terms in plan.items():
        m, n = terms[0].module.out_features, terms[0].module.in_features
        keys[name] = (m, n, tuple(t.module.rank for t in terms), tuple(t.weight for t in terms))
    return keys


def chunks(keys: Mapping[str, Hashable], sizes: Mapping[str, int], max_elements: int) -> Iterator[list[str]]:
    """Names grouped by key, in chunks whose summed sizes stay within max_elements (at least one name each)."""
    for names in group_by(keys).values():
        step = max(1, max_elements // max(1, sizes[names[0]]))
        for start in range(0, len(names), step):
            yield names[start:start + step]


def stacked_factors(plan: Mapping[str, list[Term]], names: list[str], device: torch.device,
                     dtype: torch.dtype) -> tuple[list[Tensor], list[Tensor]]:
    """Per term t: B_t·s_t (G, m, r_t) and A_t (G, r_t, n) of the chunk's modules, on device."""
    Bs, As = [], []
    for t in range(len(plan[names[0]])):
        modules = [plan[n][t].module for n in names]
        scales = torch.tensor([m.scale for m in modules], dtype=dtype).view(-1, 1, 1)
        Bs.append((torch.stack([m.B for m in modules]).to(dtype) * scales).to(device))
        As.append(torch.stack([m.A for m in modules]).to(device, dtype))
    return Bs, As


def _keep_masks(names: list[str], shape: Sequence[int], density: float, seed: int) -> Tensor:
    """DARE keep masks (G, *shape), one generator per module name."""
    return torch.stack([random_keep(shape, density, module_generator(seed, n)) for n in names])


def _dense_svd(M: Tensor, k: int, device: torch.device) -> SVD:
    """Rank-k truncated SVD of dense (G, m, n): exact up to DENSE_EXACT_MAX_DIM, else randomized."""
    if min(M.shape[-2:]) <= DENSE_EXACT_MAX_DIM:
        return exact_svd_dense(M, k, device=device)
    return randomized_svd(M, k, device=device)


def _merge_chunk(plan: Mapping[str, list[Term]], names: list[str], method: str, *, density: float,
                 majority_sign: str, seed: int, cap: int | None, device: torch.device,
                 work: torch.dtype) -> dict[str, Merged]:
    """Merge one chunk of modules with equal shapes, term ranks and weights; SVDs come back on the CPU."""
    spec = method_spec(method)
    Bs, As = stacked_factors(plan, names, device, work)
    require_finite(names, "the scaled factors", *Bs)
    weights = torch.tensor([t.weight for t in plan[names[0]]], dtype=work)
    m, n, rank = Bs[0].shape[-2], As[0].shape[-1], sum(b.shape[-1] for b in Bs)
    if spec.knots:
        U, tasks = knots_basis(Bs, As, device=device)
    else:
        tasks = torch.stack([torch.bmm(B, A) for B, A in zip(Bs, As)], dim=1)  # (G, T, m, n)
    keep = _keep_masks(names, tasks.shape[1:], density, seed) if spec.sparsify == "random" else None
    merged = merge_tasks(tasks, weights, method, density=density, majority_sign=majority_sign, keep=keep)
    del tasks, keep
    require_finite(names, f"the {method} merge", merged)
    if spec.knots:
        svd = factored_svd(U, merged, device=device)
        residual = torch.zeros(len(names), dtype=torch.float64)
        norms = svd.S.double().norm(dim=-1)
    else:
        svd = _dense_svd(merged, min(cap or rank, m, n), device)
        norms = torch.linalg.matrix_norm(merged).double()
        residual = torch.linalg.matrix_norm(torch.baddbmm(merged, svd.U * svd.S.unsqueeze(-2), svd.Vh, alpha=-1)).double()
    U, S, Vh = (x.cpu() for x in svd)
    return {name: Merged(SVD(U[j], S[j], Vh[j]), float(residual[j]), float(norms[j]), rank)
            for j, name in enumerate(names)}


def merged_ranks(results: Mapping[str, Merged], policy: RankPolicy | None) -> dict[str, int]:
    """Kept rank per module: all computed values by default, else the policy's choice.

    An energy τ is measured against the whole ‖merged‖², including what lies beyond the computed values.
    """
    if policy is None:
        return {name: r.svd.S.shape[-1] for name, r in results.items()}
    if policy.kind != "energy":
        spectra = {name: r.svd.S for name, r in results.items()}
        shapes = {name: (r.svd.U.shape[-2], r.svd.Vh.shape[-1]) for name, r in results.items()}
        return select_ranks(spectra, shapes, policy)
    ranks = {}
    for name, r in results.items():
        captured = float(r.svd.S.double().square().sum())
        share = 1.0 if captured == 0 else min(1.0, policy.value * (captured + r.residual**2) / captured)
        ranks[name] = int(choose_ranks(r.svd.S, RankPolicy("energy", share)))
    return ranks


def merged_report(result: Merged, k: int) -> ModuleRerank:
    """The module's report: error² = residual² + Σ_{i>=k} s_i² (orthogonal parts), relative to ‖merged‖_F."""
    tail = float(truncation_error(result.svd.S.double(), k)[0])
    error = (result.residual**2 + tail**2) ** 0.5
    rel = relative(error, result.norm)
    m, n = result.svd.U.shape[-2], result.svd.Vh.shape[-1]
    return ModuleRerank(old_rank=result.rank, new_rank=k, out_features=m, in_features=n, norm=result.norm,
                        error=error, rel_error=rel, retained_energy=1.0 - rel**2)


def merge_with_method(adapters: Sequence[Adapter], weights: Sequence[float] | None = None, method: str = "ties", *,
                      density: float | None = None, majority_sign: str = "total", seed: int = 0,
                      policy: RankPolicy | str | None = None, dtype: torch.dtype | None = None,
                      full_tensors: str = "average", device: str | torch.device = "auto",
                      max_elements: int = MAX_DENSE_ELEMENTS,
                      progress: Progress | None = None) -> tuple[Adapter, RerankReport]:
    """Merge adapters by TIES / DARE / magnitude pruning / KnOTS on their updates ΔW_i (module doc), as LoRA.

    Args:
        adapters, weights: as for `combine` (weights default 1 each); a module missing from an adapter is
            a zero task vector there.
        method: one of METHODS except "sum" (the exact weighted sum is `combine`'s).
        density: fraction of entries kept by the trim / DARE (0 < density <= 1); required by every method here.
        majority_sign: "total" or "frequency" (sign elections only).
        seed: DARE's seed (per module: `module_generator(seed, name)`).
        policy: rank of the result: None keeps Σ r_i (capped by min(m, n)); a RankPolicy or "kind=value"
            chooses within that cap, except a fixed `rank=k` (dense methods compute k values, up to min(m, n)).
        dtype, full_tensors: as for `combine`. device: where the merge and the SVDs run.
        max_elements: bound on one chunk's stacked dense task matrices (T·G·m·n).
        progress: called with the number of modules done after each chunk.

    Returns:
        (merged adapter at scale 1 with balanced factors, RerankReport: per module Σ r_i, kept rank,
        ‖merged‖_F and the error ‖merged − B'A'‖_F).

    Raises:
        InvalidArgumentError (method, density, weights, policy), ShapeMismatchError, DoraError.
    """
    if method == "sum":
        raise InvalidArgumentError("the weighted sum is exact: use combine(adapters, weights)")
    used_density = check_options(method, density, majority_sign)
    chosen = None if policy is None else resolve_policy(policy)
    planned = plan_combination(adapters, weights, f"merge ({method})", dtype=dtype, full_tensors=full_tensors)
    adapters, plan = planned.adapters, planned.terms
    spec = method_spec(method)
    keys = merge_keys(plan)
    sizes = {}
    for name, (m, n, ranks, _) in keys.items():
        sizes[name] = sum(ranks) * (m + 2 * len(ranks) * n) if spec.knots else len(ranks) * m * n
    check_peak(sizes, sum(a.num_params for a in adapters), f"merge ({method})")
    cap = int(chosen.value) if chosen is not None and chosen.kind == "rank" else None
    dev = resolve_device(device)
    float64 = spec.knots or any(m.dtype == torch.float64 for a in adapters for _, m in a.items())
    work = torch.float64 if float64 else torch.float32
    results: dict[str, Merged] = {}
    for names in chunks(keys, sizes, max_elements):
        results.update(_merge_chunk(plan, names, method, density=used_density, majority_sign=majority_sign,
                                    seed=seed, cap=cap, device=dev, work=work))
        if progress is not None:
            progress(len(names))
    label = "rank=sum of ranks" if chosen is None else policy_text(chosen)
    return assemble(planned, results, chosen, f"{method}, {label}")


def assemble(planned: TermPlan, results: Mapping[str, Merged], policy: RankPolicy | None,
             label: str) -> tuple[Adapter, RerankReport]:
    """The merged adapter (balanced factors at the ranks `merged_ranks` chooses) and its report under `label`."""
    ranks = merged_ranks(results, policy)
    modules, reports = {}, {}
    for name, terms in planned.terms.items():
        r = results[name]
        B, A = balanced_factors(*r.svd, ranks[name])
        modules[name] = combined_module(terms, B, A, planned.dtype)
        reports[name] = merged_report(r, ranks[name])
    return result_adapter(planned.adapters, modules, planned.extra), RerankReport(label, reports)


__all__ = [
    "METHODS",
    "MAJORITY_SIGNS",
    "MethodSpec",
    "SPECS",
    "method_spec",
    "check_options",
    "magnitude_keep",
    "module_generator",
    "random_keep",
    "elect_sign",
    "merge_tasks",
    "knots_basis",
    "merge_with_method",
    "Merged",
    "merge_keys",
    "chunks",
    "stacked_factors",
    "merged_ranks",
    "merged_report",
    "assemble",
]
