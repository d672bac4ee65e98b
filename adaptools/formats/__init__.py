"""Adapter file formats: detect, load and save PEFT folders and kohya files."""
from __future__ import annotations

import os

from ..adapter import Adapter
from ..atomic import atomic_output
from ..errors import AdapterFormatError, InvalidArgumentError
from .checkpoint import BaseCheckpoint
from . import ia3, lycoris, peft_lycoris
from .kohya import PREFIXES, is_kohya, read_kohya, remap_to_base, write_kohya
from .peft import CONFIG_NAME, read_peft, write_peft
from .tensors import PICKLE_SUFFIXES, read_safetensors, require_exists

FORMATS = ("peft", "kohya")


def detect_format(path: str | os.PathLike) -> str:
    """"peft" for a PEFT folder or a weights file with adapter_config.json beside it, "kohya" for lora_down/lora_up files."""
    path = require_exists(path)
    if peft_lycoris.detect(path):
        return peft_lycoris.NAME
    if ia3.detect(path):
        return ia3.NAME
    if path.is_dir():
        if (path / CONFIG_NAME).exists():
            return "peft"
        raise AdapterFormatError(f"{str(path)!r} is not an adapter folder: it has no {CONFIG_NAME}")
    if lycoris.detect(path):
        return lycoris.NAME
    if path.suffix not in PICKLE_SUFFIXES:
        keys = read_safetensors(path)[0].keys()
        if is_kohya(keys):
            return "kohya"
    if (path.parent / CONFIG_NAME).exists():
        return "peft"
    raise AdapterFormatError(
        f"{str(path)!r} is neither a kohya LoRA file nor PEFT weights with {CONFIG_NAME} beside them"
    )


def load_adapter(path: str | os.PathLike, allow_pickle: bool = False, base: str | os.PathLike | None = None) -> Adapter:
    """Load a PEFT or kohya adapter; with `base`, kohya module names are mapped to the base's module paths."""
    family = detect_format(path)
    if family == "peft":
        return read_peft(path, allow_pickle=allow_pickle)
    if family == peft_lycoris.NAME:
        return peft_lycoris.read(path, allow_pickle=allow_pickle)
    if family == ia3.NAME:
        return ia3.read(path, allow_pickle=allow_pickle)
    adapter = lycoris.read(path, allow_pickle=allow_pickle) if family == lycoris.NAME else read_kohya(path, allow_pickle)
    return remap_to_base(adapter, BaseCheckpoint(base).keys()) if base is not None else adapter


def save_adapter(adapter: Adapter, path: str | os.PathLike, format: str = "peft", overwrite: bool = False) -> None:
    """Write `adapter` atomically: a PEFT folder, or a kohya .safetensors file."""
    if format not in FORMATS:
        raise InvalidArgumentError(f"unknown adapter format {format!r} (choose {' or '.join(FORMATS)})")
    if format == "peft" and any(name.startswith(PREFIXES) for name in adapter.modules):
        raise InvalidArgumentError(
            "kohya module names cannot be written as PEFT without the base checkpoint: pass --base (base=...) to map them"
        )
    with atomic_output(path, overwrite=overwrite, is_file=format == "kohya") as out:
        if format == "peft":
            write_peft(adapter, out)
        else:
            write_kohya(adapter, out)


__all__ = ["BaseCheckpoint", "FORMATS", "detect_format", "load_adapter", "save_adapter"]
