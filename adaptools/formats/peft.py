"""PEFT LoRA folders (adapter_config.json + adapter_model.safetensors), read and written (DESIGN §3); also PEFT
weights saved without their config (ranks from the shapes, the scale from the user or alpha = r)."""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from ..adapter import Adapter, LoraModule
from ..errors import AdapterFormatError, DoraError, RankMismatchError, ShapeMismatchError, UnsupportedAdapterError
from ..patterns import UnsafePattern, first_match, peft_rule
from ..jsonio import (
    boolean,
    booleans,
    check_fields,
    finite_number,
    mapping_of,
    positive_int,
    positive_number,
    string,
    string_or_strings,
)
from .folders import CONFIG_NAME, PREFIX, WEIGHTS_NAMES, adapter_name, group_keys, read_folder, weights_in
from .tensors import (check_factors, check_magnitude, check_stored, read_tensor_file, safetensors_header,
                      write_safetensors)

NAME = "peft"
WRITES_FILE = False
SUPPORTED_TYPES = ("LORA", "ADALORA")
PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "CPT", "ADAPTION_PROMPT")
"""PEFT types whose adapters are learned prompts (virtual tokens), with no weight update to merge."""

# Role of each LoRA key suffix (after the module path).
LORA_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "emb_A",
    ".lora_embedding_B": "emb_B",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
    ".lora_A": "A",  # AdaLoRA stores parameters without `.weight`
    ".lora_B": "B",
    ".lora_E": "E",
    ".ranknum": "ranknum",
}


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: the value of the first key (dict order) with re.match(rf"(.*\\.)?({key})$", module), else default;
    AdapterFormatError for a key whose matching time has no small bound (adaptools.patterns)."""
    try:
        return first_match(patterns, module, default)
    except UnsafePattern as exc:
        raise AdapterFormatError(f"module {module!r}: rank/alpha {exc}") from None


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


CONFIG_FIELDS = {
    "peft_type": string,
    "r": positive_int,
    "lora_alpha": finite_number,
    "use_rslora": boolean,
    "use_dora": boolean,
    "fan_in_fan_out": boolean,
    "target_modules": string_or_strings,
    "rank_pattern": mapping_of(positive_int),
    "alpha_pattern": mapping_of(positive_number),
    "base_model_name_or_path": string,
    "init_r": positive_int,
}
"""Keys of adapter_config.json that adaptools reads, with their checks; AdaLoRA's rank_pattern holds rank masks."""
NULLABLE_FIELDS = ("target_modules", "rank_pattern", "alpha_pattern", "base_model_name_or_path")
"""Keys whose null means absent (PEFT's defaults)."""


def check_config(config: dict, source: str) -> None:
    """A typed error for a key of adapter_config.json of the wrong type (CONFIG_FIELDS), a pattern that is not a
    bounded regular expression, or an unsupported adapter type."""
    peft_type = string(config.get("peft_type", "LORA"), "peft_type", source, AdapterFormatError).upper()
    if peft_type in PROMPT_TYPES:
        raise UnsupportedAdapterError(
            f"{source!r}: PEFT {peft_type} adapters hold virtual tokens, not a weight update, so there is nothing "
            "to combine or merge into the base's weights"
        )
    if peft_type not in SUPPORTED_TYPES:
        raise UnsupportedAdapterError(
            f"unsupported adapter type {peft_type!r} in {source!r}: adaptools handles LoRA, DoRA and AdaLoRA adapters"
        )
    checks = dict(CONFIG_FIELDS, rank_pattern=mapping_of(booleans)) if peft_type == "ADALORA" else CONFIG_FIELDS
    check_fields(config, checks, source, AdapterFormatError, nullable=NULLABLE_FIELDS)
    check_patterns(config, source)


def check_patterns(config: dict, source: str) -> None:
    """AdapterFormatError unless every rank_pattern / alpha_pattern key compiles in PEFT's matching rule with a bound
    on its matching time (adaptools.patterns)."""
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in config.get(key) or {}:
            try:
                peft_rule(pattern)
            except UnsafePattern as exc:
                raise AdapterFormatError(f"{source!r}: {key} key {pattern!r} {exc}") from None


