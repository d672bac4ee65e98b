"""diffusers LoRA files (what `load_lora_weights` reads), in each key style diffusers has written (DESIGN §11).

Key styles, after an optional component prefix (`unet.`, `transformer.` for Flux/SD3, `text_encoder.`,
`text_encoder_2.`) and with `.processor.` dropped, as diffusers' `convert_unet_state_dict_to_peft` does:
- attention processors: `<attn>.to_{q,k,v,out}_lora.{down,up}.weight` on `to_q`/`to_k`/`to_v`/`to_out.0`
  (text encoders: `q_proj`/`k_proj`/`v_proj`/`out_proj`);
- `<path>.lora.{down,up}.weight` and `<path>.lora_linear_layer.{down,up}.weight`;
- PEFT-style `<path>.lora_A.weight` / `.lora_B.weight` (`.lora_B.bias`, `.lora_magnitude_vector`) without a config.
down = A (r, in[, k..]), up = B (out, r[, 1..]); scale = alpha / r with alpha from `<path>.alpha`, else from the
`lora_adapter_metadata` JSON (a LoraConfig, per component `unet.r`, `unet.lora_alpha`, ...) in the safetensors
metadata, else alpha = r (scale 1, what diffusers >= 0.40 assumes).

Module paths: the denoiser's (UNet or transformer) modules are named as in its own checkpoint (no prefix), so the
adapter merges into that checkpoint; text-encoder modules keep their `text_encoder.` / `text_encoder_2.` prefix.
"""
from __future__ import annotations

import re
from pathlib import Path

from torch import Tensor

from ..adapter import Adapter, LoraModule
from ..errors import AdapterFormatError
from ..jsonio import check_fields, json_object, parse_json
from .layout import uniform_rank
from .peft import PREFIX as PEFT_PREFIX
from .peft import CONFIG_FIELDS, NULLABLE_FIELDS, lora_module, module_state
from .folders import weights_in
from .tensors import read_tensor_file, safetensors_header, write_safetensors

