"""Core-space merge methods and Pico calibration against dense implementations of DESIGN §18's definitions.

Every reference below works on the dense m x n task updates ΔW_t (the authors' full-space form, with the three
places DESIGN §18 pins for low-rank inputs), written here independently of adaptools.core_space.
"""
from __future__ import annotations

import pytest
import torch

import adaptools
from adaptools import Adapter, LoraModule
from adaptools.core_space import core_merge
from adaptools.errors import DoraError, InvalidArgumentError
from adaptools.methods import module_generator, random_keep

CORE = ["tsv", "iso_c", "iso_cts", "core_ties", "core_dare", "ctm"]
SHAPES = {"l0.q": (24, 20), "l0.v": (10, 40), "l1.q": (24, 20), "l1.o": (30, 16)}
WEIGHTS = [0.6, 1.2, 0.9]
OPTIONS = {"core_ties": dict(density=0.3), "core_dare": dict(density=0.6, seed=3),
           "ctm": dict(density=0.4, policy="rank=5", beta=0.25)}
EPS = 1e-6


def make_adapter(seed: int, rank: int, scale: float, shapes: dict[str, tuple[int, int]] = SHAPES,
                 dtype: torch.dtype = torch.float64) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return Adapter({name: LoraModule(A=torch.randn(rank, n, generator=g, dtype=dtype),
                                     B=torch.randn(m, rank, generator=g, dtype=dtype), scale=scale)
                    for name, (m, n) in shapes.items()})


@pytest.fixture(scope="module")
def adapters() -> list[Adapter]:
    """Ranks 4 / 6 / 3, scales α/r = 0.5, 2.0 and rsLoRA-like 1.3; the third adapter lacks two modules."""
    return [make_adapter(1, 4, 0.5), make_adapter(2, 6, 2.0),
            make_adapter(3, 3, 1.3, {k: v for k, v in SHAPES.items() if k.endswith("q")})]


def dense(module: LoraModule) -> torch.Tensor:
    return module.scale * module.B.double() @ module.A.double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- dense references (DESIGN §18)


def eps_rank(S: torch.Tensor) -> int:
    return int((S > EPS * S[0]).sum()) if len(S) and S[0] > 0 else 0


def svd(X: torch.Tensor):
    return torch.linalg.svd(X, full_matrices=False)


def polar_ref(X: torch.Tensor) -> torch.Tensor:
    P, _, Qh = svd(X)
    return P @ Qh


def factors(adapters, weights, name):
    """B̃_t = w_t·s_t·B_t and A_t of the adapters holding `name` (float64)."""
    held = [(a[name], w) for a, w in zip(adapters, weights) if name in a]
    return [w * m.scale * m.B.double() for m, w in held], [m.A.double() for m, _ in held]


def bases(Bs, As):
    """U_B, V_A: the ε-rank singular vectors of the stacked B̃'s and A's."""
    U, S, _ = svd(torch.cat(Bs, dim=1))
    _, Sa, Vh = svd(torch.cat(As, dim=0))
    return U[:, :eps_rank(S)], Vh[:eps_rank(Sa)].T


