"""Plain-data summaries of adapters and diffusion checkpoints (what `info --json` prints)."""
from __future__ import annotations

from .adapter import Adapter
from .checkpoints import Container
from .ia3 import IA3Adapter


def adapter_summary(adapter: Adapter) -> dict:
    """Format, base model, DoRA flag, parameter count and per-module rank/scale/shape/params, as JSON-ready data."""
    return {
        "format": adapter.source_format,
        "base_model": adapter.base_model,
        "dora": adapter.is_dora,
        "num_params": adapter.num_params,
        "extra": sorted(adapter.extra),
        "modules": {
            name: {
                "kind": m.kind,
                "rank": m.rank,
                "scale": m.scale,
                "out_features": m.out_features,
                "in_features": m.in_features,
                "weight_shape": list(m.weight_shape),
                "params": m.num_params,
                "dora": m.is_dora,
                "dtype": str(m.dtype).removeprefix("torch."),
            }
            for name, m in adapter.items()
        },
    }


def ia3_summary(adapter: IA3Adapter) -> dict:
    """Format, base model, parameter count and per module the side its vector scales, as JSON-ready data."""
    return {
        "format": adapter.source_format,
        "base_model": adapter.base_model,
        "num_params": adapter.num_params,
        "extra": sorted(adapter.extra),
        "modules": {
            name: {
                "kind": m.kind,
                "scales": "input" if m.feedforward else "output",
                "features": len(m.vector),
                "dtype": str(m.vector.dtype).removeprefix("torch."),
            }
            for name, m in adapter.items()
        },
    }


def checkpoint_summary(container: Container) -> dict:
    """A diffusion checkpoint (single file or pipeline folder): what it is, its family, and per component the
    tensors, parameters and parameters per stored dtype, as JSON-ready data."""
    components = {c.name: {"tensors": c.tensors, "parameters": c.parameters, "dtypes": c.dtypes}
                  for c in container.components()}
    return {"container": container.label, "family": container.family,
            "parameters": sum(c["parameters"] for c in components.values()), "components": components}
