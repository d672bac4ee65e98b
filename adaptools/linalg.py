"""Factored and randomized SVD, rank policies and truncation errors, batched over leading dimensions.

Everything here is a pure function on tensors. Matrices may carry any number of leading batch
dimensions (`...`): stack same-shape modules (see `group_by_shape` / `map_by_shape`) and every
`torch.linalg` call runs once for the whole stack. Heavy work runs on `device` ("auto" picks CUDA
when available) in float32 (float64 for float64 inputs); the small core SVDs run in float64.
Results come back on the input's device, in the dtype documented per function.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor

from .device import resolve_device, torch_threads
from .errors import InvalidArgumentError, NonFiniteError, ShapeMismatchError
from .finite import all_finite

__all__ = [
    "SVD",
    "factored_svd",
    "balanced_factors",
    "PolicyKind",
    "RankPolicy",
    "choose_ranks",
    "budget_ranks",
    "select_ranks",
    "truncation_error",
    "LinearOperator",
    "randomized_svd",
    "exact_svd_dense",
    "EXACT_SVD_MAX_DIM",
    "AUTO_EXACT_MAX_DIM",
    "SvdMethod",
    "choose_svd",
    "OVERSAMPLE",
    "power_iterations",
    "adaptive_svd",
    "group_by",
    "group_by_shape",
    "map_by_shape",
]


class SVD(NamedTuple):
    """Thin SVD `M = U @ diag(S) @ Vh` of a (..., m, n) matrix, truncated to k columns.

    U (..., m, k) with orthonormal columns, S (..., k) non-negative and descending, Vh (..., k, n)
    with orthonormal rows.
    """

    U: Tensor
    S: Tensor
    Vh: Tensor


# --------------------------------------------------------------------------- factored SVD


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_finite(name: str, t: Tensor) -> None:
    if not all_finite(t):
        raise NonFiniteError(f"{name} holds NaN or Inf; cannot take its SVD")


def lapack_threads(M: Tensor):
    """The block's threads for a LAPACK factorisation (QR, SVD) of M: one on the CPU, where MKL's threaded QR and
    SVD run 7-17x slower than one thread when other processes share the cores (measured on 2 busy cores)."""
    return torch_threads(None if M.is_cuda else 1)


def accurate_svd(M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD M = U·diag(S)·Vh; on CUDA with the QR-based `gesvd` driver (the default `gesvdj` is ~1e-4 off in fp32).

    The one dense SVD of the package, called only on bounded inputs: the r × r core of `factored_svd`, the
    small dense ΔW of `exact_svd_dense` (min(m, n) <= EXACT_SVD_MAX_DIM), the full Kronecker factors of a
    LyCORIS LoKr (`lycoris_math.svd_factors`: the two factors' sizes multiply to the layer's, so each is small), and
    in `core_space`/`pico` only the Σr × Σr triangles of the stacked factors' QRs and the cores and bases built
    from them (every side at most the total rank Σr of a module, which `adaptools.bounds` caps per file).
    """
    driver = "gesvd" if M.is_cuda else None
    with lapack_threads(M):
        return torch.linalg.svd(M, full_matrices=False, driver=driver)