def ref_tsv(Bs, As, **_):
    taus = [B @ A for B, A in zip(Bs, As)]
    UB, VA = bases(Bs, As)
    k = min(UB.shape[1], VA.shape[1]) // len(taus)
    us, ss, vs = [], [], []
    for tau in taus:  # the full-space SVD of each dense ΔW_t
        U, S, Vh = svd(tau)
        kt = min(k, eps_rank(S))
        us.append(U[:, :kt]), ss.append(S[:kt]), vs.append(Vh[:kt].T)
    return polar_ref(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ polar_ref(torch.cat(vs, 1)).T


def ref_iso_c(Bs, As, **_):
    U, S, Vh = svd(sum(B @ A for B, A in zip(Bs, As)))
    q = eps_rank(S)
    return S[:q].mean() * U[:, :q] @ Vh[:q]


def ref_iso_cts(Bs, As, **_):
    taus = [B @ A for B, A in zip(Bs, As)]
    UB, VA = bases(Bs, As)
    D, T = min(UB.shape[1], VA.shape[1]), len(taus)
    common = int(0.8 * D)
    n_total = round((D - common) / T) * T
    c, n = D - n_total, n_total // T
    P, S, Qh = svd(sum(taus))
    us, vs, values = [], [], []
    for tau in taus:
        U, R, Vh = svd(tau - P[:, :c] @ P[:, :c].T @ tau)
        us.append(U[:, :n]), vs.append(Vh[:n].T), values.append(R[:n])
    mean = torch.cat(values + [S[:c]]).mean()
    return mean * polar_ref(torch.cat(us + [P[:, :c]], 1)) @ polar_ref(torch.cat(vs + [Qh[:c].T], 1)).T


def ties_ref(cores: list[torch.Tensor], density: float) -> torch.Tensor:
    """Trim (keep |x| >= the (d − int(dρ))-th smallest |x|), elect, disjoint mean: one task and entry at a time."""
    trimmed = []
    for M in cores:
        d = M.numel()
        k = d - int(d * density)
        if k > 0:
            threshold = M.abs().flatten().sort().values[k - 1]
            M = torch.where(M.abs() >= threshold, M, torch.zeros_like(M))
        trimmed.append(M)
    gamma = torch.sign(sum(trimmed))
    gamma[gamma == 0] = torch.sign(gamma.sum())
    total, count = torch.zeros_like(gamma), torch.zeros_like(gamma)
    for M in trimmed:
        agree = torch.sign(M) == gamma
        total += torch.where(agree, M, torch.zeros_like(M))
        count += agree.double()
    return total / count.clamp_min(1)


def cores_of(Bs, As):
    UB, VA = bases(Bs, As)
    return UB, VA, [UB.T @ (B @ A) @ VA for B, A in zip(Bs, As)]


def ref_core_ties(Bs, As, density, **_):
    UB, VA, cores = cores_of(Bs, As)
    return UB @ ties_ref(cores, density) @ VA.T


def ref_core_dare(Bs, As, density, seed, name, **_):
    UB, VA, cores = cores_of(Bs, As)
    keep = random_keep((len(cores), *cores[0].shape), density, module_generator(seed, name))
    return UB @ (sum(m * M for m, M in zip(keep, cores)) / density) @ VA.T


def hooi_ref(X: torch.Tensor, R: int):
    """tensorly 0.9 partial_tucker on modes (0, 1): SVD start, sequential updates, tol 1e-6 after sweep index 1."""
    def unfold(Y, mode):
        return torch.movedim(Y, mode, 0).reshape(Y.shape[mode], -1)

    factors = [svd(unfold(X, mode))[0][:, :R] for mode in (0, 1)]
    norm = X.norm()
    errors = []
    for sweep in range(1000):
        for mode in (0, 1):
            other = factors[1 - mode]
            Y = torch.tensordot(X, other, dims=([1 - mode], [0]))  # the other mode contracted to R, moved back
            Y = torch.movedim(Y, -1, 1 - mode)
            factors[mode] = svd(unfold(Y, mode))[0][:, :R]
        core = torch.einsum("ijt,ir,js->rst", X, *factors)
        errors.append(float(torch.sqrt(abs(norm**2 - core.norm() ** 2)) / norm))
        if sweep > 1 and abs(errors[-2] - errors[-1]) < 1e-6:
            break
    return factors


def ref_ctm(Bs, As, density, rank, beta=0.0, **_):
    UB, VA, cores = cores_of(Bs, As)
    R = min(rank, *cores[0].shape)
    norms = [float(M.norm()) for M in cores]
    mean = sum(norms) / len(norms)
    X = torch.stack([M / nm * (beta * nm + (1 - beta) * mean) for M, nm in zip(cores, norms)], dim=-1)
    U0, U1 = hooi_ref(X, R)
    merged = ties_ref([U0.T @ M @ U1 for M in cores], density)
    return (UB @ U0) @ merged @ (VA @ U1).T


def ref_sum(Bs, As, **_):
    return sum(B @ A for B, A in zip(Bs, As))


REFERENCES = {"tsv": ref_tsv, "iso_c": ref_iso_c, "iso_cts": ref_iso_cts, "core_ties": ref_core_ties,
              "core_dare": ref_core_dare, "ctm": ref_ctm, "sum": ref_sum}


def reference(adapters, weights, name, method, calibrate=None, **options):
    """The method's merged ΔW of one module by the dense definitions (Pico: calibrate B̃_t, merge, rescale)."""
    Bs, As = factors(adapters, weights, name)
    raw = [B @ A for B, A in zip(Bs, As)]
    if calibrate:
        U, S, _ = svd(torch.cat(Bs, dim=1))
        alpha = 1 / (1 + (len(Bs) - 1) * S**2 / (S**2).sum())
        Bs = [B + U @ torch.diag(alpha - 1) @ U.T @ B for B in Bs]
    if "policy" in options:
        options["rank"] = int(options.pop("policy").split("=")[1])
    merged = REFERENCES[method](Bs, As, name=name, **options)
    if calibrate:
        merged = merged * (sum(float(t.norm()) for t in raw) / len(raw)) / merged.norm()
    return merged


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("calibrate", [None, "pico"])
@pytest.mark.parametrize("method", CORE)
def test_methods_match_dense_definitions(adapters: list[Adapter], method: str, calibrate: str | None) -> None:
    result, report = adaptools.combine(adapters, WEIGHTS, method=method, calibrate=calibrate, **OPTIONS.get(method, {}))
    for name in SHAPES:
        expected = reference(adapters, WEIGHTS, name, method, calibrate, **OPTIONS.get(method, {}))
        assert rel(dense(result[name]), expected) < 1e-5, (name, rel(dense(result[name]), expected))
        entry = report.modules[name]
        assert entry.norm == pytest.approx(float(expected.norm()), rel=1e-6)
        assert entry.rel_error < 1e-5 and result[name].scale == 1.0
        assert entry.old_rank == sum(a[name].rank for a in adapters if name in a)
    if method == "ctm":
        assert max(m.rank for _, m in result.items()) <= 5


@pytest.mark.parametrize("method", ["sum", "ties"])
def test_pico_wraps_the_other_methods(adapters: list[Adapter], method: str) -> None:
    out = adaptools.combine(adapters, WEIGHTS, method=method, calibrate="pico", **({"density": 1.0} if method == "ties" else {}))
    result = out if method == "sum" else out[0]
    for name in SHAPES:
        Bs, As = factors(adapters, WEIGHTS, name)
        if method == "sum":
            expected = reference(adapters, WEIGHTS, name, "sum", "pico")
        else:  # TIES at density 1 on the calibrated tasks, rescaled (weights are in B̃: elect and average per entry)
            U, S, _ = svd(torch.cat(Bs, dim=1))
            alpha = 1 / (1 + (len(Bs) - 1) * S**2 / (S**2).sum())
            taus = [(B + U @ torch.diag(alpha - 1) @ U.T @ B) @ A / w for B, A, w in
                    zip(Bs, As, [w for a, w in zip(adapters, WEIGHTS) if name in a])]
            ws = [w for a, w in zip(adapters, WEIGHTS) if name in a]
            sign = torch.where(sum(w * t for w, t in zip(ws, taus)) >= 0, 1.0, -1.0)
            agree = [torch.sign(w * t) == sign for w, t in zip(ws, taus)]
            merged = sum(torch.where(a, w * t, 0) for a, w, t in zip(agree, ws, taus))
            merged = merged / sum(a * w for a, w in zip(agree, ws))
            expected = merged * (sum(float((B @ A).norm()) for B, A in zip(Bs, As)) / len(Bs)) / merged.norm()
            U, S, Vh = svd(expected)  # the dense TIES result is refit at rank Σ r_t
            k = result[name].rank
            expected = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]
        assert rel(dense(result[name]), expected) < 1e-5