NAME = "diffusers"
WRITES_FILE = True
WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
METADATA_KEY = "lora_adapter_metadata"
DENOISERS = ("unet", "transformer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS = DENOISERS + TEXT_ENCODERS
UNET_BLOCKS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding", "add_embedding")
"""Module paths only a UNet has: an adapter without a recorded denoiser is written for `unet.` when it has them."""

SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "bias",
    ".lora_magnitude_vector": "magnitude",
    ".lora.down.weight": "A",
    ".lora.up.weight": "B",
    ".lora_linear_layer.down.weight": "A",
    ".lora_linear_layer.up.weight": "B",
    ".alpha": "alpha",
}
PROCESSOR = re.compile(r"^(?:(.*)\.)?(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
PROCESSOR_TARGETS = {"to_q": ("to_q", "q_proj"), "to_k": ("to_k", "k_proj"), "to_v": ("to_v", "v_proj"),
                     "to_out": ("to_out.0", "out_proj")}
"""Old attention-processor names → (UNet/transformer module, text-encoder module), as diffusers maps them."""


def parse_key(key: str) -> tuple[str | None, str, str] | None:
    """(component or None, module path within it, role) of a diffusers LoRA key; None for any other key."""
    head, _, rest = key.partition(".")
    component = head if head in COMPONENTS and rest else None
    path = (rest if component else key).replace(".processor.", ".")
    old = PROCESSOR.match(path)
    if old:
        attention, projection, direction = old.groups()
        target = PROCESSOR_TARGETS[projection][component in TEXT_ENCODERS]
        module = f"{attention}.{target}" if attention else target
        return component, module, "A" if direction == "down" else "B"
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if path.endswith(suffix) and len(path) > len(suffix):
            module, role = path[: -len(suffix)], SUFFIXES[suffix]
            if role == "magnitude" and module.endswith(".to_out"):  # diffusers: `.to_out.lora_magnitude_vector`
                module += ".0"
            return component, module, role
    return None


def weights_of(path: Path) -> Path | None:
    """The weights file of a diffusers LoRA folder (pytorch_lora_weights.*) or the file itself."""
    return weights_in(path, WEIGHT_NAMES)


def is_diffusers_key(key: str) -> bool:
    """True for a LoRA factor key in one of diffusers' styles (PEFT's own `base_model.model.` keys excluded)."""
    parsed = parse_key(key)
    return not key.startswith(PEFT_PREFIX) and parsed is not None and parsed[2] in ("A", "B")


def detect(path: Path) -> bool:
    """A safetensors file (or a folder with pytorch_lora_weights.*) holding LoRA keys in a diffusers style."""
    weights = weights_of(path)
    if weights is None:
        return False
    if weights.name == WEIGHT_NAMES[1]:  # a pickle: its keys are read only if allowed
        return True
    header = safetensors_header(weights)
    return header is not None and any(is_diffusers_key(k) for k in header[0])


def check_metadata_config(config: dict, source: Path) -> None:
    """AdapterFormatError unless a `lora_adapter_metadata` LoraConfig has PEFT's field types and is a LoRA."""
    check_fields(config, CONFIG_FIELDS, f"{source}: {METADATA_KEY}", AdapterFormatError, nullable=NULLABLE_FIELDS)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterFormatError(f"{str(source)!r}: {METADATA_KEY} says peft_type {config['peft_type']!r}, not LORA")


def component_configs(metadata: dict[str, str], source: Path) -> dict[str | None, dict]:
    """The LoraConfig of each component from the `lora_adapter_metadata` JSON (key None: one unprefixed config)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    value = json_object(parse_json(raw, f"{source}: {METADATA_KEY}", AdapterFormatError), METADATA_KEY, str(source),
                        AdapterFormatError)
    configs: dict[str | None, dict] = {}
    for key, item in value.items():
        head, _, rest = key.partition(".")
        if head in COMPONENTS and rest:
            configs.setdefault(head, {})[rest] = item
        else:
            configs.setdefault(None, {})[key] = item
    return configs


def module_name(component: str | None, module: str) -> str:
    """The adapter's name of a module: denoiser paths bare, text-encoder paths with their component prefix."""
    return f"{component}.{module}" if component in TEXT_ENCODERS else module


def read(path: Path, *, allow_pickle: bool = False, scale: float | None = None, alpha: float | None = None) -> Adapter:
    """A diffusers LoRA file: every style above, scale from alpha keys, the metadata, or alpha = r."""
    weights = weights_of(path)
    if weights is None:
        raise AdapterFormatError(f"{str(path)!r} has no {' or '.join(WEIGHT_NAMES)}")
    tensors, metadata = read_tensor_file(weights, allow_pickle=allow_pickle)
    configs = component_configs(metadata, weights)
    grouped: dict[tuple[str | None, str], dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = parse_key(key)
        if parsed is None:
            raise AdapterFormatError(f"{str(weights)!r}: unexpected key {key!r} in a diffusers LoRA file")
        component, module, role = parsed
        grouped.setdefault((component, module), {})[role] = tensor
    denoisers = {c for c, _ in grouped if c in DENOISERS}
    if len(denoisers) > 1:
        raise AdapterFormatError(f"{str(weights)!r} holds LoRA for both a UNet and a transformer")
    modules: dict[str, LoraModule] = {}
    for (component, module), parts in grouped.items():
        if "A" not in parts and "B" not in parts:
            raise AdapterFormatError(f"{str(weights)!r}: {module!r} has an alpha but no LoRA factors")
        config = dict(configs.get(component) or configs.get(None) or {})
        check_metadata_config(config, weights)
        if "alpha" in parts:
            alpha_value = parts.pop("alpha")
            if alpha_value.numel() != 1:
                raise AdapterFormatError(f"{str(weights)!r}: the alpha of {module!r} is not one number")
            config = {"lora_alpha": float(alpha_value.item())}
        config["use_dora"] = "magnitude" in parts
        try:
            modules[module_name(component, module)] = lora_module(module, parts, config)
        except (TypeError, ValueError, AttributeError, re.error) as exc:
            raise AdapterFormatError(f"{str(weights)!r}: {METADATA_KEY} has invalid LoRA settings ({exc})") from exc
    if not modules:
        raise AdapterFormatError(f"{str(weights)!r} holds no LoRA tensors")
    adapter = Adapter(modules=modules, config={"diffusers": {"denoiser": next(iter(denoisers), None)}},
                      source_format=NAME, name=weights.stem if path.is_file() else path.name)
    adapter.check_finite()
    return adapter


def denoiser_of(adapter: Adapter) -> str:
    """The denoiser prefix to write: the one read, else `unet` for UNet block paths, else `transformer`."""
    recorded = (adapter.config.get("diffusers") or {}).get("denoiser")
    if recorded in DENOISERS:
        return recorded
    return "unet" if any(name.startswith(UNET_BLOCKS) for name in adapter.modules) else "transformer"


def write(adapter: Adapter, file: Path) -> None:
    """PEFT-style keys with component prefixes, as diffusers' `load_lora_weights` takes them; one rank and scale 1
    (each module's scale folded into lora_B), so every diffusers version computes the scale meant (alpha = r)."""
    if adapter.extra:
        raise AdapterFormatError(f"diffusers LoRA files cannot hold full tensors ({', '.join(sorted(adapter.extra)[:3])}); use --to peft")
    denoiser = denoiser_of(adapter)
    state: dict[str, Tensor] = {}
    for name, m in uniform_rank(adapter).items():
        if m.kind == "embedding" or m.fan_in_fan_out:
            what = "an embedding" if m.kind == "embedding" else "a fan_in_fan_out layer"
            raise AdapterFormatError(f"module {name!r}: diffusers LoRA files cannot hold {what}; use --to peft")
        key = name if name.split(".", 1)[0] in TEXT_ENCODERS else f"{denoiser}.{name}"
        state.update(module_state(key, m))
    write_safetensors(state, file)