def factored_svd(B: Tensor, A: Tensor, *, device: str | torch.device = "auto",
                 dtype: torch.dtype | None = None) -> SVD:
    """Exact thin SVD of ΔW = B @ A without forming ΔW: B = Q_b R_b, Aᵀ = Q_a R_a, R_b R_aᵀ = U S Vᵀ.

    Then ΔW = (Q_b U) S (Q_a V)ᵀ. Cost O((m+n)·r² + r³) instead of O(m·n·min(m, n)).

    Args:
        B: (..., m, r); A: (..., r, n), with the same leading (batch) dimensions.
        device: where to compute ("auto", "cpu", "cuda", ...).
        dtype: dtype of the results; None means the inputs' promoted dtype. Pass torch.float32 to
            choose ranks from S of half-precision adapters without rounding it to 8 mantissa bits.

    Returns:
        SVD(U (..., m, k), S (..., k), Vh (..., k, n)) with k = min(m, n, r), on B's device.
        The QRs run in float32 (float64 for float64 inputs), the k x k core SVD in float64.
        Rank-deficient inputs give exact zeros at the end of S (U, Vh stay orthonormal).

    Raises:
        ShapeMismatchError: inner sizes or batch dimensions disagree, or an input is not a matrix.
        NonFiniteError: B or A holds NaN or Inf.
    """
    if B.ndim < 2 or A.ndim < 2:
        raise ShapeMismatchError(f"factored_svd needs matrices, got B {tuple(B.shape)} and A {tuple(A.shape)}")
    if B.shape[-1] != A.shape[-2] or B.shape[:-2] != A.shape[:-2]:
        raise ShapeMismatchError(
            f"B {tuple(B.shape)} and A {tuple(A.shape)} do not form B @ A (need (..., m, r) and (..., r, n))")
    _check_finite("B", B)
    _check_finite("A", A)
    out_device = B.device
    out_dtype = dtype or torch.promote_types(B.dtype, A.dtype)
    work = _compute_dtype(B, A)
    dev = resolve_device(device)
    B, A = B.to(dev, work), A.to(dev, work)
    with lapack_threads(B):
        Qb, Rb = torch.linalg.qr(B)                    # (..., m, p), (..., p, r), p = min(m, r)
        Qa, Ra = torch.linalg.qr(A.mT)                 # (..., n, q), (..., q, r), q = min(n, r)
    core = Rb.double() @ Ra.double().mT                # (..., p, q)
    Uc, S, Vhc = accurate_svd(core)
    U = Qb @ Uc.to(work)                               # (..., m, k)
    Vh = Vhc.to(work) @ Qa.mT                          # (..., k, n)
    return SVD(U.to(out_device, out_dtype), S.to(out_device, out_dtype), Vh.to(out_device, out_dtype))