def test_core_dare_at_density_one_is_the_exact_sum(adapters: list[Adapter]) -> None:
    weights = [0.7, -0.4, 1.1]
    exact = adaptools.combine(adapters, weights)
    merged, report = adaptools.combine(adapters, weights, method="core_dare", density=1.0, seed=9)
    for name in SHAPES:
        expected = sum(w * dense(a[name]) for a, w in zip(adapters, weights) if name in a)
        assert rel(dense(merged[name]), expected) < 1e-9
        assert rel(dense(merged[name]), dense(exact[name])) < 1e-5  # today's combine runs in float32
        assert merged[name].rank <= exact[name].rank
    assert report.worst_rel_error < 1e-6


def test_core_dare_seed_reproduces_and_batching_does_not_matter(adapters: list[Adapter]) -> None:
    def run(seed: int, **kw):
        return core_merge(adapters, None, "core_dare", density=0.5, seed=seed, **kw)[0]

    first, again, other, single = run(4), run(4), run(5), run(4, max_elements=1)
    for name in SHAPES:
        assert torch.equal(first[name].B, again[name].B) and torch.equal(first[name].A, again[name].A)
        assert rel(dense(single[name]), dense(first[name])) < 1e-10
        assert rel(dense(other[name]), dense(first[name])) > 1e-3


