"""TIES / DARE / magnitude pruning / KnOTS (adaptools.methods) against dense references of the papers' formulas and PEFT."""
from __future__ import annotations

import pytest
import torch

from adaptools import Adapter, LoraModule
from adaptools.errors import DoraError, InvalidArgumentError
from adaptools.linalg import RankPolicy
from adaptools.methods import (
    knots_basis,
    magnitude_keep,
    merge_tasks,
    merge_with_method,
    module_generator,
    random_keep,
)

DENSE = ["ties", "dare_linear", "dare_ties", "magnitude_prune"]
KNOTS = ["knots_ties", "knots_dare"]
DARE = {"dare_linear", "dare_ties", "knots_dare"}
SHAPES = {"layers.0.q": (24, 20), "layers.0.v": (12, 20), "layers.1.q": (24, 20), "layers.1.v": (12, 20)}


# --------------------------------------------------------------------------- references (papers / mergekit, dense)


def ref_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim of one matrix: keep |τ| >= the k-th largest |τ|, k = max(1, ⌊density·numel⌋)."""
    k = max(1, int(density * tau.numel()))
    threshold = tau.abs().flatten().sort(descending=True).values[k - 1]
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def ref_merge(taus: list[torch.Tensor], weights: list[float], method: str, density: float = 1.0,
              majority_sign: str = "total", keeps: list[torch.Tensor] | None = None) -> torch.Tensor:
    """mergekit's generalized task arithmetic (TIES: normalised disjoint mean; DARE: rescaled drop), one task at a time."""
    base = method.removeprefix("knots_")
    base = "dare_ties" if base == "dare" else base
    weighted = []
    for i, (tau, w) in enumerate(zip(taus, weights)):
        if base in ("ties", "magnitude_prune") and density < 1:
            tau = ref_trim(tau, density)
        if base.startswith("dare"):
            tau = tau * keeps[i] / density
        weighted.append(w * tau)
    if base not in ("ties", "dare_ties"):
        return sum(weighted)
    votes = sum(weighted) if majority_sign == "total" else sum(torch.sign(x) for x in weighted)
    sign = torch.where(votes >= 0, 1.0, -1.0).to(votes.dtype)
    numerator, divisor = torch.zeros_like(votes), torch.zeros_like(votes)
    for x, w in zip(weighted, weights):
        agree = torch.sign(x) == sign
        numerator += torch.where(agree, x, 0.0)
        divisor += agree.to(votes.dtype) * w
    if base == "ties":
        return numerator / torch.where(divisor == 0, 1.0, divisor)
    return numerator


def best_rank(M: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


def make_adapter(seed: int, rank: int, scale: float, shapes: dict[str, tuple[int, int]] = SHAPES,
                 dtype: torch.dtype = torch.float64) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    modules = {name: LoraModule(A=torch.randn(rank, n, generator=g, dtype=dtype),
                                B=torch.randn(m, rank, generator=g, dtype=dtype), scale=scale)
               for name, (m, n) in shapes.items()}
    return Adapter(modules)


def dense(module: LoraModule) -> torch.Tensor:
    return module.scale * module.B.double() @ module.A.double()


def reference_module(adapters: list[Adapter], weights: list[float], name: str, method: str, density: float,
                     majority_sign: str = "total", seed: int = 0) -> tuple[torch.Tensor, int]:
    """The method's merged ΔW of one module by its definition, and the rank Σ r_i."""
    held = [(a[name], w) for a, w in zip(adapters, weights) if name in a]
    taus, ws = [dense(m) for m, _ in held], [w for _, w in held]
    rank = sum(m.rank for m, _ in held)
    if method.startswith("knots"):
        m, n = taus[0].shape
        U, S, Vh = torch.linalg.svd(torch.cat(taus, dim=1), full_matrices=False)
        k = min(m, rank, len(taus) * n)
        blocks = [S[:k, None] * Vh[:k, i * n:(i + 1) * n] for i in range(len(taus))]
        keeps = random_keep((len(taus), k, n), density, module_generator(seed, name)) if method in DARE else None
        return U[:, :k] @ ref_merge(blocks, ws, method, density, majority_sign, keeps), rank
    keeps = random_keep((len(taus), *taus[0].shape), density, module_generator(seed, name)) if method in DARE else None
    return ref_merge(taus, ws, method, density, majority_sign, keeps), rank


# --------------------------------------------------------------------------- elementwise steps


def _taus(T: int = 3, m: int = 9, n: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randn(T, m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 1.0])
def test_magnitude_keep_is_the_trim(density: float) -> None:
    taus = _taus()
    keep = magnitude_keep(taus, density)
    for t in range(taus.shape[0]):
        torch.testing.assert_close(taus[t] * keep[t], ref_trim(taus[t], density), rtol=0, atol=0)
    assert int(keep[0].sum()) == max(1, int(density * taus[0].numel()))


@pytest.mark.parametrize("method", ["sum", *DENSE])
@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.7, 0.2, 1.3], [1.0, -0.5, 0.8]])
def test_merge_tasks_matches_definition(method: str, majority_sign: str, weights: list[float]) -> None:
    taus = _taus()
    keep = random_keep(taus.shape, 0.4, torch.Generator().manual_seed(5))
    density = 1.0 if method == "sum" else 0.4
    ours = merge_tasks(taus, torch.tensor(weights, dtype=torch.float64), method, density=density, majority_sign=majority_sign, keep=keep)
    ref = ref_merge(list(taus), weights, method, density, majority_sign, list(keep))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