def is_peft_key(key: str) -> bool:
    """True for a key of PEFT's state dict: `base_model.model.<path>.<LoRA role>`."""
    return key.startswith(PREFIX) and split_key(key.removeprefix(PREFIX))[1] is not None


def detect(path: Path) -> bool:
    """A folder with adapter_config.json, or a weights file with PEFT's keys (or unreadable ones) beside it, or
    PEFT-keyed weights without a config (mlx-lm's adapter_config.json is asked for first, by the mlx family)."""
    has_config = (path if path.is_dir() else path.parent).joinpath(CONFIG_NAME).exists()
    if has_config and path.is_dir():
        return True
    weights = weights_in(path, WEIGHTS_NAMES)
    if weights is not None and weights.name == WEIGHTS_NAMES[1]:  # a pickle: its keys are read only if allowed
        return True
    header = safetensors_header(weights) if weights is not None else None
    peft_keys = header is not None and any(is_peft_key(k) for k in header[0])
    return peft_keys or (has_config and header is None)


def split_key(key: str) -> tuple[str, str | None]:
    """(module path, role) of a state-dict key without the `base_model.model.` prefix; role None for full tensors."""
    for suffix in sorted(LORA_SUFFIXES, key=len, reverse=True):
        if key.endswith(suffix):
            return key[: -len(suffix)], LORA_SUFFIXES[suffix]
    return key, None


def adalora_mask(config: dict, module: str) -> list[bool] | None:
    """AdaLoRA's kept-rank mask for `module`: rank_pattern keys are `<module>.lora_E[.<adapter>]`."""
    for key, mask in (config.get("rank_pattern") or {}).items():
        if key.removeprefix(PREFIX).split(".lora_E")[0] == module:
            return mask
    return None


def adalora_factors(parts: dict[str, Tensor], module: str, config: dict) -> tuple[Tensor, Tensor, float]:
    """AdaLoRA as LoRA: ΔW = B · (A ⊙ E) · alpha / (ranknum + 1e-5), with ranknum = init_r (kept by PEFT's pruning)."""
    missing = [name for role, name in (("A", "lora_A"), ("B", "lora_B"), ("E", "lora_E")) if role not in parts]
    if missing:
        raise AdapterFormatError(f"AdaLoRA module {module!r} lacks {', '.join(missing)}")
    A, B, E = parts["A"], parts["B"], parts["E"].reshape(-1)
    check_factors(module, A, B)
    check_stored(module, "lora_E", E)
    if E.shape[0] != A.shape[0]:
        raise RankMismatchError(f"AdaLoRA module {module!r}: lora_A has rank {A.shape[0]} but lora_E has {E.shape[0]} values")
    mask = adalora_mask(config, module)
    if mask is not None and not any(mask):
        raise AdapterFormatError(f"AdaLoRA module {module!r} keeps no rank (its rank_pattern mask is all false): "
                                 "pruning left it no update, and a rank-0 module cannot be written")
    if mask is not None and len(mask) == A.shape[0] != sum(mask):  # saved before pruning: apply the mask
        keep = torch.tensor(mask, dtype=torch.bool)
        A, B, E = A[keep], B[:, keep], E[keep]
    elif mask is not None and sum(mask) != A.shape[0]:
        raise ShapeMismatchError(f"AdaLoRA module {module!r} has rank {A.shape[0]} but its rank_pattern keeps {sum(mask)}")
    init_r = config.get("init_r") or A.shape[0]
    ranknum = float(init_r)
    if "ranknum" in parts:
        stored = parts["ranknum"]
        if stored.numel() != 1 or not math.isfinite(ranknum := float(stored.reshape(-1)[0])) or ranknum <= 0:
            raise AdapterFormatError(f"AdaLoRA module {module!r}: ranknum must be one positive number, got {stored.tolist()}")
    alpha = config.get("lora_alpha") or init_r  # PEFT: lora_alpha if > 0 else r
    return A * E.reshape(-1, 1), B, float(alpha) / (ranknum + 1e-5)