def test_rank_policies_apply_last(adapters: list[Adapter]) -> None:
    name = "l0.q"
    expected = reference(adapters, WEIGHTS, name, "core_ties", density=0.5)
    U, S, Vh = svd(expected)
    result, report = adaptools.combine(adapters, WEIGHTS, method="core_ties", density=0.5, policy="rank=3")
    assert result[name].rank == report.modules[name].new_rank == 3
    assert rel(dense(result[name]), U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]) < 1e-6
    assert report.modules[name].error == pytest.approx(float(S[3:].norm()), rel=1e-6)
    result, _ = adaptools.combine(adapters, WEIGHTS, method="tsv", policy="energy=0.9")
    tsv = svd(reference(adapters, WEIGHTS, name, "tsv"))[1]
    assert result[name].rank == int(((tsv**2).cumsum(0) / (tsv**2).sum() < 0.9 - 1e-12).sum()) + 1
    result, _ = adaptools.combine(adapters, WEIGHTS, method="core_ties", density=0.5, policy="budget=600")
    assert sum(m.rank * (m.in_features + m.out_features) for _, m in result.items()) <= 600


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", CORE)
def test_cuda_matches_cpu(adapters: list[Adapter], method: str) -> None:
    cpu, _ = adaptools.combine(adapters, WEIGHTS, method=method, calibrate="pico", device="cpu", **OPTIONS.get(method, {}))
    gpu, _ = adaptools.combine(adapters, WEIGHTS, method=method, calibrate="pico", device="cuda", **OPTIONS.get(method, {}))
    for name in SHAPES:
        assert rel(dense(gpu[name]), dense(cpu[name])) < 1e-8


def test_zero_and_single_tasks() -> None:
    """A freshly initialised LoRA (B = 0) merges to zero; one adapter alone under iso_c keeps its singular vectors."""
    zero = make_adapter(5, 4, 1.0, {"x": (12, 9)})
    zero = zero.with_modules({"x": LoraModule(A=zero["x"].A, B=torch.zeros(12, 4, dtype=torch.float64))})
    for method in CORE:
        result, report = adaptools.combine([zero, zero], None, method=method, **OPTIONS.get(method, {}))
        assert float(dense(result["x"]).abs().max()) == 0 and report.modules["x"].norm == 0
    one = make_adapter(6, 3, 1.0, {"x": (12, 9)})
    result, _ = adaptools.combine([one], None, method="iso_c")
    U, S, Vh = svd(dense(one["x"]))
    assert rel(dense(result["x"]), S[:3].mean() * U[:, :3] @ Vh[:3]) < 1e-9


