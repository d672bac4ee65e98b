"""What a merge reports: its outputs, sizes, time, peak memory and, for NF4/FP8 outputs of an NF4/FP8 base, how
much of each update survives requantization."""
from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

LOW_SURVIVAL = 0.5
"""Below this fraction of ΔW surviving requantization, a module's merge into a quantized base is mostly erased."""


def peak_rss() -> int:
    """Peak resident memory of this process in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class MergeReport:
    """What a merge wrote: output folders, modules merged per output, sizes, time and peak memory; for NF4/FP8
    outputs the weights stored quantized and, from an NF4/FP8 base, per output and module the fraction of ΔW that
    survives requantization (⟨deq(Q(W + ΔW)) − W, ΔW⟩ / ‖ΔW‖², W the dequantized base)."""

    outputs: dict[str, Path]
    modules: dict[str, int]
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss: int
    peak_device_memory: int | None
    device: str
    dtype: str | None
    quantized: int = 0
    survival: dict[str, dict[str, float]] = field(default_factory=dict)
    base: str = ""
    """What the base is (its container's label: "hf folder", "sdxl single file", ...)."""
    output_files: bool = False
    """True when each output is one file (a single-file checkpoint or GGUF), not a folder."""

    def to_dict(self) -> dict:
        """The report as JSON-able data (paths as strings)."""
        data = asdict(self)
        data["outputs"] = {name: str(path) for name, path in self.outputs.items()}
        return data


def survival_warnings(report: MergeReport) -> list[str]:
    """One message per output where some module keeps less than LOW_SURVIVAL of its ΔW after requantization."""
    messages = []
    label = (report.dtype or "nf4").upper()
    for name, kept in report.survival.items():
        low = [v for v in kept.values() if v < LOW_SURVIVAL]
        if low:
            mean = sum(kept.values()) / len(kept)
            advice = (f"merge into the original fp16/bf16 base and quantize after the merge (adaptools merge BASE "
                      f"ADAPTER --dtype {label.lower()})" if label in ("NF4", "FP8") else
                      "merge into a higher-precision file (F16, BF16, Q8_0) and quantize after the merge "
                      "(llama-quantize)")
            messages.append(
                f"{name}: {label + ' ' if label in ('NF4', 'FP8') else ''}requantization keeps less than "
                f"{LOW_SURVIVAL:.0%} of ΔW in {len(low)} of {len(kept)} modules (mean {mean:.0%}); {advice}"
            )
    return messages
