"""kohya-style LoRA files (`lora_down`/`lora_up`/`alpha`, optional `dora_scale`), read and written (DESIGN §4)."""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..adapter import KOHYA_PREFIXES as PREFIXES
from ..adapter import Adapter, LoraModule
from ..bounds import check_expansion, stored_numbers
from ..errors import AdapterFormatError, ShapeMismatchError, UnknownModuleError
from ..linalg import map_by_shape
from ..lycoris_math import tucker_down
from .folders import group_by_role
from .tensors import (PICKLE_SUFFIXES, check_factors, check_magnitude, check_stored, read_tensor_file,
                      safetensors_header, write_safetensors)

NAME = "kohya"
WRITES_FILE = True
DEFAULT_PREFIX = "lora_unet_"
ROLES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid", ".alpha": "alpha",
         ".dora_scale": "dora_scale"}


def is_kohya(keys: Iterable[str]) -> bool:
    """True when the keys look like a kohya LoRA file."""
    return any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys)


def detect(path: Path) -> bool:
    """A safetensors file with lora_down/lora_up keys, or a pickle file (kohya's old .pt/.ckpt; read only if allowed)."""
    if not path.is_file():
        return False
    if path.suffix in PICKLE_SUFFIXES:
        return True
    header = safetensors_header(path)
    return header is not None and is_kohya(header[0])


def read(path: Path, *, allow_pickle: bool = False, scale: float | None = None, alpha: float | None = None) -> Adapter:
    """A kohya LoRA file (every module records its alpha, so `scale`/`alpha` do not apply)."""
    return read_kohya(path, allow_pickle=allow_pickle)


def kohya_name(module: str, prefix: str = DEFAULT_PREFIX) -> str:
    """kohya module name: prefix + the path with `.` replaced by `_`."""
    return prefix + module.replace(".", "_")


def kohya_module(name: str, parts: dict[str, Tensor]) -> LoraModule:
    """One LoraModule from lora_down (r, in[, k..]), lora_up (out, r[, 1..]) and alpha: ΔW = (alpha/r)·up@down
    (a 3x3 LoCon conv is down (r, in, 3, 3) and up (out, r, 1, 1): A = down flattened to (r, in·9))."""
    if "down" not in parts or "up" not in parts:
        raise AdapterFormatError(f"kohya module {name!r} lacks lora_down or lora_up")
    down, up = parts["down"], parts["up"]
    check_factors(name, down, up, ("lora_down", "lora_up"))
    kernel: tuple[int, ...] = tuple(down.shape[2:])
    kind = "conv" if down.ndim > 2 else "linear"
    rank = down.shape[0]
    if "alpha" in parts and parts["alpha"].numel() != 1:
        raise ShapeMismatchError(f"kohya module {name!r}: alpha must be one number, got shape {tuple(parts['alpha'].shape)}")
    alpha = float(parts["alpha"].item()) if "alpha" in parts else 0.0
    alpha = alpha or float(rank)  # kohya: a missing or zero alpha means alpha = r
    return LoraModule(
        A=down.reshape(rank, -1),
        B=up.reshape(up.shape[0], rank),
        scale=alpha / rank,
        kind=kind,
        kernel=kernel,
        magnitude=row_magnitude(name, parts.get("dora_scale"), up.shape[0]),
    )


def row_magnitude(name: str, dora_scale: Tensor | None, out_features: int) -> Tensor | None:
    """A `dora_scale` as PEFT's per-output-row DoRA magnitude (out,), from (out,), (out, 1) or (out, 1, 1, ...).

    LyCORIS's other form, (1, in, ...) (`wd_on_out` false: one norm per input column), is another method and is refused.
    """
    if dora_scale is None:
        return None
    if dora_scale.numel() != out_features or (dora_scale.ndim > 1 and dora_scale.shape[0] != out_features):
        raise AdapterFormatError(
            f"module {name!r}: dora_scale of shape {tuple(dora_scale.shape)} is not one value per output row: "
            "LyCORIS's input-side weight decomposition (wd_on_out false) is another method than PEFT's per-row DoRA "
            "and is not supported"
        )
    magnitude = dora_scale.reshape(-1)
    check_magnitude(name, magnitude, "dora_scale")
    return magnitude


def fold_tucker(name: str, parts: dict[str, Tensor]) -> tuple[Tensor, Tensor] | None:
    """(core, down as (r, in)) of a LoCon module with a `lora_mid` Tucker core, checked; None without a core."""
    if "mid" not in parts:
        return None
    mid, down, up = parts["mid"], parts.get("down"), parts.get("up")
    if down is None or up is None:
        raise AdapterFormatError(f"kohya module {name!r} has lora_mid but lacks lora_down or lora_up")
    if (mid.ndim < 3 or down.ndim < 2 or any(s != 1 for s in down.shape[2:]) or mid.shape[1] != down.shape[0]
            or up.shape[1] != mid.shape[0]):
        raise ShapeMismatchError(
            f"kohya module {name!r}: lora_up {tuple(up.shape)}, lora_mid {tuple(mid.shape)} and lora_down "
            f"{tuple(down.shape)} are not a Tucker LoCon (up (out, r), mid (r, r, *kernel), down (r, in, 1, ...))"
        )
    for role, tensor in (("lora_mid", mid), ("lora_down", down), ("lora_up", up)):
        check_stored(name, role, tensor)
    return mid.float(), down.reshape(down.shape[0], -1).float()


