"""Core-space merge methods (DESIGN §18): TSV-M, Iso-C, Iso-CTS, Core-Space TIES / DARE and Compress-then-Merge,
computed on the small per-task cores of the stacked LoRA factors, never on a dense ΔW.

Per module, its T tasks are the adapters that hold it (a module missing from an adapter is merged over the others;
for the sums and the entry-wise rules that equals a zero task), B̃_t = w_t·s_t·B_t and ΔW_t = B̃_t·A_t. U_B
(m × D1) and V_A (n × D2) are the singular vectors of [B̃_1 … B̃_T] and [A_1; …; A_T] with σ > 1e-6·σ_max: one
batched QR of each stack and one SVD of its R × R triangle (R = Σ r_t) per chunk of same-shape modules. The task
cores M_t = U_Bᵀ·ΔW_t·V_A (D1 × D2) come from the triangles alone; a method maps them to G, and the result
ΔW = U_B·G·V_Aᵀ is written as balanced factors from the SVD of G (rank_ε(G) of them, or a rank policy's
choice). Everything runs in float64: TIES' trim and election are discontinuous, and float32 rounding of the cores
would flip entries.

Where the core-space form differs from the full-space definition (the papers' dense code): `core_ties` and
`core_dare` trim, elect and drop entries of the cores, not of ΔW (entry-wise rules depend on the basis: these are
the Core Space paper's methods, not PEFT's ties/dare); `iso_c` averages the non-zero singular values of Σ ΔW_t
(the dense code averages all min(m, n), mostly zero, and returns a full-rank ΔW); `tsv` keeps at most rank_ε(M_t)
vectors per task (the dense code's int(D/T) beyond a task's rank picks arbitrary null vectors). Linear rules are
exact in the core space (the Core Space paper's lossless theorem): `core_dare` at density 1 is the exact sum.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .adapter import Adapter, Term, plan_combination
from .device import resolve_device
from .errors import InvalidArgumentError
from .linalg import SVD, RankPolicy, accurate_svd, group_by, lapack_threads
from .methods import Merged, assemble, chunks, merge_keys, module_generator, random_keep, stacked_factors
from .rerank import Progress, RerankReport, policy_text, require_finite, resolve_policy

CORE_METHODS: tuple[str, ...] = ("tsv", "iso_c", "iso_cts", "core_ties", "core_dare", "ctm")
NEEDS_DENSITY: tuple[str, ...] = ("core_ties", "core_dare", "ctm")

EPSILON = 1e-6
"""rank_ε(X): the number of singular values σ_i > EPSILON·σ_1 (bases, task ranks, result ranks)."""
ISO_CTS_COMMON = 0.8
"""Iso-CTS: fraction of the D directions given to the common subspace (before rounding the task shares)."""
HOOI_TOL = 1e-6
HOOI_MAX_SWEEPS = 1000
MAX_CORE_ELEMENTS = 2**23
"""Most elements of one chunk's stacked factors and task cores, Σ_j R_j·(m_j + n_j + T_j·R_j) (64 MiB in float64)."""


@dataclass(frozen=True)
class CoreOptions:
    """A core method's parameters: density ρ (core_ties, core_dare, ctm), DARE's seed, CtM's rank R and blend β."""

    density: float = 1.0
    seed: int = 0
    rank: int = 0
    beta: float = 0.0


