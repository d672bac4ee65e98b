"""What per-module fit reports (rerank, DoRA → LoRA, merge methods) share: the fit of one module, and the
overall and worst relative error of a report."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


def relative(error: float, norm: float) -> float:
    """error / norm, 0 when norm is 0 (an all-zero ΔW is fitted exactly)."""
    return error / norm if norm > 0 else 0.0


@dataclass(frozen=True, kw_only=True)
class ModuleFitError:
    """How a rank-k factorisation fits one (out × in) module: norm = ‖ΔW‖_F, error = ‖ΔW − ΔW_k‖_F,
    rel_error = error / norm, retained_energy = ‖ΔW_k‖²_F / ‖ΔW‖²_F (1 − rel_error² for a truncated SVD)."""

    out_features: int
    in_features: int
    norm: float
    error: float
    rel_error: float
    retained_energy: float


class ErrorSummary:
    """Mixin for reports with a `modules` mapping of ModuleFitError entries."""

    modules: Mapping[str, ModuleFitError]

    @property
    def worst_rel_error(self) -> float:
        """Largest ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F over modules (0 for an empty report)."""
        return max((m.rel_error for m in self.modules.values()), default=0.0)

    @property
    def rel_error(self) -> float:
        """Relative error over all modules together: sqrt(Σ error² / Σ ‖ΔW‖²) (0 when every ΔW is 0)."""
        total = sum(m.norm**2 for m in self.modules.values())
        return math.sqrt(relative(sum(m.error**2 for m in self.modules.values()), total))