def lora_module(module: str, parts: dict[str, Tensor], config: dict) -> LoraModule:
    """Build one LoraModule from its stored tensors and the config (rank/alpha patterns, rsLoRA, fan_in_fan_out)."""
    if config.get("peft_type", "LORA").upper() == "ADALORA":
        A, B, scale = adalora_factors(parts, module, config)
        return LoraModule(A=A, B=B, scale=scale, fan_in_fan_out=bool(config.get("fan_in_fan_out")))
    kind = "linear"
    if "emb_A" in parts or "emb_B" in parts:
        kind, A, B = "embedding", parts.get("emb_A"), parts.get("emb_B")
    else:
        A, B = parts.get("A"), parts.get("B")
    if A is None or B is None:
        raise AdapterFormatError(f"module {module!r} has only one of its LoRA factors")
    check_factors(module, A, B)
    kernel: tuple[int, ...] = ()
    if A.ndim > 2:
        kind, kernel = "conv", tuple(A.shape[2:])
        A, B = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], B.shape[1])
    rank = A.shape[0]
    expected = pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
    if int(expected) != rank:
        raise ShapeMismatchError(f"module {module!r} has rank {rank} in its tensors but the config says r={expected}")
    alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
    scale = lora_scale(float(alpha), rank, bool(config.get("use_rslora")))
    magnitude = parts.get("magnitude")
    if magnitude is not None:
        check_magnitude(module, magnitude)
    if (magnitude is None) == bool(config.get("use_dora")):
        raise AdapterFormatError(
            f"module {module!r}: the config has use_dora={bool(config.get('use_dora'))} but the module "
            f"{'has no' if magnitude is None else 'has a'} lora_magnitude_vector"
        )
    return LoraModule(
        A=A,
        B=B,
        scale=scale,
        kind=kind,
        fan_in_fan_out=bool(config.get("fan_in_fan_out")) and kind == "linear",
        kernel=kernel,
        magnitude=None if magnitude is None else magnitude.reshape(-1),
        bias=parts.get("bias"),
    )


def group_state(tensors: dict[str, Tensor]) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """PEFT state-dict keys grouped per module ({module: {role: tensor}}), and the full tensors by base key."""
    return group_keys(tensors, split_key)


def build_adapter(source: Path, grouped: dict[str, dict[str, Tensor]], extra: dict[str, Tensor], config: dict,
                  name: str) -> Adapter:
    """The Adapter of grouped PEFT tensors under `config` (errors name `source`)."""
    if not grouped:
        raise AdapterFormatError(f"{str(source)!r} holds no LoRA tensors")
    modules = {module: lora_module(module, parts, config) for module, parts in grouped.items()}
    adapter = Adapter(modules=modules, extra=extra, base_model=config.get("base_model_name_or_path"), config=config,
                      source_format=NAME, name=name)
    adapter.check_finite()
    return adapter


def read_peft(path: str | os.PathLike, allow_pickle: bool = False) -> Adapter:
    """Read a PEFT LoRA/DoRA/AdaLoRA adapter folder (or its weights file) into an Adapter."""
    folder = read_folder(path, {}, check=check_config, allow_pickle=allow_pickle)
    grouped, extra = group_state(folder.tensors)
    return build_adapter(folder.config_path, grouped, extra, folder.config, folder.name)


def read_weights_only(path: Path, *, allow_pickle: bool = False, scale: float | None = None,
                      alpha: float | None = None) -> Adapter:
    """PEFT weights without adapter_config.json: ranks from the shapes; scale = `scale`, or `alpha`/r, or 1
    (alpha = r, with a warning: the scale PEFT trained with is in the missing config)."""
    weights = weights_in(path, WEIGHTS_NAMES)
    if weights is None:
        raise AdapterFormatError(f"{str(path)!r} has neither {CONFIG_NAME} nor {' or '.join(WEIGHTS_NAMES)}")
    tensors, _ = read_tensor_file(weights, allow_pickle=allow_pickle)
    grouped, extra = group_state(tensors)
    dora = any("magnitude" in parts for parts in grouped.values())
    config = {"use_dora": dora} if alpha is None else {"use_dora": dora, "lora_alpha": alpha}
    if scale is None and alpha is None:
        warnings.warn(
            f"{str(weights)!r} has no {CONFIG_NAME}, so its scale is unknown: assuming lora_alpha = r (scale 1); "
            "pass --alpha or --scale (alpha=/scale=) to set it", stacklevel=3
        )
    adapter = build_adapter(weights, grouped, extra, config, adapter_name(path))
    if scale is not None:
        adapter = adapter.with_modules({n: replace(m, scale=float(scale)) for n, m in adapter.items()})
    return adapter