def check_core_options(method: str, density: float | None, beta: float | None, policy: RankPolicy | str | None,
                       majority_sign: str = "total", seed: int = 0) -> tuple[CoreOptions, RankPolicy | None]:
    """The method's options and the rank policy of its output (None: rank_ε(G)); InvalidArgumentError naming the
    option that is missing or out of place."""
    if method not in CORE_METHODS:
        raise InvalidArgumentError(f"unknown core-space method {method!r} (choose from {', '.join(CORE_METHODS)})")
    if majority_sign != "total":
        raise InvalidArgumentError(f"--majority-sign applies to ties, dare_ties and knots_*, not to {method!r} "
                                   "(its election is the sign of the sum)")
    if method in NEEDS_DENSITY:
        if density is None:
            raise InvalidArgumentError(f"method {method!r} needs --density (the fraction of core entries kept, "
                                       "0 < density <= 1, e.g. 0.2)")
        if not 0 < density <= 1:
            raise InvalidArgumentError(f"--density must be in (0, 1], got {density}")
    elif density is not None:
        raise InvalidArgumentError(f"--density applies to core_ties, core_dare and ctm, not to {method!r}")
    if beta is not None and method != "ctm":
        raise InvalidArgumentError(f"--beta applies to ctm only, not to {method!r}")
    if beta is not None and not 0 <= beta <= 1:
        raise InvalidArgumentError(f"--beta must be in [0, 1], got {beta}")
    chosen = None if policy is None else resolve_policy(policy)
    options = CoreOptions(density=float(density or 1.0), seed=seed, beta=float(beta or 0.0))
    if method != "ctm":
        return options, chosen
    if chosen is None:
        raise InvalidArgumentError("method 'ctm' needs --rank R (the rank of its shared subspace and of the result)")
    if chosen.kind != "rank":
        raise InvalidArgumentError(f"method 'ctm' takes --rank R (its output rank), not --{chosen.kind}")
    return CoreOptions(density=options.density, seed=seed, rank=int(chosen.value), beta=options.beta), None


# --------------------------------------------------------------------------- small dense pieces


def rank_eps(S: Tensor) -> Tensor:
    """rank_ε per matrix from its descending singular values S (..., k): the count of σ_i > ε·σ_1 (0 for zero)."""
    if S.shape[-1] == 0:
        return torch.zeros(S.shape[:-1], dtype=torch.long, device=S.device)
    return (S > EPSILON * S[..., :1]).sum(-1)


def polar(X: Tensor) -> Tensor:
    """The orthogonal polar factor P·Qᵀ of (..., a, b) matrices, from the thin SVD X = P·Σ·Qᵀ."""
    P, _, Qh = accurate_svd(X)
    return P @ Qh


def leading_left(Y: Tensor, k: int) -> Tensor:
    """Top-k left singular vectors of (..., a, b) matrices."""
    return accurate_svd(Y)[0][..., :k]


def safe_divisor(x: Tensor) -> Tensor:
    """x with zeros replaced by 1 (so 0/0 gives 0)."""
    return torch.where(x == 0, torch.ones_like(x), x)


@dataclass(frozen=True)
class CoreSpace:
    """Bases and task cores of g same-shape modules: U_B (g, m, p), V_A (g, n, q) (columns by descending σ),
    D1, D2 (g,) their ε-ranks, and M (g, T, p, q) with M_t = U_Bᵀ·B̃_t·A_t·V_A (the used part is [:D1, :D2])."""

    UB: Tensor
    VA: Tensor
    D1: Tensor
    D2: Tensor
    M: Tensor


def core_space(Bs: Sequence[Tensor], As: Sequence[Tensor]) -> CoreSpace:
    """The core space of tasks ΔW_t = Bs[t] @ As[t] (Bs[t] (g, m, r_t) with w·s folded in, As[t] (g, r_t, n)).

    [B̃_1 … B̃_T] = Q_b R_b and [A_1; …; A_T]ᵀ = Q_a R_a (batched QR); R_b = U_b Σ_b W_bᵀ and R_a = U_a Σ_a W_aᵀ
    (SVDs of R x R triangles); U_B = Q_b U_b, V_A = Q_a U_a, and M_t = (U_bᵀ R_b)[:, t] (R_aᵀ U_a)[t, :], so no
    product of size m or n beyond the QRs and the two basis rotations.
    """
    B, A = torch.cat(list(Bs), dim=-1), torch.cat(list(As), dim=-2)
    with lapack_threads(B):
        Qb, Rb = torch.linalg.qr(B)
        Qa, Ra = torch.linalg.qr(A.mT)
    Ub, Sb, _ = accurate_svd(Rb)
    Ua, Sa, _ = accurate_svd(Ra)
    left, right = Ub.mT @ Rb, Ra.mT @ Ua
    sizes = [b.shape[-1] for b in Bs]
    M = torch.stack([lb @ ra for lb, ra in zip(left.split(sizes, -1), right.split(sizes, -2))], dim=1)
    return CoreSpace(Qb @ Ub, Qa @ Ua, rank_eps(Sb), rank_eps(Sa), M)


# --------------------------------------------------------------------------- the rules on cores (g, T, D1, D2)


