"""SVD re-rank of LoRA modules (DESIGN §5): ΔW = s·B@A → best rank-k B'@A' with scale 1, batched by shape.

The factored SVD of `adaptools.linalg` never forms ΔW; same-shape modules are stacked (a bounded
number per call) and decomposed by one batched torch call. The error of keeping k singular values
is known exactly from the spectrum: ‖ΔW − ΔW_k‖_F = sqrt(Σ_{i>=k} s_i²).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor

from .adapter import Adapter, LoraModule, refuse_dora
from .errors import InvalidArgumentError
from .linalg import RankPolicy, balanced_factors, choose_ranks, factored_svd, group_by, select_ranks, truncation_error
from .report import ErrorSummary, ModuleFitError

MAX_STACK_ELEMENTS = 2**23
"""Most elements of the stacked B and A of one batched SVD call (32 MiB in float32): bounds the working memory."""

Progress = Callable[[int], None]


@dataclass(frozen=True, kw_only=True)
class ModuleRerank(ModuleFitError):
    """What re-ranking did to one module: ranks, ‖ΔW‖_F, the exact error ‖ΔW − ΔW_k‖_F and its relative value."""

    old_rank: int
    new_rank: int

    @property
    def params_before(self) -> int:
        return self.old_rank * (self.out_features + self.in_features)

    @property
    def params_after(self) -> int:
        return self.new_rank * (self.out_features + self.in_features)


@dataclass(frozen=True)
class RerankReport(ErrorSummary):
    """Per-module results of a re-rank under one policy (`to_dict()` gives JSON-ready data)."""

    policy: str
    modules: dict[str, ModuleRerank] = field(default_factory=dict)

    @property
    def params_before(self) -> int:
        return sum(m.params_before for m in self.modules.values())

    @property
    def params_after(self) -> int:
        return sum(m.params_after for m in self.modules.values())

    def to_dict(self) -> dict:
        """{"policy", "worst_rel_error", "params_before", "params_after", "modules": {name: {...}}}."""
        return {
            "policy": self.policy,
            "worst_rel_error": self.worst_rel_error,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "modules": {name: asdict(m) for name, m in self.modules.items()},
        }


@dataclass(frozen=True)
class FactorStack:
    """Same-shape modules stacked for one batched SVD: ΔW_j = B[j] @ A[j] (scales folded into B), float32."""

    names: list[str]
    B: Tensor  # (g, m, r)
    A: Tensor  # (g, r, n)


def resolve_policy(policy: RankPolicy | str | None = None, **options: float | None) -> RankPolicy:
    """The one rank policy given: a RankPolicy, a spec such as "energy=0.99", or exactly one keyword option."""
    given = [k for k, v in options.items() if v is not None]
    if policy is None:
        return RankPolicy.from_options(**options)
    if given:
        raise InvalidArgumentError(f"give either a policy or one of {', '.join(options)}, not both")
    return RankPolicy.parse(policy) if isinstance(policy, str) else policy


def policy_text(policy: RankPolicy) -> str:
    """"kind=value" with integers shown without a decimal point."""
    value = policy.value
    return f"{policy.kind}={int(value) if float(value).is_integer() else value:g}"


def stack_chunks(shapes: Mapping[str, tuple[int, int, int]]) -> Iterator[list[str]]:
    """Names grouped by (m, r, n), in chunks of at most MAX_STACK_ELEMENTS stacked elements."""
    for (m, r, n), names in group_by(shapes).items():
        step = max(1, MAX_STACK_ELEMENTS // max(1, r * (m + n)))
        for start in range(0, len(names), step):
            yield names[start:start + step]


def module_stacks(modules: Mapping[str, LoraModule]) -> Callable[[], Iterator[FactorStack]]:
    """A re-iterable source of FactorStacks of `modules`, with each scale folded into B."""
    shapes = {name: (m.out_features, m.rank, m.in_features) for name, m in modules.items()}

    def stacks() -> Iterator[FactorStack]:
        for names in stack_chunks(shapes):
            scales = torch.tensor([modules[n].scale for n in names], dtype=torch.float32).view(-1, 1, 1)
            B = torch.stack([modules[n].B for n in names]).float() * scales
            A = torch.stack([modules[n].A for n in names]).float()
            yield FactorStack(names, B, A)

    return stacks


def truncate_stacks(stacks: Callable[[], Iterable[FactorStack]], policy: RankPolicy, *,
                    device: str | torch.device = "auto",
                    progress: Progress | None = None) -> dict[str, tuple[Tensor, Tensor, ModuleRerank]]:
    """Best rank-k factors (B' = U√S, A' = √S Vᵀ) and a ModuleRerank per module, k chosen by `policy`.

    `stacks()` is called once, or twice for the global budget policy (spectra first, then factors),
    so at most one stack's SVD is held at a time. Factors come back in float32 on the stacks' device.
    """
    budget: dict[str, int] | None = None
    if policy.kind == "budget":
        spectra, shapes = {}, {}
        for stack in stacks():
            S = factored_svd(stack.B, stack.A, device=device).S
            for j, name in enumerate(stack.names):
                spectra[name], shapes[name] = S[j], (stack.B.shape[1], stack.A.shape[2])
        budget = select_ranks(spectra, shapes, policy)
    results: dict[str, tuple[Tensor, Tensor, ModuleRerank]] = {}
    for stack in stacks():
        U, S, Vh = factored_svd(stack.B, stack.A, device=device)
        ks = choose_ranks(S, policy) if budget is None else torch.tensor([budget[n] for n in stack.names])
        error, rel, kept = (t.tolist() for t in truncation_error(S, ks))
        norms = S.double().norm(dim=-1).tolist()
        _, m, r = stack.B.shape
        n = stack.A.shape[2]
        for j, name in enumerate(stack.names):
            k = int(ks[j])
            B, A = balanced_factors(U[j], S[j], Vh[j], k)
            results[name] = (B, A, ModuleRerank(old_rank=r, new_rank=k, out_features=m, in_features=n, norm=norms[j],
                                                error=error[j], rel_error=rel[j], retained_energy=kept[j]))
        if progress is not None:
            progress(len(stack.names))
    return results


def rerank(adapter: Adapter, rank: int | None = None, energy: float | None = None, ratio: float | None = None,
           threshold: float | None = None, budget: int | None = None, *, policy: RankPolicy | str | None = None,
           device: str | torch.device = "auto", dtype: torch.dtype | None = None,
           progress: Progress | None = None) -> tuple[Adapter, RerankReport]:
    """Re-rank every module to the best rank-k approximation of ΔW = s·B@A (Eckart–Young), k by one policy.

    Give exactly one of rank=k, energy=τ, ratio=ρ, threshold=t, budget=N (or policy=RankPolicy / "kind=value");
    the rules are `adaptools.linalg.RankPolicy`'s. Results have scale 1 and balanced factors
    B' = U_k√S_k, A' = √S_k V_kᵀ, in each module's dtype (or `dtype`); a LoRA bias b becomes s·b.
    The SVDs run on `device` in float32 with a float64 core. `progress(n)` is called after each batch of n modules.

    Returns:
        (re-ranked adapter, RerankReport with per module old/new rank and exact error ‖ΔW − ΔW_k‖_F).

    Raises:
        InvalidArgumentError: no policy, several, or a value out of range. DoraError: a DoRA adapter.
    """
    chosen = resolve_policy(policy, rank=rank, energy=energy, ratio=ratio, threshold=threshold, budget=budget)
    refuse_dora(adapter, "re-rank")
    results = truncate_stacks(module_stacks(adapter.modules), chosen, device=device, progress=progress)
    modules = {}
    for name, m in adapter.items():
        B, A, _ = results[name]
        out = dtype or m.dtype
        bias = None if m.bias is None else (m.bias.float() * m.scale).to(out)
        modules[name] = replace(m, A=A.to(out), B=B.to(out), scale=1.0, bias=bias)
    report = RerankReport(policy_text(chosen), {name: results[name][2] for name in adapter.modules})
    return adapter.with_modules(modules), report