def test_ties_and_magnitude_prune_match_peft(majority_sign: str) -> None:
    from peft.utils.merge_utils import dare_linear, magnitude_prune, ties

    taus = _taus(m=16, n=12)
    ones, unequal = torch.ones(3, dtype=torch.float64), torch.tensor([0.7, 0.2, 1.3], dtype=torch.float64)
    # PEFT elects on unweighted tensors and divides by the count: mergekit's convention agrees at weights 1
    torch.testing.assert_close(merge_tasks(taus, ones, "ties", density=0.3, majority_sign=majority_sign),
                               ties(list(taus), ones, 0.3, majority_sign), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merge_tasks(taus, unequal, "magnitude_prune", density=0.3),
                               magnitude_prune(list(taus), unequal, 0.3), rtol=1e-12, atol=1e-12)
    torch.manual_seed(11)
    theirs = dare_linear(list(taus), unequal, 0.3)
    torch.manual_seed(11)  # replay PEFT's masks: one torch.bernoulli per task, in order
    keep = torch.stack([torch.bernoulli(torch.full_like(t, 0.3)).bool() for t in taus])
    torch.testing.assert_close(merge_tasks(taus, unequal, "dare_linear", density=0.3, keep=keep), theirs,
                               rtol=1e-12, atol=1e-12)


def test_module_generator_is_stable() -> None:
    a = random_keep((4, 5), 0.5, module_generator(3, "x.q"))
    assert torch.equal(a, random_keep((4, 5), 0.5, module_generator(3, "x.q")))
    assert not torch.equal(a, random_keep((4, 5), 0.5, module_generator(4, "x.q")))
    assert not torch.equal(a, random_keep((4, 5), 0.5, module_generator(3, "x.v")))


# --------------------------------------------------------------------------- KnOTS