def tsv_rule(M: Tensor, names: Sequence[str], options: CoreOptions) -> Tensor:
    """TSV-M: per task the top k_t = min(int(D/T), rank_ε M_t) singular triplets; G = polar(U_cat)·S_cat·polar(V_cat)ᵀ."""
    g, T, D1, D2 = M.shape
    U, S, Vh = accurate_svd(M)
    ks = rank_eps(S).clamp(max=min(D1, D2) // T)
    G = M.new_zeros(g, D1, D2)
    for key, rows in group_by({i: tuple(row) for i, row in enumerate(ks.tolist())}).items():
        if sum(key) == 0:
            continue
        idx = torch.tensor(rows, device=M.device)
        u = torch.cat([U[idx, t, :, :k] for t, k in enumerate(key)], dim=-1)
        s = torch.cat([S[idx, t, :k] for t, k in enumerate(key)], dim=-1)
        v = torch.cat([Vh[idx, t, :k, :].mT for t, k in enumerate(key)], dim=-1)
        G[idx] = (polar(u) * s.unsqueeze(-2)) @ polar(v).mT
    return G


def iso_c_rule(M: Tensor, names: Sequence[str], options: CoreOptions) -> Tensor:
    """Iso-C: Σ_t M_t = P·diag(σ)·Qᵀ with q = rank_ε; G = mean(σ_1..σ_q)·P_q·Q_qᵀ."""
    P, S, Qh = accurate_svd(M.sum(1))
    q = rank_eps(S)
    keep = (torch.arange(S.shape[-1], device=S.device) < q.unsqueeze(-1)).to(S.dtype)
    mean = (S * keep).sum(-1) / q.clamp_min(1)
    return mean.view(-1, 1, 1) * (P * keep.unsqueeze(-2)) @ Qh


def iso_cts_shares(D: int, T: int) -> tuple[int, int]:
    """(c, n): common directions and directions per task of Iso-CTS for D = min(D1, D2) and T tasks."""
    common = int(ISO_CTS_COMMON * D)
    total = round((D - common) / T) * T
    return D - total, total // T


def iso_cts_rule(M: Tensor, names: Sequence[str], options: CoreOptions) -> Tensor:
    """Iso-CTS: the top-c triplets of Σ M_t and the top-n of each M_t − P_c P_cᵀ M_t, both sides made orthogonal by
    polar factors; G = σ̄·U*·V*ᵀ with σ̄ the mean of those D singular values."""
    g, T, D1, D2 = M.shape
    c, n = iso_cts_shares(min(D1, D2), T)
    P, S, Qh = accurate_svd(M.sum(1))
    Pc, Qc = P[..., :c], Qh[..., :c, :].mT
    us, vs, values = [], [], [S[..., :c]]
    if n:
        residual = M - Pc.unsqueeze(1) @ (Pc.mT.unsqueeze(1) @ M)
        p, rho, qh = accurate_svd(residual)
        us, vs = [p[:, t, :, :n] for t in range(T)], [qh[:, t, :n, :].mT for t in range(T)]
        values += [rho[:, t, :n] for t in range(T)]
    mean = torch.cat(values, dim=-1).mean(-1)
    return mean.view(-1, 1, 1) * polar(torch.cat([*us, Pc], dim=-1)) @ polar(torch.cat([*vs, Qc], dim=-1)).mT


def ties_rule(M: Tensor, names: Sequence[str], options: CoreOptions) -> Tensor:
    """Core TIES: trim each M_t to |x| >= its (d − int(d·ρ))-th smallest |x| (d = D1·D2), elect γ = sign Σ_t
    (zeros: the sign of Σ γ), and take the mean of the trimmed entries agreeing with γ."""
    d = M.shape[-2] * M.shape[-1]
    k = d - int(d * options.density)
    if k > 0:
        flat = M.abs().flatten(-2)
        threshold = torch.kthvalue(flat, k, dim=-1, keepdim=True).values
        M = M * (flat >= threshold).view(M.shape)
    gamma = M.sum(1).sign()
    majority = gamma.sum((-2, -1), keepdim=True).sign()
    gamma = torch.where(gamma == 0, majority, gamma)
    agree = M.sign() == gamma.unsqueeze(1)
    return (M * agree).sum(1) / agree.sum(1).clamp_min(1)


def dare_rule(M: Tensor, names: Sequence[str], options: CoreOptions) -> Tensor:
    """Core DARE: G = Σ_t (m_t ⊙ M_t)/ρ with Bernoulli(ρ) masks from `module_generator(seed, module)`."""
    keep = torch.stack([random_keep(M.shape[1:], options.density, module_generator(options.seed, n)) for n in names])
    return (M * keep.to(M.device)).sum(1) / options.density


def hooi(X: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Modes 0 and 1 of a partial Tucker decomposition of X (g, D1, D2, T) by HOOI, as tensorly 0.9's
    `partial_tucker` (SVD start, U0 then U1 per sweep, stop after sweep index > 1 when the relative error moves
    by < HOOI_TOL); each of the g problems stops on its own. Returns U0 (g, D1, R), U1 (g, D2, R)."""
    def unfold0(Y: Tensor) -> Tensor:
        return Y.flatten(2)

    def unfold1(Y: Tensor) -> Tensor:
        return Y.transpose(1, 2).flatten(2)

    U0, U1 = leading_left(unfold0(X), rank), leading_left(unfold1(X), rank)
    norm2 = X.square().sum((1, 2, 3))
    norm = safe_divisor(norm2.sqrt())
    active = torch.ones(X.shape[0], dtype=torch.bool, device=X.device)
    previous = None
    for sweep in range(HOOI_MAX_SWEEPS):
        new0 = leading_left(unfold0(torch.einsum("gijt,gjr->girt", X, U1)), rank)
        new1 = leading_left(unfold1(torch.einsum("gijt,gir->grjt", X, new0)), rank)
        U0 = torch.where(active.view(-1, 1, 1), new0, U0)
        U1 = torch.where(active.view(-1, 1, 1), new1, U1)
        core = torch.einsum("gijt,gir,gjs->grst", X, U0, U1)
        error = (norm2 - core.square().sum((1, 2, 3))).abs().sqrt() / norm
        if sweep > 1:
            active &= (previous - error).abs() >= HOOI_TOL
            if not bool(active.any()):
                break
        previous = error
    return U0, U1


def ctm_rule(M: Tensor, names: Sequence[str], options: CoreOptions) -> Tensor:
    """Compress-then-Merge: X_t = M_t/‖M_t‖·(β‖M_t‖ + (1−β)·mean_s ‖M_s‖); HOOI of X (modes 0, 1, rank R) gives
    U0, U1; C_t = U0ᵀ M_t U1; G = U0·ties(C)·U1ᵀ (rank <= R)."""
    rank = min(options.rank, M.shape[-2], M.shape[-1])
    norms = torch.linalg.matrix_norm(M)
    target = options.beta * norms + (1 - options.beta) * norms.mean(1, keepdim=True)
    X = (M * (target / safe_divisor(norms)).unsqueeze(-1).unsqueeze(-1)).permute(0, 2, 3, 1)
    U0, U1 = hooi(X, rank)
    C = U0.mT.unsqueeze(1) @ M @ U1.unsqueeze(1)
    return U0 @ ties_rule(C, names, options) @ U1.mT


Rule = Callable[[Tensor, Sequence[str], CoreOptions], Tensor]
RULES: dict[str, Rule] = {"tsv": tsv_rule, "iso_c": iso_c_rule, "iso_cts": iso_cts_rule, "core_ties": ties_rule,
                          "core_dare": dare_rule, "ctm": ctm_rule}


# --------------------------------------------------------------------------- adapters


def _result(U: Tensor, S: Tensor, Vh: Tensor, rank: int, store: torch.dtype) -> Merged:
    """A module's merged update from the SVD of U_B·G·V_Aᵀ: rank_ε(G) values kept (at least one), the rest reported."""
    k = max(1, int(rank_eps(S)))
    residual = float(S[k:].double().square().sum().sqrt())
    norm = float(S.double().norm())
    svd = SVD(U[:, :k].to("cpu", store), S[:k].to("cpu", store), Vh[:k].to("cpu", store))
    return Merged(svd, residual, norm, rank)


def _merge_chunk(plan: Mapping[str, list[Term]], names: list[str], method: str, options: CoreOptions,
                 device: torch.device, store: torch.dtype) -> dict[str, Merged]:
    """Merge one chunk of modules with equal shapes, term ranks and weights (float64 on `device`)."""
    terms = plan[names[0]]
    Bs, As = stacked_factors(plan, names, device, torch.float64)
    Bs = [B * t.weight for B, t in zip(Bs, terms)]
    require_finite(names, "the scaled factors", *Bs, *As)
    space = core_space(Bs, As)
    rank = sum(t.module.rank for t in terms)
    m, n = terms[0].module.out_features, terms[0].module.in_features
    results = {}
    dims = {i: (int(d1), int(d2)) for i, (d1, d2) in enumerate(zip(space.D1.tolist(), space.D2.tolist()))}
    for (d1, d2), rows in group_by(dims).items():
        sub = [names[i] for i in rows]
        if d1 == 0 or d2 == 0:  # every task's update is zero
            zero = SVD(torch.zeros(m, 1, dtype=store), torch.zeros(1, dtype=store), torch.zeros(1, n, dtype=store))
            results.update({name: Merged(zero, 0.0, 0.0, rank) for name in sub})
            continue
        idx = torch.tensor(rows, device=device)
        G = RULES[method](space.M[idx][:, :, :d1, :d2], sub, options)
        require_finite(sub, f"the {method} merge", G)
        P, S, Qh = accurate_svd(G)
        U = space.UB[idx][..., :d1] @ P
        Vh = Qh @ space.VA[idx][..., :d2].mT
        results.update({name: _result(U[j], S[j], Vh[j], rank, store) for j, name in enumerate(sub)})
    return results


def core_merge(adapters: Sequence[Adapter], weights: Sequence[float] | None = None, method: str = "tsv", *,
               density: float | None = None, seed: int = 0, beta: float | None = None,
               policy: RankPolicy | str | None = None, majority_sign: str = "total", dtype: torch.dtype | None = None,
               full_tensors: str = "average", device: str | torch.device = "auto",
               max_elements: int = MAX_CORE_ELEMENTS, progress: Progress | None = None) -> tuple[Adapter, RerankReport]:
    """Merge adapters by a core-space method (module doc; definitions in DESIGN §18), as LoRA of rank <= Σ r_t.

    Args:
        adapters, weights: as for `combine` (weights default 1; w_t·s_t goes into B̃_t).
        method: one of CORE_METHODS.
        density: ρ of core_ties / core_dare / ctm (required there, refused elsewhere). seed: core_dare's masks.
        beta: ctm's norm blend β (default 0). policy: ctm's rank R ("rank=R", required); for the others the rank
            policy applied last to G (None keeps rank_ε(G)).
        dtype, full_tensors: as for `combine`. device: where the QRs and the core work run.
        max_elements: bound on one chunk's stacked factors. progress: called with the modules done per chunk.

    Returns:
        (merged adapter at scale 1 with balanced factors, RerankReport: per module Σ r_t, kept rank, ‖ΔW‖_F of the
        merged update and the error of the kept rank).

    Raises:
        InvalidArgumentError (method, options, weights, policy), ShapeMismatchError, DoraError, NonFiniteError.
    """
    options, chosen = check_core_options(method, density, beta, policy, majority_sign, seed)
    planned = plan_combination(adapters, weights, f"merge ({method})", dtype=dtype, full_tensors=full_tensors)
    keys = merge_keys(planned.terms)
    sizes = {name: sum(ranks) * (m + n + len(ranks) * sum(ranks)) for name, (m, n, ranks, _) in keys.items()}
    float64 = any(m.dtype == torch.float64 for a in planned.adapters for _, m in a.items())
    store = torch.float64 if float64 else torch.float32
    dev = resolve_device(device)
    results: dict[str, Merged] = {}
    for names in chunks(keys, sizes, max_elements):
        results.update(_merge_chunk(planned.terms, names, method, options, dev, store))
        if progress is not None:
            progress(len(names))
    label = f"rank={options.rank}" if method == "ctm" else "rank=nonzero" if chosen is None else policy_text(chosen)
    return assemble(planned, results, chosen, f"{method}, {label}")


__all__ = [
    "CORE_METHODS",
    "NEEDS_DENSITY",
    "CoreOptions",
    "CoreSpace",
    "check_core_options",
    "core_space",
    "core_merge",
    "rank_eps",
    "polar",
    "hooi",
    "iso_cts_shares",
    "RULES",
]
