"""PEFT IA3 adapter folders (`peft_type: IA3`, keys `base_model.model.<path>.ia3_l`), read into an IA3Adapter.

`read` (the family's Adapter reader) refuses them with the reason: IA3 is not a LoRA ΔW (adaptools.ia3);
`read_ia3` is what merging and `info` use.
"""
from __future__ import annotations

from pathlib import Path

from torch import Tensor

from ..adapter import Adapter
from ..errors import AdapterFormatError, UnsupportedAdapterError
from ..patterns import UnsafePattern, compile_safe
from ..ia3 import IA3_REFUSAL, IA3Adapter, IA3Module
from .folders import group_keys, read_folder
from .peft_lycoris import peft_type
from ..jsonio import boolean, string_or_strings

NAME = "peft-ia3"
ROLE = ".ia3_l"


def detect(path: Path) -> bool:
    """A PEFT folder (or its weights file) whose config says IA3."""
    return peft_type(Path(path)) == "IA3"


def read(path: Path, *, allow_pickle: bool = False, scale: float | None = None, alpha: float | None = None) -> Adapter:
    """IA3 is not a LoRA update: refused with the reason (merge reads it with `read_ia3`)."""
    raise UnsupportedAdapterError(f"{str(path)!r} is a PEFT IA3 adapter: {IA3_REFUSAL}")


def is_feedforward(config: dict, module: str) -> bool:
    """PEFT's rule: `feedforward_modules` a regex string (full match) or a list of name suffixes (str.endswith)."""
    targets = config.get("feedforward_modules") or []
    if isinstance(targets, str):
        try:
            return compile_safe(targets).fullmatch(module)
        except UnsafePattern as exc:
            raise AdapterFormatError(f"feedforward_modules {targets!r} {exc}") from None
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterFormatError(f"feedforward_modules must be a string or a list of strings, got {targets!r}")
    return any(module.endswith(t) for t in targets)


def ia3_module(module: str, vector: Tensor, config: dict) -> IA3Module:
    """One IA3Module from PEFT's `ia3_l`: (out, 1) or (1, in) for a linear layer, (1, channels, 1, ...) for a conv."""
    feedforward = is_feedforward(config, module)
    shape = tuple(vector.shape)
    if vector.ndim > 2 and shape[0] == 1 and all(s == 1 for s in shape[2:]):
        return IA3Module(vector.reshape(-1), feedforward, kind="conv")
    if vector.ndim == 2 and (shape[0] == 1 if feedforward else shape[1] == 1):
        return IA3Module(vector.reshape(-1), feedforward, fan_in_fan_out=bool(config.get("fan_in_fan_out")))
    side = "(1, in_features) for a feedforward module" if feedforward else "(out_features, 1)"
    raise AdapterFormatError(f"module {module!r}: ia3_l has shape {shape}, expected {side}")


def check_ia3(config: dict, source: str) -> None:
    """AdapterFormatError unless the config is an IA3 adapter's."""
    if str(config.get("peft_type")).upper() != "IA3":
        raise AdapterFormatError(f"{source!r} is not an IA3 adapter config")


def split(key: str) -> tuple[str, str | None]:
    """(module, "ia3_l") of an `ia3_l` key, (key, None) of a full tensor."""
    return (key.removesuffix(ROLE), "ia3_l") if key.endswith(ROLE) else (key, None)


def read_ia3(path: str | Path, allow_pickle: bool = False) -> IA3Adapter:
    """Read a PEFT IA3 adapter folder (or its weights file)."""
    folder = read_folder(path, {"target_modules": string_or_strings, "feedforward_modules": string_or_strings,
                                "fan_in_fan_out": boolean}, nullable=("target_modules", "feedforward_modules"),
                         check=check_ia3, allow_pickle=allow_pickle)
    grouped, extra = group_keys(folder.tensors, split)
    if not grouped:
        raise AdapterFormatError(f"{str(folder.weights_path)!r} holds no ia3_l vectors")
    modules = {module: ia3_module(module, parts["ia3_l"], folder.config) for module, parts in grouped.items()}
    adapter = IA3Adapter(modules, extra, folder.config.get("base_model_name_or_path"), folder.config, name=folder.name)
    adapter.check_finite()
    return adapter
