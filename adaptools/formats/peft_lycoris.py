"""PEFT's own LOHA and LOKR adapter types (adapter_config.json `peft_type`), read into exact LoRA factors.

Keys `base_model.model.<path>.hada_w1_a` etc. hold LyCORIS's tensors (formats/lycoris.py does the math); the scale
is PEFT's: alpha_m / r_m from `alpha` / `r` and `alpha_pattern` / `rank_pattern` (PEFT's matching rule), for LoKr
too when both factors are full. `use_effective_conv2d`, `decompose_both` and `decompose_factor` show in the stored
tensors (Tucker cores, a decomposed first factor, the factor shapes), which are read as they are.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from ..adapter import Adapter
from ..errors import AdapterFormatError, AdaptoolsError, ShapeMismatchError, UnsupportedAdapterError
from .lycoris import LOHA_ROLES, LOKR_ROLES, ScaleRule, loha_modules, lokr_modules
from ..jsonio import (boolean, finite_number, mapping_of, positive_int, positive_number, read_json_object,
                      string_or_strings)
from .folders import CONFIG_NAME, group_keys, read_folder
from .peft import check_patterns, pattern_value

NAME = "peft-lycoris"
TYPES = {"LOHA": LOHA_ROLES, "LOKR": LOKR_ROLES}


def peft_type(path: Path) -> str | None:
    """The upper-cased `peft_type` of the adapter_config.json in (or beside) `path`, None when there is none."""
    folder = path if path.is_dir() else path.parent
    try:
        config = read_json_object(folder / CONFIG_NAME, AdapterFormatError) if (folder / CONFIG_NAME).is_file() else {}
    except AdaptoolsError:
        return None
    value = config.get("peft_type")
    return value.upper() if isinstance(value, str) else None


def detect(path: Path) -> bool:
    """A PEFT folder (or its weights file) whose config says LOHA or LOKR."""
    return peft_type(Path(path)) in TYPES


def config_scale(config: dict) -> ScaleRule:
    """PEFT's scale of a LoHa/LoKr module: alpha_m / r_m (patterns first); a stored rank other than r_m raises."""

    def scale(name: str, parts: Mapping[str, Tensor], rank: int | None) -> float:
        r = pattern_value(config.get("rank_pattern") or {}, name, config.get("r", rank))
        alpha = pattern_value(config.get("alpha_pattern") or {}, name, config.get("alpha", r))
        try:
            r, alpha = int(r), float(alpha)
        except (TypeError, ValueError) as exc:
            raise AdapterFormatError(f"module {name!r}: r={r!r} and alpha={alpha!r} are not numbers") from exc
        if r <= 0:
            raise AdapterFormatError(f"module {name!r}: the config gives r={r}")
        if rank is not None and rank != r:
            raise ShapeMismatchError(f"module {name!r} has rank {rank} in its tensors but the config says r={r}")
        return alpha / r

    return scale


CONFIG_FIELDS = {
    "r": positive_int,
    "alpha": finite_number,
    "rank_pattern": mapping_of(positive_int),
    "alpha_pattern": mapping_of(positive_number),
    "target_modules": string_or_strings,
    "use_effective_conv2d": boolean,
    "decompose_both": boolean,
}
"""Keys of a LoHa/LoKr adapter_config.json that adaptools reads, with their checks."""


def read(path: Path, *, allow_pickle: bool = False, scale: float | None = None, alpha: float | None = None) -> Adapter:
    """Read a PEFT LoHa or LoKr adapter folder (or its weights file)."""
    folder = read_folder(path, CONFIG_FIELDS, nullable=("target_modules", "rank_pattern", "alpha_pattern"),
                         check=check_patterns, allow_pickle=allow_pickle)
    kind = str(folder.config.get("peft_type")).upper()
    roles = TYPES[kind]

    def split(key: str) -> tuple[str, str | None]:
        module, _, role = key.rpartition(".")
        return (module, role) if role in roles else (key, None)

    grouped, extra = group_keys(folder.tensors, split)
    if not grouped:
        raise AdapterFormatError(f"{str(folder.weights_path)!r} holds no {kind} tensors")
    for module, parts in grouped.items():
        if kind == "LOKR" and "lokr_w2" in parts and parts["lokr_w2"].ndim == 3:
            raise UnsupportedAdapterError(
                f"module {module!r}: PEFT's LoKr on a Conv1d layer with a full second factor (lokr_w2 of shape "
                f"{tuple(parts['lokr_w2'].shape)}) is not supported: PEFT builds its ΔW by reshaping a Kronecker "
                "product of unequal dimensions, which is not kron(W1, W2)"
            )
    build = loha_modules if kind == "LOHA" else lokr_modules
    modules = build(grouped, config_scale(folder.config))
    adapter = Adapter(
        modules={name: modules[name] for name in grouped},
        extra=extra,
        base_model=folder.config.get("base_model_name_or_path"),
        config=folder.config,
        source_format=f"peft-{kind.lower()}",
        name=folder.name,
    )
    adapter.check_finite()
    return adapter
