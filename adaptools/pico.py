"""Pico calibration (DESIGN §18), around any merge method: damp the directions of B that many tasks share, merge,
then restore the update's size.

Per module with T tasks (the adapters that hold it), [B̃_1 … B̃_T] = U·diag(σ)·Wᵀ (B̃_t = w_t·s_t·B_t; one batched
QR and an R × R SVD per chunk of same-shape modules) gives α_j = 1/(1 + (T − 1)·σ_j²/Σσ²); before the merge
B_t ← B_t + U·diag(α − 1)·Uᵀ·B_t (in the core space: M_t ← diag(α)·M_t); after it, ΔW (before any re-rank) is
scaled by mean_t ‖w_t·ΔW_t‖_F / ‖ΔW‖_F with the uncalibrated task updates (the reference code's Python-API path).
LoRA biases are not calibrated.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .adapter import Adapter, LoraModule, plan_combination
from .device import resolve_device
from .errors import InvalidArgumentError
from .linalg import accurate_svd, lapack_threads
from .methods import chunks, merge_keys, stacked_factors
from .rerank import RerankReport

CALIBRATIONS: tuple[str, ...] = ("pico",)
MAX_CALIBRATION_ELEMENTS = 2**23
"""Most elements of one chunk's stacked factors (64 MiB in float64)."""


@dataclass(frozen=True)
class Calibration:
    """The inputs with calibrated B factors, and per module the target ‖ΔW‖_F = mean_t ‖w_t·ΔW_t‖_F."""

    adapters: list[Adapter]
    targets: dict[str, float]


def check_calibration(calibrate: str | None) -> None:
    """InvalidArgumentError for an unknown calibration."""
    if calibrate is not None and calibrate not in CALIBRATIONS:
        raise InvalidArgumentError(f"unknown calibration {calibrate!r} (choose from {', '.join(CALIBRATIONS)})")


def product_norm(B: Tensor, A: Tensor) -> Tensor:
    """‖B @ A‖_F of (..., m, r) and (..., r, n) without the product: sqrt(Σ (BᵀB) ⊙ (AAᵀ))."""
    return ((B.mT @ B) * (A @ A.mT)).sum((-2, -1)).clamp_min(0).sqrt()


def pico_calibrate(adapters: Sequence[Adapter], weights: Sequence[float] | None = None, *,
                   device: str | torch.device = "auto",
                   max_elements: int = MAX_CALIBRATION_ELEMENTS) -> Calibration:
    """Calibrate every module's B factors (module doc); factors come back in float32 (float64 for float64 inputs),
    scales, weights and everything else unchanged. Raises as `combine` does for its inputs (DoRA, layouts, weights)."""
    planned = plan_combination(adapters, weights, "calibrate (pico)", full_tensors="drop")
    adapters = planned.adapters
    dev = resolve_device(device)
    keys = merge_keys(planned.terms)
    sizes = {name: sum(ranks) * (m + n) for name, (m, n, ranks, _) in keys.items()}
    calibrated: dict[tuple[int, str], Tensor] = {}
    targets: dict[str, float] = {}
    for names in chunks(keys, sizes, max_elements):
        terms = planned.terms[names[0]]
        Bs, As = stacked_factors(planned.terms, names, dev, torch.float64)
        Bs = [B * t.weight for B, t in zip(Bs, terms)]
        stacked = torch.cat(Bs, dim=-1)
        with lapack_threads(stacked):
            Q, R = torch.linalg.qr(stacked)
        Uc, S, _ = accurate_svd(R)
        U = Q @ Uc
        energy = S.square()
        total = energy.sum(-1, keepdim=True)
        alpha = 1 / (1 + (len(terms) - 1) * energy / torch.where(total == 0, torch.ones_like(total), total))
        norms = torch.stack([product_norm(B, A) for B, A in zip(Bs, As)]).mean(0).tolist()
        targets.update(zip(names, norms))
        holders = [[i for i, a in enumerate(adapters) if name in a] for name in names]
        for t in range(len(terms)):
            raw = torch.stack([planned.terms[name][t].module.B for name in names]).to(dev, torch.float64)
            new = raw + U @ ((alpha - 1).unsqueeze(-1) * (U.mT @ raw))
            for j, name in enumerate(names):
                calibrated[(holders[j][t], name)] = new[j].cpu()
    result = []
    for i, adapter in enumerate(adapters):
        modules = {}
        for name, module in adapter.items():
            work = torch.promote_types(module.dtype, torch.float32)
            modules[name] = replace(module, B=calibrated[(i, name)].to(work), A=module.A.to(work))
        result.append(adapter.with_modules(modules))
    return Calibration(result, targets)


def pico_rescale(result: Adapter, report: RerankReport | None, targets: dict[str, float]) -> tuple[Adapter, RerankReport | None]:
    """Scale each merged module's ΔW by targets[name] / ‖ΔW‖_F (the report's norm, taken before any re-rank, or the
    factors' own); the report's norms and errors scale with it."""
    modules: dict[str, LoraModule] = {}
    entries = {}
    for name, module in result.items():
        norm = (report.modules[name].norm if report is not None
                else abs(module.scale) * float(product_norm(module.B.double(), module.A.double())))
        factor = targets[name] / norm if norm > 0 else 1.0
        modules[name] = replace(module, B=(module.B.double() * factor).to(module.B.dtype))
        if report is not None:
            entry = report.modules[name]
            entries[name] = replace(entry, norm=entry.norm * factor, error=entry.error * factor)
    scaled = result.with_modules(modules)
    scaled.check_finite("pico calibration")
    return scaled, None if report is None else RerankReport(f"{report.policy}, pico", entries)


__all__ = ["CALIBRATIONS", "Calibration", "check_calibration", "product_norm", "pico_calibrate", "pico_rescale"]