def contract_tucker(grouped: dict[str, dict[str, Tensor]]) -> None:
    """Replace each Tucker LoCon's lora_down and lora_mid by their contraction (r, in, *kernel) (DESIGN §11), in place:
    ΔW = up · (mid ×₂ down) is then an ordinary conv LoRA of the same rank; one einsum per shape, in float32."""
    cores = {name: found for name, parts in grouped.items() if (found := fold_tucker(name, parts)) is not None}
    costs = {name: core.shape[0] * down.shape[1] * math.prod(core.shape[2:]) for name, (core, down) in cores.items()}
    check_expansion(costs, stored_numbers(grouped), "Tucker LoCon")
    for name, (A,) in map_by_shape(cores, tucker_down).items():
        parts = grouped[name]
        mid = parts.pop("mid")
        parts["down"], parts["up"] = A.reshape(A.shape[0], -1, *mid.shape[2:]), parts["up"].float()


def read_kohya(path: str | os.PathLike, allow_pickle: bool = False) -> Adapter:
    """Read a kohya LoRA file; module names stay kohya names until `remap_to_base` maps them to module paths."""
    tensors, metadata = read_tensor_file(path, allow_pickle=allow_pickle)
    grouped = group_by_role(path, tensors, ROLES, "a kohya LoRA file")
    contract_tucker(grouped)
    modules = {name: kohya_module(name, parts) for name, parts in grouped.items()}
    adapter = Adapter(
        modules=modules,
        base_model=metadata.get("ss_sd_model_name") or metadata.get("base_model"),
        config={"metadata": metadata},
        source_format=NAME,
        name=Path(path).stem,
    )
    adapter.check_finite()
    return adapter


def remap_to_base(adapter: Adapter, candidates: Mapping[str, set[str]]) -> Adapter:
    """Rename kohya modules to the base's module paths (`lora_unet_a_b_c` → `a.b_c` as the base spells it), through
    `candidates` (kohya name → module paths: a base's `names.kohya_names()`); a name that already is a path stays."""
    paths = {m for found in candidates.values() for m in found}
    renamed: dict[str, LoraModule] = {}
    sources: dict[str, str] = {}
    missing, ambiguous, shared = [], [], []
    for name, module in adapter.modules.items():
        found = {name} if name in paths else set(candidates.get(name, ()))
        if not found:
            missing.append(name)
        elif len(found) > 1:
            ambiguous.append(f"{name} ({' or '.join(sorted(found))})")
        elif (path := found.pop()) in sources:  # SDXL: lora_te1_x and lora_te2_x on one text-encoder base
            shared.append(f"{sources[path]} and {name} ({path})")
        else:
            renamed[path], sources[path] = module, name
    for problems, what in ((missing, "match no weight of the base"), (ambiguous, "match several weights of the base"),
                           (shared, "map to the same weight of the base (one text encoder per base: merge lora_te1_ "
                                    "and lora_te2_ modules into their own encoders)")):
        if problems:
            shown = ", ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise UnknownModuleError(f"{len(problems)} kohya module(s) {what}: {shown}")
    return adapter.with_modules(renamed)


def unstorable(m: LoraModule) -> str | None:
    """What of `m` a kohya file cannot hold (an embedding, a transposed fan_in_fan_out layer, a LoRA bias), or None."""
    if m.kind == "embedding":
        return "an embedding LoRA"
    if m.fan_in_fan_out:
        return "a fan_in_fan_out (transposed weight) layer"
    if m.bias is not None:
        return "a LoRA bias"
    return None


def kohya_prefixes(modules: Iterable[str], prefix: str) -> dict[str, str]:
    """Module path prefix → kohya prefix: diffusers text-encoder components (`text_encoder.` → `lora_te_`, or
    `lora_te1_` beside a `text_encoder_2.` → `lora_te2_`), and "" → `prefix` for the rest (the denoiser)."""
    second = any(m.startswith("text_encoder_2.") for m in modules)
    return {"text_encoder_2.": "lora_te2_", "text_encoder.": "lora_te1_" if second else "lora_te_", "": prefix}


def kohya_state_dict(adapter: Adapter, prefix: str = DEFAULT_PREFIX) -> dict[str, Tensor]:
    """kohya keys for `adapter`: lora_down = A, lora_up = B, alpha = scale·r (so alpha/r is the scale)."""
    state: dict[str, Tensor] = {}
    prefixes = kohya_prefixes(adapter.modules, prefix)
    named: dict[str, str] = {}
    for module, m in adapter.modules.items():
        reason = unstorable(m)
        if reason:
            raise AdapterFormatError(f"module {module!r}: kohya files cannot hold {reason}; use --to peft")
        head = next(h for h in prefixes if module.startswith(h))
        name = module if module.startswith(PREFIXES) else kohya_name(module[len(head):], prefixes[head])
        if name in named:
            raise AdapterFormatError(f"modules {named[name]!r} and {module!r} both become the kohya name {name!r} "
                                     "(kohya replaces '.' by '_'): a kohya file cannot hold both; use --to peft")
        named[name] = module
        down = m.A.reshape(m.rank, -1, *m.kernel) if m.kind == "conv" else m.A
        up = m.B.reshape(*m.B.shape, *([1] * len(m.kernel)))
        state[f"{name}.lora_down.weight"] = down
        state[f"{name}.lora_up.weight"] = up
        state[f"{name}.alpha"] = torch.tensor(m.scale * m.rank, dtype=torch.float32)
        if m.magnitude is not None:
            state[f"{name}.dora_scale"] = m.magnitude.reshape(-1, 1)
    if adapter.extra:
        raise AdapterFormatError(
            f"kohya files cannot hold full tensors ({', '.join(sorted(adapter.extra)[:3])}); use --to peft"
        )
    return state


def write(adapter: Adapter, file: Path, prefix: str = DEFAULT_PREFIX) -> None:
    """Write `adapter` as one kohya safetensors file."""
    write_safetensors(kohya_state_dict(adapter, prefix), file)