def test_float32_inputs_keep_their_dtype(adapters: list[Adapter]) -> None:
    f32 = [a.to(dtype=torch.float32) for a in adapters]
    result, _ = adaptools.combine(f32, WEIGHTS, method="tsv", calibrate="pico")
    expected = reference(adapters, WEIGHTS, "l1.o", "tsv", "pico")
    assert result["l1.o"].dtype == torch.float32 and rel(dense(result["l1.o"]), expected) < 1e-5


@pytest.mark.parametrize("method, options, match", [
    ("core_ties", {}, "needs --density"),
    ("ctm", {"density": 0.5}, "needs --rank"),
    ("ctm", {"density": 0.5, "policy": "energy=0.9"}, "takes --rank"),
    ("tsv", {"density": 0.5}, "--density applies"),
    ("iso_c", {"beta": 0.5}, "--beta applies"),
    ("ties", {"density": 0.5, "beta": 0.5}, "--beta applies"),
    ("core_dare", {"density": 1.5}, "--density must be"),
    ("ctm", {"density": 0.5, "policy": "rank=4", "beta": 2.0}, "--beta must be"),
    ("core_ties", {"density": 0.5, "majority_sign": "frequency"}, "--majority-sign"),
    ("tsv", {"calibrate": "magic"}, "unknown calibration"),
    ("tsvd", {}, "unknown merge method"),
])
def test_bad_options(adapters: list[Adapter], method: str, options: dict, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        adaptools.combine(adapters, None, method=method, **options)


def test_dora_is_refused_with_the_hint(adapters: list[Adapter]) -> None:
    dora = make_adapter(9, 4, 1.0)
    dora = dora.with_modules({n: LoraModule(m.A, m.B, magnitude=torch.ones(m.out_features, dtype=m.A.dtype))
                              for n, m in dora.items()})
    for calibrate in (None, "pico"):
        with pytest.raises(DoraError, match="dora to-lora"):
            adaptools.combine([adapters[0], dora], None, method="tsv", calibrate=calibrate)


# --------------------------------------------------------------------------- CLI


def test_cli_core_methods(runner, peft_pair, tmp_path) -> None:
    from conftest import run_cli

    a, b = peft_pair
    res = run_cli(runner, "combine", a, b, "--weights", "0.7,0.5", "--method", "ctm", "--rank", "3", "--density", "0.5",
                  "--beta", "0.5", "--calibrate", "pico", "--layout", "compact", "-o", tmp_path / "ctm")
    assert res.exit_code == 0, res.output + res.stderr
    assert "ctm, rank=3, pico" in res.stdout
    loaded = [adaptools.load(a), adaptools.load(b)]
    expected, _ = adaptools.combine(loaded, [0.7, 0.5], method="ctm", density=0.5, beta=0.5, policy="rank=3",
                                    calibrate="pico")
    written = adaptools.load(tmp_path / "ctm")
    assert set(written.modules) == set(expected.modules) and max(written.ranks.values()) <= 3
    for name, module in expected.items():
        assert rel(dense(written[name]), dense(module)) < 1e-5
    res = run_cli(runner, "combine", a, b, "--method", "tsv", "--energy", "0.99", "-o", tmp_path / "tsv")
    assert res.exit_code == 0, res.output + res.stderr
    assert "tsv, energy=0.99" in res.stdout


@pytest.mark.parametrize("args, option", [
    (["--method", "ctm", "--density", "0.3"], "--rank"),
    (["--method", "core_ties"], "--density"),
    (["--method", "ctm", "--rank", "2"], "--density"),
    (["--method", "iso_c", "--beta", "0.3"], "--beta"),
])
def test_cli_required_options(runner, peft_pair, tmp_path, args: list[str], option: str) -> None:
    from conftest import run_cli

    a, b = peft_pair
    res = run_cli(runner, "combine", a, b, *args, "-o", tmp_path / "out")
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and option in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
