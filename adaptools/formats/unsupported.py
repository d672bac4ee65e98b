"""Why a path is no adapter that adaptools reads: the error for what no family detects, saying what the path is."""
from __future__ import annotations

from pathlib import Path

from ..errors import AdapterFormatError, UnsupportedAdapterError
from .tensors import safetensors_header, truncation

NO_ADAPTER_FILES = "adapter_config.json (PEFT, mlx-lm), adapters.safetensors or adapters.npz (mlx-lm)"


def describe_keys(keys: list[str]) -> str:
    """What a safetensors file with these keys (and no adapter keys adaptools knows) holds."""
    if keys and all(k.endswith((".weight", ".bias")) for k in keys):
        return "it holds full weights only (a model checkpoint?), no LoRA factors"
    shown = ", ".join(keys[:3]) + (" ..." if len(keys) > 3 else "")
    return f"its keys ({shown or 'none'}) are of no adapter family adaptools reads"


def unsupported_error(path: Path) -> AdapterFormatError:
    """The typed error for a path that no registered family detects."""
    if path.is_dir():
        return AdapterFormatError(f"{str(path)!r} is not an adapter folder: it has none of {NO_ADAPTER_FILES}")
    header = safetensors_header(path)
    if header is None:
        reason = truncation(path)
        if reason:
            return AdapterFormatError(f"{str(path)!r}: {reason} (an interrupted download?)")
        return AdapterFormatError(
            f"{str(path)!r} is not a readable safetensors file, nor an adapter file of another kind adaptools reads"
        )
    return UnsupportedAdapterError(f"{str(path)!r} is not a LoRA adapter adaptools reads: {describe_keys(header[0])}")
