"""adaptools.linalg against dense torch.linalg references and brute-force rank searches."""
from __future__ import annotations

import itertools

import pytest
import torch

from adaptools.errors import InvalidArgumentError, NonFiniteError, ShapeMismatchError
from adaptools.linalg import (
    SVD,
    LinearOperator,
    RankPolicy,
    balanced_factors,
    budget_ranks,
    choose_ranks,
    exact_svd_dense,
    factored_svd,
    group_by,
    group_by_shape,
    map_by_shape,
    randomized_svd,
    select_ranks,
    truncation_error,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _factors(*batch: int, m: int, r: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*batch, m, r, generator=g), torch.randn(*batch, r, n, generator=g)


def _dense_best(M: torch.Tensor, k: int) -> torch.Tensor:
    """Best rank-k approximation of M by a dense float64 SVD (Eckart–Young)."""
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


def _assert_orthonormal(U: torch.Tensor, Vh: torch.Tensor) -> None:
    eye = torch.eye(U.shape[-1], dtype=U.dtype)
    torch.testing.assert_close(U.mT @ U, eye.expand_as(U.mT @ U), atol=1e-5, rtol=0)
    torch.testing.assert_close(Vh @ Vh.mT, eye.expand_as(Vh @ Vh.mT), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- factored SVD


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m,r,n", [(96, 8, 64), (40, 20, 70), (16, 40, 24), (50, 64, 12), (512, 32, 384)])
def test_factored_svd_matches_dense(m: int, r: int, n: int, device: str) -> None:
    B, A = _factors(m=m, r=r, n=n)
    dW = B.double() @ A.double()
    ref = torch.linalg.svdvals(dW)
    U, S, Vh = factored_svd(B, A, device=device)
    k = min(m, n, r)
    assert U.shape == (m, k) and S.shape == (k,) and Vh.shape == (k, n)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32 and U.device == B.device
    assert torch.all(S[:-1] >= S[1:])
    torch.testing.assert_close(S.double(), ref[:k], rtol=1e-5, atol=1e-5 * float(ref[0]))
    recon = (U * S) @ Vh
    assert torch.linalg.norm(recon.double() - dW) <= 1e-5 * torch.linalg.norm(dW)
    _assert_orthonormal(U, Vh)


@pytest.mark.parametrize("device", DEVICES)
def test_factored_svd_batched_equals_unbatched(device: str) -> None:
    B, A = _factors(2, 3, m=48, r=6, n=32, seed=1)
    batched = factored_svd(B, A, device=device)
    assert batched.S.shape == (2, 3, 6)
    for i, j in itertools.product(range(2), range(3)):
        single = factored_svd(B[i, j], A[i, j], device="cpu")
        torch.testing.assert_close(batched.S[i, j], single.S, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close((batched.U[i, j] * batched.S[i, j]) @ batched.Vh[i, j],
                                   (single.U * single.S) @ single.Vh, rtol=1e-5, atol=1e-5)


def test_factored_svd_zero_and_rank_deficient() -> None:
    B, A = _factors(m=32, r=8, n=24, seed=2)
    U, S, Vh = factored_svd(torch.zeros_like(B), A, device="cpu")
    assert torch.all(S == 0)
    _assert_orthonormal(U, Vh)
    assert torch.all((U * S) @ Vh == 0)

    B[:, 5:] = 0  # rank 5
    dW = B.double() @ A.double()
    U, S, Vh = factored_svd(B, A, device="cpu")
    assert torch.all(S[5:] <= 1e-6 * S[0])
    assert torch.linalg.norm(((U * S) @ Vh).double() - dW) <= 1e-5 * torch.linalg.norm(dW)
    _assert_orthonormal(U, Vh)


def test_factored_svd_dtypes_and_errors() -> None:
    B, A = _factors(m=20, r=4, n=12, seed=3)
    half = factored_svd(B.bfloat16(), A.bfloat16(), device="cpu")
    assert half.S.dtype == torch.bfloat16
    full = factored_svd(B.bfloat16(), A.bfloat16(), device="cpu", dtype=torch.float32)
    ref = torch.linalg.svdvals(B.bfloat16().double() @ A.bfloat16().double())
    torch.testing.assert_close(full.S.double(), ref[:4], rtol=1e-5, atol=0)
    f64 = factored_svd(B.double(), A.double(), device="cpu")
    torch.testing.assert_close(f64.S, torch.linalg.svdvals(B.double() @ A.double())[:4], rtol=1e-12, atol=0)
    with pytest.raises(ShapeMismatchError):
        factored_svd(B, A.mT)
    with pytest.raises(ShapeMismatchError):
        factored_svd(B.expand(2, -1, -1), A)
    A[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        factored_svd(B, A)


def test_balanced_factors_and_truncation_error_match_eckart_young() -> None:
    B, A = _factors(m=60, r=12, n=45, seed=4)
    dW = B.double() @ A.double()
    U, S, Vh = factored_svd(B, A, device="cpu")
    for k in range(1, 13):
        Bk, Ak = balanced_factors(U, S, Vh, k)
        assert Bk.shape == (60, k) and Ak.shape == (k, 45)
        torch.testing.assert_close(torch.linalg.norm(Bk, dim=0), torch.linalg.norm(Ak, dim=1))
        best = _dense_best(dW, k)
        torch.testing.assert_close((Bk @ Ak).double(), best, rtol=0, atol=1e-4 * float(S[0]))
        optimum = torch.linalg.norm(dW - best)
        abs_err, rel, kept = truncation_error(S, k)
        if k < 12:
            assert abs(float(abs_err) - float(optimum)) <= 1e-4 * float(optimum)
            assert abs(float(torch.linalg.norm(dW - (Bk @ Ak).double())) - float(optimum)) <= 1e-4 * float(optimum)
        else:
            assert float(abs_err) <= 1e-6 * float(S[0])
        total = torch.linalg.norm(dW)
        assert abs(float(rel) - float(optimum / total)) <= 1e-4 * max(float(optimum / total), 1e-3)
        assert abs(float(kept) - float(1 - (optimum / total) ** 2)) <= 1e-5
    with pytest.raises(InvalidArgumentError):
        balanced_factors(U, S, Vh, 0)
    with pytest.raises(InvalidArgumentError):
        balanced_factors(U, S, Vh, 13)


def test_truncation_error_batched_and_zero() -> None:
    S = torch.stack([torch.linspace(3, 1, 6), torch.zeros(6)])
    k = torch.tensor([2, 3])
    abs_err, rel, kept = truncation_error(S, k)
    ref0 = S[0, 2:].double().square().sum().sqrt()
    torch.testing.assert_close(abs_err[0].double(), ref0)
    torch.testing.assert_close(rel[0].double(), ref0 / S[0].double().norm())
    assert float(abs_err[1]) == 0 and float(rel[1]) == 0 and float(kept[1]) == 1
    torch.testing.assert_close(truncation_error(S, 2)[0], truncation_error(S, torch.tensor([2, 2]))[0])


# --------------------------------------------------------------------------- rank policies


def _spectra() -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    rows = [torch.rand(16, generator=g) * 10, torch.logspace(1, -6, 16), torch.rand(16, generator=g) ** 6,
            torch.cat([torch.rand(9, generator=g), torch.zeros(7)]), torch.full((16,), 2.0), torch.zeros(16)]
    return torch.stack([row.sort(descending=True).values for row in rows])


def _brute_force(s: torch.Tensor, policy: RankPolicy) -> int:
    """Smallest k in [1, r] meeting the policy, by trying every k (float64)."""
    s = s.double()
    r, v = len(s), policy.value

    def meets(k: int) -> bool:
        if policy.kind == "rank":
            return k >= min(int(v), r)
        if policy.kind == "energy":
            return float(s[:k].square().sum()) >= v * float(s.square().sum())
        keep = (s >= s[0] / v) & (s > 0) if policy.kind == "ratio" else s >= v
        return not bool(keep[k:].any())

    return next(k for k in range(1, r + 1) if meets(k))


@pytest.mark.parametrize("policy", [RankPolicy("rank", 1), RankPolicy("rank", 5), RankPolicy("rank", 40),
                                    RankPolicy("energy", 0.5), RankPolicy("energy", 0.9),
                                    RankPolicy("energy", 0.999), RankPolicy("ratio", 1), RankPolicy("ratio", 10),
                                    RankPolicy("ratio", 1e4), RankPolicy("threshold", 0.5),
                                    RankPolicy("threshold", 100.0)])
def test_each_policy_picks_the_smallest_rank_that_meets_it(policy: RankPolicy) -> None:
    S = _spectra()
    ks = choose_ranks(S, policy)
    assert ks.dtype == torch.long and ks.shape == (S.shape[0],)
    for s, k in zip(S, ks.tolist()):
        assert k == _brute_force(s, policy)
        assert int(choose_ranks(s, policy)) == k


def test_energy_one_keeps_exactly_the_nonzero_values() -> None:
    s = torch.tensor([1.0, 1e-9, 0.0, 0.0])  # 1 + 1e-18 == 1 in float64: a head-sum test would keep 1
    assert int(choose_ranks(s, RankPolicy("energy", 1.0))) == 2
    assert int(choose_ranks(torch.zeros(4), RankPolicy("energy", 1.0))) == 1
    _, rel, _ = truncation_error(s, choose_ranks(s, RankPolicy("energy", 1.0)))
    assert float(rel) == 0


def test_policy_parsing_and_validation() -> None:
    assert RankPolicy.parse("energy=0.99") == RankPolicy("energy", 0.99)
    assert RankPolicy.parse("8") == RankPolicy("rank", 8)
    assert RankPolicy.parse(" Budget = 2e6") == RankPolicy("budget", 2e6)
    assert RankPolicy.from_options(rank=None, energy=None, ratio=10, threshold=None, budget=None) == \
        RankPolicy("ratio", 10)
    for bad in ["energy=1.5", "energy=0", "rank=2.5", "rank=0", "ratio=0.5", "threshold=0", "foo=1",
                "energy=abc", "budget=nan"]:
        with pytest.raises(InvalidArgumentError):
            RankPolicy.parse(bad)
    with pytest.raises(InvalidArgumentError):
        RankPolicy.from_options(rank=4, energy=0.9)
    with pytest.raises(InvalidArgumentError):
        RankPolicy.from_options(rank=None, energy=None)
    with pytest.raises(InvalidArgumentError):
        choose_ranks(torch.ones(3), RankPolicy("budget", 100))
    with pytest.raises(InvalidArgumentError):
        choose_ranks(torch.tensor([1.0, 2.0]), RankPolicy("rank", 1))


def _best_energy(spectra: list[torch.Tensor], costs: list[int], budget: int) -> float:
    """Optimum of max Σ kept s² s.t. Σ k_j c_j <= budget, 1 <= k_j, by enumerating all rank tuples."""
    best = -1.0
    for ks in itertools.product(*(range(1, len(s) + 1) for s in spectra)):
        if sum(k * c for k, c in zip(ks, costs)) <= budget:
            best = max(best, sum(float(s[:k].double().square().sum()) for s, k in zip(spectra, ks)))
    return best


def _energy(spectra: list[torch.Tensor], ranks: list[int]) -> float:
    return sum(float(s[:k].double().square().sum()) for s, k in zip(spectra, ranks))


def test_budget_is_optimal_for_equal_costs() -> None:
    g = torch.Generator().manual_seed(6)
    spectra = [(torch.rand(5, generator=g) * 4).sort(descending=True).values for _ in range(4)]
    shapes = [(10, 6), (8, 8), (6, 10), (12, 4)]  # m + n = 16 for all
    for budget in range(64, 16 * 20 + 1, 16):
        ranks = budget_ranks(spectra, shapes, budget)
        assert sum(k * 16 for k in ranks) <= budget
        assert all(1 <= k <= 5 for k in ranks)
        assert _energy(spectra, ranks) == pytest.approx(_best_energy(spectra, [16] * 4, budget), rel=1e-12)


def test_budget_respects_budget_and_is_greedy_optimal_for_mixed_shapes() -> None:
    g = torch.Generator().manual_seed(7)
    spectra = [(torch.rand(r, generator=g) * 5).sort(descending=True).values for r in (4, 6, 5)]
    shapes = [(20, 12), (8, 8), (40, 30)]
    costs = [32, 16, 70]
    for budget in range(sum(costs), sum(c * len(s) for c, s in zip(costs, spectra)) + 40, 13):
        ranks = budget_ranks(spectra, shapes, budget)
        assert sum(k * c for k, c in zip(ranks, costs)) <= budget
        assert all(1 <= k <= len(s) for k, s in zip(ranks, spectra))
        got, best = _energy(spectra, ranks), _best_energy(spectra, costs, budget)
        assert got <= best + 1e-9
        # greedy by s²/c is within one skipped singular value of the optimum
        skipped = max((float(s[k:].double().square().max()) for s, k in zip(spectra, ranks) if k < len(s)),
                      default=0.0)
        assert got >= best - skipped - 1e-9
        # and nothing left out would still fit
        left = budget - sum(k * c for k, c in zip(ranks, costs))
        assert all(k == len(s) or c > left for k, s, c in zip(ranks, spectra, costs))
        via_policy = select_ranks(dict(zip("abc", spectra)), dict(zip("abc", shapes)), RankPolicy("budget", budget))
        assert list(via_policy.values()) == ranks
    with pytest.raises(InvalidArgumentError):
        budget_ranks(spectra, shapes, sum(costs) - 1)


def test_select_ranks_per_module_policy() -> None:
    S = _spectra()
    spectra = {f"m{i}": s for i, s in enumerate(S)}
    got = select_ranks(spectra, {}, RankPolicy("energy", 0.9))
    assert list(got.values()) == choose_ranks(S, RankPolicy("energy", 0.9)).tolist()


# --------------------------------------------------------------------------- dense and randomized SVD


def _decaying(m: int, n: int, *batch: int, seed: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(*batch, m, min(m, n), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(*batch, n, min(m, n), generator=g, dtype=torch.float64)).Q
    s = 0.8 ** torch.arange(min(m, n), dtype=torch.float64)
    return ((U * s) @ V.mT).float()


@pytest.mark.parametrize("device", DEVICES)
def test_randomized_svd_close_to_exact(device: str) -> None:
    M = _decaying(300, 200)
    k = 12
    exact = exact_svd_dense(M, k, device=device)
    approx = randomized_svd(M, k, device=device, seed=1)
    assert approx.U.shape == (300, k) and approx.Vh.shape == (k, 200)
    torch.testing.assert_close(approx.S, exact.S, rtol=1e-4, atol=0)
    optimum = torch.linalg.norm(M.double() - _dense_best(M, k))
    err = torch.linalg.norm(M.double() - ((approx.U * approx.S) @ approx.Vh).double())
    assert err <= 1.01 * optimum
    _assert_orthonormal(approx.U, approx.Vh)


def test_randomized_svd_operator_and_batch() -> None:
    M = _decaying(120, 90, 3, seed=9)
    k = 8
    batched = randomized_svd(M, k, device="cpu")
    op = LinearOperator((120, 90), lambda X: M @ X, lambda Y: M.mT @ Y, M.device, M.dtype, (3,))
    implicit = randomized_svd(op, k)
    for i in range(3):
        ref = torch.linalg.svdvals(M[i].double())[:k]
        torch.testing.assert_close(batched.S[i].double(), ref, rtol=1e-4, atol=0)
        torch.testing.assert_close(implicit.S[i].double(), ref, rtol=1e-4, atol=0)
    with pytest.raises(InvalidArgumentError):
        randomized_svd(M, 91)


def test_exact_svd_dense_matches_torch_and_is_bounded() -> None:
    M = _decaying(50, 40)
    U, S, Vh = exact_svd_dense(M, 5, device="cpu")
    ref = torch.linalg.svdvals(M.double())[:5]
    torch.testing.assert_close(S.double(), ref, rtol=1e-5, atol=0)
    assert U.shape == (50, 5) and Vh.shape == (5, 40)
    with pytest.raises(InvalidArgumentError):
        exact_svd_dense(M, 5, max_dim=32)


# --------------------------------------------------------------------------- batching helpers


def test_group_by_keeps_order() -> None:
    assert group_by({"a": 1, "b": 2, "c": 1}) == {1: ["a", "c"], 2: ["b"]}
    B1, A1 = _factors(m=8, r=2, n=6)
    B2, A2 = _factors(m=8, r=3, n=6)
    groups = group_by_shape({"x": (B1, A1), "y": (B2, A2), "z": (B1, A1)})
    assert groups == {((8, 2), (2, 6)): ["x", "z"], ((8, 3), (3, 6)): ["y"]}


@pytest.mark.parametrize("max_batch", [None, 1, 2])
def test_map_by_shape_batches_and_unbatches(max_batch: int | None) -> None:
    items = {}
    for i, (m, r, n) in enumerate([(12, 3, 9), (10, 4, 7), (12, 3, 9), (12, 3, 9), (10, 4, 7)]):
        items[f"mod{i}"] = _factors(m=m, r=r, n=n, seed=10 + i)
    calls = []

    def svd(B: torch.Tensor, A: torch.Tensor) -> SVD:
        calls.append(B.shape[0])
        return factored_svd(B, A, device="cpu")

    out = map_by_shape(items, svd, max_batch=max_batch)
    assert list(out) == list(items)
    assert sorted(calls, reverse=True) == ([3, 2] if max_batch is None else
                                           [1] * 5 if max_batch == 1 else [2, 2, 1])
    for name, (B, A) in items.items():
        assert isinstance(out[name], SVD)
        single = factored_svd(B, A, device="cpu")
        torch.testing.assert_close(out[name].S, single.S, rtol=1e-6, atol=1e-6)
    norms = map_by_shape(items, lambda B, A: torch.linalg.norm(B @ A, dim=(-2, -1)))
    for name, (B, A) in items.items():
        torch.testing.assert_close(norms[name][0], torch.linalg.norm(B @ A))