def test_knots_basis_reconstructs_each_update_and_sum_merge_is_the_plain_sum() -> None:
    g = torch.Generator().manual_seed(0)
    ranks, m, n = (4, 6, 3), 30, 22
    Bs = [torch.randn(2, m, r, generator=g, dtype=torch.float64) for r in ranks]
    As = [torch.randn(2, r, n, generator=g, dtype=torch.float64) for r in ranks]
    U, C = knots_basis(Bs, As)
    assert U.shape == (2, m, sum(ranks)) and C.shape == (2, len(ranks), sum(ranks), n)
    for t in range(len(ranks)):
        torch.testing.assert_close(U @ C[:, t], Bs[t] @ As[t], rtol=1e-10, atol=1e-10)
    weights = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    plain = sum(w * B @ A for w, B, A in zip(weights, Bs, As))
    torch.testing.assert_close(U @ merge_tasks(C, weights, "sum"), plain, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(U @ merge_tasks(C, weights, "dare_linear", density=1.0, keep=torch.ones_like(C, dtype=torch.bool)),
                               plain, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- adapters


@pytest.fixture(scope="module")
def adapters() -> list[Adapter]:
    """Three adapters, ranks 4/6/3, with modules missing from some of them."""
    a = make_adapter(1, 4, 0.5)
    b = make_adapter(2, 6, 2.0)
    c = make_adapter(3, 3, 1.0, shapes={k: v for k, v in SHAPES.items() if k.endswith("q")})
    return [a, b, c]


@pytest.mark.parametrize("method", DENSE + KNOTS)
def test_methods_match_dense_definition(adapters: list[Adapter], method: str) -> None:
    weights, density, sign = [0.6, 1.2, 0.9], 0.35, "frequency" if method == "ties" else "total"
    result, report = merge_with_method(adapters, weights, method, density=density, majority_sign=sign, seed=7)
    for name in SHAPES:
        merged, rank = reference_module(adapters, weights, name, method, density, sign, seed=7)
        k = min(rank, *merged.shape)
        ours = dense(result[name])
        assert result[name].rank == report.modules[name].new_rank == k
        torch.testing.assert_close(ours, best_rank(merged, k), rtol=1e-8, atol=1e-8)
        entry = report.modules[name]
        assert entry.old_rank == rank
        assert entry.error == pytest.approx(float((merged - ours).norm()), rel=1e-6, abs=1e-9)
        assert entry.norm == pytest.approx(float(merged.norm()), rel=1e-9)


@pytest.mark.parametrize("method", DENSE + KNOTS)
def test_single_adapter_at_density_one_is_itself(method: str) -> None:
    a = make_adapter(4, 5, 0.75)
    result, report = merge_with_method([a], None, method, density=1.0)
    for name, module in a.items():
        torch.testing.assert_close(dense(result[name]), dense(module), rtol=1e-9, atol=1e-9)
        assert result[name].rank == module.rank and result[name].scale == 1.0
    assert report.worst_rel_error < 1e-9


@pytest.mark.parametrize("method", ["dare_ties", "knots_dare"])
def test_dare_is_deterministic_and_independent_of_batching(adapters: list[Adapter], method: str) -> None:
    run = lambda ads, seed=5, **kw: merge_with_method(ads, None, method, density=0.5, seed=seed, **kw)[0]  # noqa: E731
    batched, single = run(adapters), run(adapters, max_elements=1)
    again, other = run(adapters), run(adapters, seed=6)
    names = list(SHAPES)[:1]
    alone = run([a.with_modules({n: a[n] for n in names}) for a in adapters])
    for name in SHAPES:
        torch.testing.assert_close(dense(single[name]), dense(batched[name]), rtol=1e-10, atol=1e-10)
        assert torch.equal(again[name].B, batched[name].B) and torch.equal(again[name].A, batched[name].A)
        assert not torch.allclose(dense(other[name]), dense(batched[name]))
    torch.testing.assert_close(dense(alone[names[0]]), dense(batched[names[0]]), rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["dare_ties", "knots_dare", "ties"])
def test_cuda_matches_cpu(adapters: list[Adapter], method: str) -> None:
    f32 = [a.to(dtype=torch.float32) for a in adapters]
    cpu = merge_with_method(f32, None, method, density=0.5, seed=2, device="cpu")[0]
    gpu = merge_with_method(f32, None, method, density=0.5, seed=2, device="cuda")[0]
    for name in SHAPES:
        torch.testing.assert_close(dense(gpu[name]), dense(cpu[name]), rtol=1e-4, atol=1e-4)


def test_randomized_refactoring_of_a_large_module() -> None:
    shapes = {"big": (600, 530)}
    ads = [make_adapter(s, 8, 1.0, shapes, dtype=torch.float32) for s in (1, 2)]
    result, report = merge_with_method(ads, [1.0, 1.0], "ties", density=0.3)
    merged, rank = reference_module(ads, [1.0, 1.0], "big", "ties", 0.3)
    ours = dense(result["big"])
    optimal = float((merged - best_rank(merged, rank)).norm())
    actual = float((merged - ours).norm())
    assert result["big"].rank == rank
    assert actual <= 1.02 * optimal
    assert report.modules["big"].error == pytest.approx(actual, rel=1e-4)


def test_rank_policies(adapters: list[Adapter]) -> None:
    name = "layers.0.q"
    merged, rank = reference_module(adapters, [1.0, 1.0, 1.0], name, "ties", 0.5)
    S = torch.linalg.svdvals(merged)
    # rank k above Σ r_i: dense methods compute k values
    result, _ = merge_with_method(adapters, None, "ties", density=0.5, policy="rank=18")
    torch.testing.assert_close(dense(result[name]), best_rank(merged, 18), rtol=1e-8, atol=1e-8)
    # energy is measured against all of ‖merged‖²; the smallest k in [1, Σ r_i] reaching it
    result, report = merge_with_method(adapters, None, "ties", density=0.5, policy=RankPolicy("energy", 0.8))
    kept = (S.square().cumsum(0) / S.square().sum())[: rank]
    expected = min(rank, int((kept < 0.8 - 1e-12).sum()) + 1)
    assert result[name].rank == expected
    assert report.modules[name].retained_energy == pytest.approx(float(kept[expected - 1]), rel=1e-9)
    # a global budget holds
    result, _ = merge_with_method(adapters, None, "knots_ties", density=0.5, policy="budget=600")
    assert sum(m.rank * (m.in_features + m.out_features) for _, m in result.items()) <= 600


def test_bad_options(adapters: list[Adapter]) -> None:
    with pytest.raises(InvalidArgumentError, match="density"):
        merge_with_method(adapters, None, "ties")
    for density in (0.0, 1.5):
        with pytest.raises(InvalidArgumentError, match="density"):
            merge_with_method(adapters, None, "dare_ties", density=density)
    with pytest.raises(InvalidArgumentError, match="unknown merge method"):
        merge_with_method(adapters, None, "slerp", density=0.5)
    with pytest.raises(InvalidArgumentError, match="majority sign"):
        merge_with_method(adapters, None, "ties", density=0.5, majority_sign="mean")
    with pytest.raises(InvalidArgumentError, match="exact"):
        merge_with_method(adapters, None, "sum")
    dora = make_adapter(9, 4, 1.0)
    dora = dora.with_modules({n: LoraModule(m.A, m.B, magnitude=torch.ones(m.out_features, dtype=m.A.dtype))
                              for n, m in dora.items()})
    with pytest.raises(DoraError):
        merge_with_method([adapters[0], dora], None, "ties", density=0.5)


# --------------------------------------------------------------------------- API entry point and CLI


def test_combine_method_sum_is_the_exact_sum(adapters: list[Adapter]) -> None:
    import adaptools

    weights = [0.7, -0.4, 1.1]
    result = adaptools.combine(adapters, weights, method="sum")  # combine's arithmetic runs in float32
    for name in SHAPES:
        expected = sum(w * dense(a[name]) for a, w in zip(adapters, weights) if name in a)
        torch.testing.assert_close(dense(result[name]), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidArgumentError, match="density"):
        adaptools.combine(adapters, weights, method="sum", density=0.5)


def test_combine_method_dispatches_to_the_methods(adapters: list[Adapter]) -> None:
    import adaptools

    ours, report = adaptools.combine(adapters, [0.5, 1.0, 2.0], method="knots_dare", density=0.6, seed=4, policy="rank=5")
    direct, _ = merge_with_method(adapters, [0.5, 1.0, 2.0], "knots_dare", density=0.6, seed=4, policy="rank=5")
    for name in SHAPES:
        assert torch.equal(ours[name].B, direct[name].B) and ours[name].rank == report.modules[name].new_rank == 5


def test_cli_combine_methods(runner, peft_pair, tmp_path) -> None:
    import adaptools
    from conftest import run_cli

    a, b = peft_pair
    res = run_cli(runner, "combine", a, b, "--weights", "0.7,0.5", "--method", "ties", "--density", "0.4",
                  "--majority-sign", "frequency", "-o", tmp_path / "ties")
    assert res.exit_code == 0, res.output + res.stderr
    assert "ties, rank=sum of ranks" in res.stdout
    expected, _ = adaptools.combine([adaptools.load(a), adaptools.load(b)], [0.7, 0.5], method="ties", density=0.4,
                                    majority_sign="frequency")
    written = adaptools.load(tmp_path / "ties")
    assert set(written.modules) == set(expected.modules)
    for name, module in expected.items():
        torch.testing.assert_close(dense(written[name]), dense(module), rtol=1e-5, atol=1e-6)
    res = run_cli(runner, "combine", a, b, "--method", "knots_dare", "--density", "0.5", "--seed", "3", "--rank", "2",
                  "-o", tmp_path / "knots")
    assert res.exit_code == 0, res.output + res.stderr
    assert max(adaptools.load(tmp_path / "knots").ranks.values()) == 2
    res = run_cli(runner, "combine", a, b, "--density", "0.5", "-o", tmp_path / "bad")
    assert res.exit_code == 2 and res.stderr.startswith("error: density") and not (tmp_path / "bad").exists()
    res = run_cli(runner, "combine", a, b, "--method", "dare_ties", "-o", tmp_path / "bad")
    assert res.exit_code == 2 and "needs a density (--density" in res.stderr