def balanced_factors(U: Tensor, S: Tensor, Vh: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Rank-k factors with the singular values split evenly: B' = U_k √S_k, A' = √S_k Vh_k.

    B' @ A' is the best rank-k approximation (Eckart–Young) of U diag(S) Vh.

    Args:
        U (..., m, r), S (..., r), Vh (..., r, n): a (thin) SVD, e.g. from `factored_svd`.
        k: the rank to keep, 1 <= k <= r; one k for the whole batch (for per-module ranks, index
            the batch first: `balanced_factors(U[i], S[i], Vh[i], int(ks[i]))`).

    Returns:
        (B' (..., m, k), A' (..., k, n)) in U's dtype and device.
    """
    r = S.shape[-1]
    if not 1 <= int(k) <= r:
        raise InvalidArgumentError(f"rank {k} is out of range [1, {r}]")
    root = S[..., :k].clamp_min(0).sqrt()
    return U[..., :, :k] * root.unsqueeze(-2), root.unsqueeze(-1) * Vh[..., :k, :]


# --------------------------------------------------------------------------- rank policies

PolicyKind = Literal["rank", "energy", "ratio", "threshold", "budget"]
_KINDS: tuple[str, ...] = get_args(PolicyKind)


@dataclass(frozen=True)
class RankPolicy:
    """How many singular values to keep (s_0 >= s_1 >= ... >= 0, r of them, 1 <= k <= r always).

    kind / value:
        rank k        keep min(k, r) (k integer >= 1).
        energy τ      smallest k with Σ_{i<k} s_i² >= τ·Σ_i s_i², 0 < τ <= 1 (PEFT `convert_to_lora`'s
                      convention; kohya's `sv_fro` p is energy p²). Evaluated as the equivalent tail
                      test Σ_{i>=k} s_i² <= (1-τ)·Σ_i s_i² in float64, so τ = 1 keeps exactly the
                      nonzero singular values (no round-off), i.e. relative error² <= 1-τ.
        ratio ρ       keep s_i >= s_0/ρ (and s_i > 0), ρ >= 1.
        threshold t   keep s_i >= t, t > 0.
        budget N      global: total parameters Σ_j k_j·(m_j + n_j) <= N over all modules, see
                      `budget_ranks` (N integer >= 1).
    A result of 0 (all-zero spectrum, or nothing above the threshold) is raised to 1.
    """

    kind: PolicyKind
    value: float

    def __post_init__(self) -> None:
        kind, v = self.kind, self.value
        if kind not in _KINDS:
            raise InvalidArgumentError(f"unknown rank policy {kind!r} (choose from {', '.join(_KINDS)})")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise InvalidArgumentError(f"{kind} needs a finite number, got {v!r}")
        if kind in ("rank", "budget") and (v < 1 or v != int(v)):
            raise InvalidArgumentError(f"{kind} must be an integer >= 1, got {v}")
        if kind == "energy" and not 0 < v <= 1:
            raise InvalidArgumentError(f"energy must be in (0, 1], got {v}")
        if kind == "ratio" and v < 1:
            raise InvalidArgumentError(f"ratio must be >= 1, got {v}")
        if kind == "threshold" and v <= 0:
            raise InvalidArgumentError(f"threshold must be > 0, got {v}")

    @classmethod
    def parse(cls, spec: str) -> RankPolicy:
        """Read `KIND=VALUE` (e.g. `energy=0.99`, `budget=2e6`) or a bare integer (fixed rank)."""
        kind, sep, value = spec.strip().partition("=")
        if not sep:
            kind, value = "rank", spec
        try:
            number = float(value)
        except ValueError:
            raise InvalidArgumentError(f"bad rank policy {spec!r}: expected KIND=NUMBER or an integer") from None
        return cls(kind.strip().lower(), number)  # type: ignore[arg-type]

    @classmethod
    def from_options(cls, **options: float | None) -> RankPolicy:
        """The one policy among CLI options such as `rank=8, energy=None, ...` that is not None."""
        given = {k: v for k, v in options.items() if v is not None}
        if len(given) != 1:
            names = ", ".join(f"--{k}" for k in options) or "a rank policy option"
            raise InvalidArgumentError(f"give exactly one of {names} (got {len(given)})")
        ((kind, value),) = given.items()
        return cls(kind, float(value))  # type: ignore[arg-type]


def _check_spectrum(S: Tensor) -> None:
    if S.ndim < 1 or S.shape[-1] < 1:
        raise ShapeMismatchError(f"a spectrum needs at least one singular value, got shape {tuple(S.shape)}")
    if not bool(torch.isfinite(S).all()) or bool((S < 0).any()) or bool((S[..., 1:] > S[..., :-1]).any()):
        raise InvalidArgumentError("singular values must be finite, non-negative and descending")


def _tail_energy(S: Tensor, total: Tensor | None = None) -> Tensor:
    """tail[..., k] = Σ_{i>=k} s_i² in float64, for k = 0..r (shape (..., r+1)); with `total` (...), the exact
    Σ over the whole spectrum of which S is the leading part: tail[..., k] = total − Σ_{i<k} s_i² (>= 0)."""
    sq = S.double().square()
    if total is not None:
        head = torch.nn.functional.pad(sq.cumsum(-1), (1, 0))
        return (total.to(head).unsqueeze(-1) - head).clamp_min(0)
    tail = sq.flip(-1).cumsum(-1).flip(-1)
    return torch.cat([tail, torch.zeros_like(tail[..., :1])], dim=-1)


def choose_ranks(S: Tensor, policy: RankPolicy, total: Tensor | None = None) -> Tensor:
    """Rank per module from its singular values S (..., r) (descending) under a per-module policy.

    Returns a LongTensor (...) with values in [1, r]; see `RankPolicy` for the exact rules. The
    global `budget` policy needs shapes: use `budget_ranks` or `select_ranks`. `total` (...) is the
    exact Σ_i s_i² = ‖ΔW‖²_F when S is only the leading part of the spectrum (a sketch): the energy
    rule then tests total − Σ_{i<k} s_i² <= (1−τ)·total, and r means "not within these r values".
    """
    _check_spectrum(S)
    r = S.shape[-1]
    kind, v = policy.kind, policy.value
    s = S.double()
    if kind == "rank":
        k = torch.full(S.shape[:-1], min(int(v), r), dtype=torch.long, device=S.device)
    elif kind == "energy":
        tail = _tail_energy(S, total)
        # tail is non-increasing in k, so the count of k in 0..r failing the test is the smallest passing k
        k = (tail > (1.0 - v) * tail[..., :1]).sum(-1)
    elif kind == "ratio":
        k = ((s >= s[..., :1] / v) & (s > 0)).sum(-1)
    elif kind == "threshold":
        k = (s >= v).sum(-1)
    else:
        raise InvalidArgumentError("the budget policy is global over modules: use budget_ranks / select_ranks")
    return k.clamp(1, r).long()


def budget_ranks(spectra: Sequence[Tensor], shapes: Sequence[tuple[int, int]], budget: int) -> list[int]:
    """Global ranks under a parameter budget: keep the largest s_i² per parameter spent.

    Module j (ΔW_j of shape (m_j, n_j), singular values s_j descending) costs c_j = m_j + n_j
    parameters per kept singular value. Rule:
      1. every module keeps rank 1 (cost Σ_j c_j; a budget below that is an error);
      2. the other singular values with s > 0 are visited by decreasing s_{j,i}² / c_j (ties: lower
         module index, then lower i); each is kept if its c_j still fits in what is left of the
         budget, else skipped (the visit goes on, so cheaper modules may still fill the rest).
    Within a module the visiting order is by i, so kept values are always a prefix (a rank).
    This is the greedy (density) rule of the knapsack problem max Σ kept s² s.t. Σ_j k_j c_j <= N:
    optimal when all c_j are equal, and otherwise within one skipped item's s² of the optimum.

    Returns:
        k_j per module, 1 <= k_j <= len(s_j), with Σ_j k_j·c_j <= budget.
    """
    if len(spectra) != len(shapes):
        raise ShapeMismatchError(f"{len(spectra)} spectra but {len(shapes)} shapes")
    costs = [int(m) + int(n) for m, n in shapes]
    minimum = sum(costs)
    if budget < minimum:
        raise InvalidArgumentError(
            f"parameter budget {budget} is below {minimum}, the cost of rank 1 for all {len(costs)} modules")
    ranks = [1] * len(spectra)
    values, owners = [], []
    for j, s in enumerate(spectra):
        if s.ndim != 1:
            raise ShapeMismatchError(f"budget_ranks takes one 1-D spectrum per module, got {tuple(s.shape)}")
        _check_spectrum(s)
        tail = s[1:].double().cpu()
        tail = tail[tail > 0]
        values.append(tail.square() / costs[j])
        owners.append(torch.full((len(tail),), j, dtype=torch.long))
    if not values:
        return ranks
    density = torch.cat(values)
    owner = torch.cat(owners)
    order = torch.argsort(density, descending=True, stable=True)  # stable: ties keep (j, i) order
    left = budget - minimum
    for j in owner[order].tolist():
        if costs[j] <= left:
            ranks[j] += 1
            left -= costs[j]
    return ranks


def select_ranks(spectra: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, int]],
                 policy: RankPolicy) -> dict[str, int]:
    """Rank per named module for any policy: `choose_ranks` per module, or `budget_ranks` globally.

    spectra[name] is the 1-D descending spectrum of module `name`, shapes[name] its ΔW's (m, n)
    (only read by the budget policy).
    """
    names = list(spectra)
    if policy.kind == "budget":
        ranks = budget_ranks([spectra[n] for n in names], [shapes[n] for n in names], int(policy.value))
        return dict(zip(names, ranks))
    return {n: int(choose_ranks(spectra[n], policy)) for n in names}


def truncation_error(S: Tensor, k: int | Tensor, total: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Exact error of the best rank-k approximation, from the singular values alone.

    abs_err = ‖ΔW − ΔW_k‖_F = sqrt(Σ_{i>=k} s_i²); rel_err = abs_err / ‖ΔW‖_F with ‖ΔW‖_F = sqrt(Σ s_i²)
    (0 when ΔW = 0); retained_energy = Σ_{i<k} s_i² / Σ s_i² (1 when ΔW = 0), so rel_err² = 1 − retained.
    With `total` = ‖ΔW‖²_F exact, S may be the leading part of the spectrum, or the singular values of a
    projection P·ΔW (a randomized sketch): then abs_err² = total − Σ_{i<k} s_i² is the exact ‖ΔW − P_k·ΔW‖²_F.

    Args:
        S: (..., r) singular values; k: an int or a LongTensor broadcastable to S.shape[:-1], 0 <= k.
        total: (...) Σ s_i² over the whole spectrum, when S is not all of it.

    Returns:
        (abs_err, rel_err, retained_energy), each (...), in S's dtype (computed in float64).
    """
    tail = _tail_energy(S, total)
    r = S.shape[-1]
    kk = torch.broadcast_to(torch.as_tensor(k, device=S.device).long().clamp(0, r), S.shape[:-1])
    tail_k = tail.gather(-1, kk.unsqueeze(-1)).squeeze(-1)
    total = tail[..., 0]
    nonzero = total > 0
    safe = torch.where(nonzero, total, torch.ones_like(total))
    rel = torch.where(nonzero, (tail_k / safe).sqrt(), torch.zeros_like(total))
    retained = torch.where(nonzero, 1.0 - tail_k / safe, torch.ones_like(total))
    return tail_k.sqrt().to(S.dtype), rel.to(S.dtype), retained.to(S.dtype)


# --------------------------------------------------------------------------- dense / implicit SVD


@dataclass(frozen=True)
class LinearOperator:
    """An implicit (..., m, n) matrix M given by its products, for `randomized_svd`.

    matmul(X) = M @ X for X (..., n, p); rmatmul(Y) = Mᵀ @ Y for Y (..., m, p). Both must accept
    and return tensors on `device` in `dtype`. batch_shape are M's leading dimensions.
    """

    shape: tuple[int, int]
    matmul: Callable[[Tensor], Tensor]
    rmatmul: Callable[[Tensor], Tensor]
    device: torch.device
    dtype: torch.dtype = torch.float32
    batch_shape: tuple[int, ...] = ()

    @classmethod
    def dense(cls, M: Tensor) -> LinearOperator:
        """The operator of a dense (..., m, n) matrix."""
        return cls(tuple(M.shape[-2:]), M.__matmul__, M.mT.__matmul__, M.device, M.dtype, tuple(M.shape[:-2]))


def randomized_svd(M: Tensor | LinearOperator, k: int, *, oversample: int = 10, power_iters: int = 2,
                   seed: int = 0, device: str | torch.device = "auto") -> SVD:
    """Truncated rank-k SVD of a dense or implicit matrix by Halko, Martinsson & Tropp (2011), alg. 4.4.

    Range finder: Y = (M Mᵀ)^q M Ω with Gaussian Ω (n x (k+oversample)), re-orthonormalised by QR
    after every product; Q = orth(Y); then M ≈ Q (Qᵀ M), whose SVD is the factored SVD of Q and
    Qᵀ M (`factored_svd`, float64 core). Error ≈ σ_{k+1} for decaying spectra; more power_iters
    sharpen it for slowly decaying ones. Use it where ΔW is genuinely dense (DoRA → LoRA,
    TIES/DARE results) and too large for `exact_svd_dense`.

    Args:
        M: dense (..., m, n) tensor (moved to `device`, float32) or a `LinearOperator` (used as is,
            on its own device; `device` is then ignored).
        k: rank, 1 <= k <= min(m, n).
        seed: seeds Ω (drawn on the CPU, so results agree across devices).

    Returns:
        SVD(U (..., m, k), S (..., k), Vh (..., k, n)): on M's device, in float32 (float64 for a
        float64 M), for a dense M; on the operator's device and dtype for a LinearOperator.
    """
    if isinstance(M, Tensor):
        if M.ndim < 2:
            raise ShapeMismatchError(f"randomized_svd needs a matrix, got shape {tuple(M.shape)}")
        _check_finite("the matrix", M)
        out_device = M.device
        op = LinearOperator.dense(M.to(resolve_device(device), _compute_dtype(M)))
    else:
        op, out_device = M, M.device
    m, n = op.shape
    if not 1 <= k <= min(m, n):
        raise InvalidArgumentError(f"rank {k} is out of range [1, {min(m, n)}]")
    if oversample < 0 or power_iters < 0:
        raise InvalidArgumentError("oversample and power_iters must be >= 0")
    width = min(k + oversample, m, n)
    gen = torch.Generator().manual_seed(seed)
    omega = torch.randn(*op.batch_shape, n, width, generator=gen, dtype=op.dtype).to(op.device)

    def orth(Y: Tensor) -> Tensor:
        with lapack_threads(Y):
            return torch.linalg.qr(Y).Q

    Q = orth(op.matmul(omega))                                    # (..., m, width)
    for _ in range(power_iters):
        Z = orth(op.rmatmul(Q))                                   # (..., n, width)
        Q = orth(op.matmul(Z))
    small = op.rmatmul(Q).mT                                      # Qᵀ M, (..., width, n)
    U, S, Vh = factored_svd(Q, small, device=op.device)
    return SVD(U[..., :k].to(out_device), S[..., :k].to(out_device), Vh[..., :k, :].to(out_device))


EXACT_SVD_MAX_DIM = 2048
"""Largest min(m, n) that `exact_svd_dense` accepts (a 4096 x 4096 SVD took 46 s on a 2-core CPU)."""


def exact_svd_dense(M: Tensor, k: int, *, device: str | torch.device = "auto",
                    max_dim: int = EXACT_SVD_MAX_DIM) -> SVD:
    """Rank-k truncation of the exact SVD of a dense (..., m, n) matrix: one torch.linalg.svd call.

    This is the one place a dense SVD is allowed: for matrices that are genuinely dense (DoRA →
    LoRA's ΔW, TIES/DARE results), where no B @ A factorisation exists, and small enough
    (min(m, n) <= max_dim) that LAPACK/cuSOLVER is fast; it gives the exact Eckart–Young optimum
    and serves as the reference for `randomized_svd`. Low-rank products must use `factored_svd`.

    Returns:
        SVD(U (..., m, k), S (..., k), Vh (..., k, n)) on M's device, float32 (float64 for float64 M).
    """
    if M.ndim < 2:
        raise ShapeMismatchError(f"exact_svd_dense needs a matrix, got shape {tuple(M.shape)}")
    m, n = M.shape[-2:]
    if min(m, n) > max_dim:
        raise InvalidArgumentError(
            f"a dense SVD of a {m} x {n} matrix is too slow (limit {max_dim}); use randomized_svd")
    if not 1 <= k <= min(m, n):
        raise InvalidArgumentError(f"rank {k} is out of range [1, {min(m, n)}]")
    _check_finite("the matrix", M)
    U, S, Vh = accurate_svd(M.to(resolve_device(device), _compute_dtype(M)))
    return SVD(U[..., :k].to(M.device), S[..., :k].to(M.device), Vh[..., :k, :].to(M.device))


SvdMethod = Literal["auto", "exact", "randomized"]
AUTO_EXACT_MAX_DIM = 512
"""`svd="auto"` runs the exact dense SVD for min(out, in) <= this (<= 50 ms on 2 CPU cores), randomized above."""
OVERSAMPLE = 16
"""Columns a randomized sketch holds beyond the singular values it reports (HMT's p)."""
INITIAL_SKETCH = 64
"""Width of the first sketch when the rank is not known in advance (energy, ratio, threshold); doubled as needed."""


def choose_svd(method: SvdMethod, shape: tuple[int, int], rank: int | None = None) -> str:
    """"exact" or "randomized" for a (out, in) ΔW: as asked, or by size for "auto".

    auto: exact when min(out, in) <= AUTO_EXACT_MAX_DIM, or when a fixed rank needs more than a quarter of
    the spectrum (a sketch that wide costs about as much); randomized otherwise and above EXACT_SVD_MAX_DIM.
    """
    if method not in get_args(SvdMethod):
        raise InvalidArgumentError(f"unknown SVD method {method!r} (choose from {', '.join(get_args(SvdMethod))})")
    if method != "auto":
        return method
    small = min(shape)
    if small > EXACT_SVD_MAX_DIM:
        return "randomized"
    if small <= AUTO_EXACT_MAX_DIM or (rank is not None and 4 * rank >= small):
        return "exact"
    return "randomized"


def power_iterations(width: int, full: int) -> int:
    """Power iterations q for a sketch of `width` columns of a matrix with min(m, n) = full.

    Chosen so that the rank-(width − OVERSAMPLE) fit stays within 1% of the Eckart–Young error on slowly
    decaying spectra, s_i ∝ (i+1)^-0.25 ... (i+1)^-1 and exponential (measured at 2048 x 2048, worst 1.0062 for
    k = 64, 1.0044 for k = 128, 1.0046 for k = 256; tested in tests/test_extract.py): 2 while the sketch spans at
    most 1/16 of the spectrum, 3 up to 1/8, 4 above ("auto" switches to the dense SVD from 1/4 on). A nearly flat
    spectrum (linear decay) is the one case above 1%: 1.0102 for k = 256 of 2048.
    """
    return 2 if 16 * width <= full else 3 if 8 * width <= full else 4


def adaptive_svd(M: Tensor, policy: RankPolicy, total: Tensor, *, method: SvdMethod = "auto",
                 oversample: int = OVERSAMPLE, power_iters: int | None = None,
                 seed: int = 0) -> list[tuple[SVD, int, str]]:
    """Leading SVD of each matrix of a stack M (g, m, n), wide enough to choose its rank k under `policy`.

    exact: one dense SVD of the stack (`exact_svd_dense`). randomized: a Halko–Martinsson–Tropp sketch
    (`randomized_svd`, QR after every product) of width k + oversample for a fixed rank; for energy / ratio /
    threshold a sketch of INITIAL_SKETCH columns whose first width − oversample values are trusted, doubled per
    module until the policy's k falls in the first half of them, where the sketched values are accurate enough
    for the choice (energy is tested against the exact `total` = ‖M_j‖²_F).
    A sketch as wide as min(m, n) is exact. The kept factors U_k S_k Vh_k are the projection U_k U_kᵀ M_j, so
    ‖M_j − U_k S_k Vh_k‖²_F = total_j − Σ_{i<k} s_i² exactly (`truncation_error(S, k, total)`).
    "auto" picks by size per round (`choose_svd` with the sketch's width as the rank).

    Args:
        M: (g, m, n) float32 (or float64), finite (not checked again: a finite `total` says so), on the device
            to compute on; total: (g,) float64 ‖M_j‖²_F.
        policy: a per-module policy (not budget).
        power_iters: None chooses `power_iterations(width, min(m, n))`.

    Returns:
        [(SVD of module j with U (m, w), S (w,), Vh (w, n)), k_j, "exact" or "randomized"] for j = 0..g-1,
        1 <= k_j <= w.
    """
    if policy.kind == "budget":
        raise InvalidArgumentError("the budget policy is global over modules: choose ranks from the spectra first")
    g, m, n = M.shape
    full = min(m, n)
    results: dict[int, tuple[SVD, int, str]] = {}
    todo = list(range(g))
    rank = int(policy.value) if policy.kind == "rank" else INITIAL_SKETCH - oversample
    while todo:
        rank = min(rank, full)
        width = min(full, rank + oversample)
        how = choose_svd(method, (m, n), rank)
        stacks = [(todo, M)] if len(todo) == g else [([j], M[j:j + 1]) for j in todo]
        left = []
        for names, part in stacks:
            if how == "exact":
                svd, trusted = exact_svd_dense(part, full), full
            else:
                q = power_iterations(width, full) if power_iters is None else power_iters
                svd = randomized_svd(LinearOperator.dense(part), width, oversample=0, power_iters=q, seed=seed)
                trusted = full if width == full else width - oversample
            k = choose_ranks(svd.S[..., :trusted], policy, total[names])
            for i, j in enumerate(names):
                if policy.kind != "rank" and trusted < full and 2 * int(k[i]) > trusted:
                    left.append(j)
                else:
                    results[j] = (SVD(svd.U[i], svd.S[i], svd.Vh[i]), int(k[i]), how)
        todo, rank = left, 2 * (rank + oversample) - oversample
    return [results[j] for j in range(g)]


# --------------------------------------------------------------------------- batching by shape


def group_by(keys: Mapping[str, Hashable]) -> dict[Hashable, list[str]]:
    """Names grouped by their key, {key: [names]}; groups and names keep the mapping's order."""
    groups: dict[Hashable, list[str]] = {}
    for name, key in keys.items():
        groups.setdefault(key, []).append(name)
    return groups


def group_by_shape(items: Mapping[str, Sequence[Tensor]]) -> dict[tuple[tuple[int, ...], ...], list[str]]:
    """Names grouped by the shapes of their tensors: {((m, r), (r, n)): [names]} for items (B, A)."""
    return group_by({name: tuple(tuple(t.shape) for t in ts) for name, ts in items.items()})


def map_by_shape(items: Mapping[str, Sequence[Tensor]], fn: Callable[..., Tensor | tuple[Tensor, ...]], *,
                 max_batch: int | None = None) -> dict[str, tuple[Tensor, ...]]:
    """Apply a batched `fn` once per group of same-shape items and split its results back by name.

    For each group (`group_by_shape`), the i-th tensors of all items are stacked on a new leading
    dimension (at most `max_batch` items per call, to bound memory), `fn(*stacked)` is called, and
    each returned tensor is unbound along dimension 0. fn may return one tensor (each item then
    gets a 1-tuple) or a tuple of tensors; a NamedTuple result (e.g. `SVD`) keeps its type per item.

    Example: `map_by_shape({n: (m.B, m.A) for n, m in modules.items()}, factored_svd)`.

    Returns:
        {name: fn's results for that item}, in the order of `items`.
    """
    if max_batch is not None and max_batch < 1:
        raise InvalidArgumentError(f"max_batch must be >= 1, got {max_batch}")
    results: dict[str, tuple[Tensor, ...]] = {}
    for names in group_by_shape(items).values():
        step = max_batch or len(names)
        for start in range(0, len(names), step):
            chunk = names[start:start + step]
            stacked = [torch.stack(ts) for ts in zip(*(items[n] for n in chunk))]
            out = fn(*stacked)
            parts = (out,) if isinstance(out, Tensor) else out
            make = type(out)._make if hasattr(type(out), "_make") else tuple
            for i, name in enumerate(chunk):
                results[name] = make(p[i] for p in parts)
    return {name: results[name] for name in items}