def read(path: Path, *, allow_pickle: bool = False, scale: float | None = None, alpha: float | None = None) -> Adapter:
    """A PEFT adapter: with its config (`scale`/`alpha` do not apply), or weights alone (they set the scale)."""
    folder = path if path.is_dir() else path.parent
    if (folder / CONFIG_NAME).exists():
        return read_peft(path, allow_pickle=allow_pickle)
    return read_weights_only(path, allow_pickle=allow_pickle, scale=scale, alpha=alpha)


ADALORA_ONLY_KEYS = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")


def peft_config(adapter: Adapter) -> dict:
    """adapter_config.json for `adapter` written at scale 1: lora_alpha = r, patterns where ranks differ (DESIGN §3).

    Keys of the source config that still apply are passed through; target_modules lists full module paths.
    """
    dora = [m.is_dora for m in adapter.modules.values()]
    if any(dora) and not all(dora):
        raise DoraError(
            f"PEFT's use_dora applies to every module, but {dora.count(False)} of {len(dora)} modules have no DoRA "
            "magnitude; convert the adapter to DoRA (or to LoRA) first"
        )
    ranks = adapter.ranks
    default_rank = Counter(ranks.values()).most_common(1)[0][0]
    odd = {re.escape(name): r for name, r in ranks.items() if r != default_rank}
    source = adapter.config if adapter.source_format == "peft" else {}
    config = {k: v for k, v in source.items() if k not in ADALORA_ONLY_KEYS}
    config.update(
        peft_type="LORA",
        r=default_rank,
        lora_alpha=default_rank,
        rank_pattern=odd,
        alpha_pattern=dict(odd),
        use_rslora=False,
        use_dora=adapter.is_dora,
        fan_in_fan_out=any(m.fan_in_fan_out for m in adapter.modules.values()),
        target_modules=sorted(adapter.modules),
        lora_bias=any(m.bias is not None for m in adapter.modules.values()),
        base_model_name_or_path=adapter.base_model,
    )
    config.setdefault("modules_to_save", None)
    config.setdefault("task_type", None)
    config.setdefault("bias", "none")
    config.setdefault("inference_mode", True)
    return config


def module_state(key: str, m: LoraModule) -> dict[str, Tensor]:
    """PEFT's tensors of one module under `key` (its full key prefix), with the scale folded into B."""
    state: dict[str, Tensor] = {}
    A, B, ones = m.A, m.B * m.scale, [1] * len(m.kernel)
    if m.kind == "embedding":
        state[f"{key}.lora_embedding_A"], state[f"{key}.lora_embedding_B"] = A, B
    else:
        if m.kind == "conv":
            A, B = A.reshape(m.rank, -1, *m.kernel), B.reshape(*B.shape, *ones)
        state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = A, B
    if m.bias is not None:
        state[f"{key}.lora_B.bias"] = m.bias * m.scale
    if m.magnitude is not None:  # PEFT keeps a conv magnitude as (1, out, 1, ...)
        magnitude = m.magnitude.reshape(1, -1, *ones) if m.kind == "conv" else m.magnitude
        state[f"{key}.lora_magnitude_vector"] = magnitude
    return state


def peft_state_dict(adapter: Adapter) -> dict[str, Tensor]:
    """PEFT's state-dict keys for `adapter` with each module's scale folded into B (written scale is 1)."""
    state: dict[str, Tensor] = {}
    for name, m in adapter.modules.items():
        state.update(module_state(PREFIX + name, m))
    for key, tensor in adapter.extra.items():
        module, param = key.rsplit(".", 1)
        stored = f"{module}.base_layer.{param}" if module in adapter.modules else key
        state[PREFIX + stored] = tensor
    return state


def write(adapter: Adapter, folder: Path) -> None:
    """Write adapter_config.json and adapter_model.safetensors into an (empty) folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(peft_config(adapter), indent=2, sort_keys=True) + "\n")
    write_safetensors(peft_state_dict(adapter), folder / WEIGHTS_NAMES[0])
