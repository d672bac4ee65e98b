"""What per-module fit reports (rerank, DoRA → LoRA, merge methods) share: overall and worst relative error."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol


class ModuleError(Protocol):
    """One module's fit: norm = ‖ΔW‖_F, error = ‖ΔW − ΔW_k‖_F, rel_error = error / norm."""

    norm: float
    error: float
    rel_error: float


class ErrorSummary:
    """Mixin for reports with a `modules` mapping of ModuleError entries."""

    modules: Mapping[str, ModuleError]

    @property
    def worst_rel_error(self) -> float:
        """Largest ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F over modules (0 for an empty report)."""
        return max((m.rel_error for m in self.modules.values()), default=0.0)

    @property
    def rel_error(self) -> float:
        """Relative error over all modules together: sqrt(Σ error² / Σ ‖ΔW‖²) (0 when every ΔW is 0)."""
        total = sum(m.norm**2 for m in self.modules.values())
        return math.sqrt(sum(m.error**2 for m in self.modules.values()) / total) if total > 0 else 0.0
