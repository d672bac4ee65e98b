"""Plain-data summaries of adapters, diffusion checkpoints and GGUF files (what `info --json` prints)."""
from __future__ import annotations

import math
import os
from pathlib import Path

from gguf import LlamaFileType

from .adapter import Adapter
from .checkpoints import LOCAL, Container, Files
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


def gguf_summary(path: str | os.PathLike, files: Files = LOCAL) -> dict:
    """What a GGUF file holds, from its validated header (read through `files`: a Hub file's fetched by HTTP Range
    requests): architecture, file type, tensor types with counts and bytes, parameters and size."""
    header = files.gguf_header(Path(path))
    types: dict[str, dict[str, int]] = {}
    for tensor in header.tensors.values():
        entry = types.setdefault(tensor.type.name, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += tensor.nbytes
    file_type = header.get("general.file_type")
    return {
        "format": "gguf",
        "version": header.version,
        "type": header.get("general.type"),
        "architecture": header.architecture,
        "name": header.get("general.name"),
        "file_type": LlamaFileType(file_type).name if file_type in set(LlamaFileType) else file_type,
        "tensors": len(header.tensors),
        "parameters": sum(math.prod(t.shape) for t in header.tensors.values()),
        "size": header.size,
        "types": dict(sorted(types.items(), key=lambda item: -item[1]["bytes"])),
    }


def checkpoint_summary(container: Container) -> dict:
    """A diffusion checkpoint (single file or pipeline folder): what it is, its family, and per component the
    tensors, parameters and parameters per stored dtype, as JSON-ready data."""
    components = {c.name: {"tensors": c.tensors, "parameters": c.parameters, "dtypes": c.dtypes}
                  for c in container.components()}
    return {"container": container.label, "family": container.family,
            "parameters": sum(c["parameters"] for c in components.values()), "components": components}
