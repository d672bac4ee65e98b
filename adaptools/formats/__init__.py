"""Adapter file formats as a registry of families: each family module reads (and maybe writes) one kind of file.

A family module exposes `NAME`, `detect(path) -> bool` (cheap: names, configs, safetensors headers),
`read(path, *, allow_pickle=False, scale=None, alpha=None) -> Adapter` and, where the family can be written,
`write(adapter, target)` with `WRITES_FILE` (True for one file, False for a folder). `load_adapter` asks
the families of `FAMILIES` in order, so a more specific family comes before a general one (LyCORIS before
kohya); a new family is one module plus one line in `FAMILIES`.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from ..adapter import Adapter, has_kohya_names, register_writer
from ..atomic import atomic_output
from ..errors import InvalidArgumentError
from . import diffusers, ia3, kohya, lycoris, mlx, peft, peft_lycoris
from ..checkpoints import Container, open_container
from .kohya import remap_to_base
from .tensors import require_exists
from .unsupported import unsupported_error
from .layout import written_layout

FAMILIES: tuple[ModuleType, ...] = (
    mlx,
    peft_lycoris,
    ia3,
    peft,
    lycoris,
    diffusers,
    kohya,
)
"""Adapter families, most specific first: the first whose `detect` accepts a path reads it."""

WRITERS: dict[str, ModuleType] = {f.NAME: f for f in FAMILIES if hasattr(f, "write")}
FORMATS: tuple[str, ...] = tuple(WRITERS)
"""Names of the formats adaptools writes (`save_adapter(..., format=...)`, `convert --to`)."""


def detect_family(path: str | os.PathLike) -> ModuleType:
    """The family module that reads `path`; UnsupportedAdapterError or AdapterFormatError saying what it is otherwise."""
    path = require_exists(path)
    for family in FAMILIES:
        if family.detect(path):
            return family
    raise unsupported_error(path)


def detect_format(path: str | os.PathLike) -> str:
    """The name of the family that reads `path` ("peft", "kohya", "mlx", "diffusers", ...)."""
    return detect_family(path).NAME


def load_adapter(path: str | os.PathLike, allow_pickle: bool = False,
                 base: str | os.PathLike | Container | None = None, *,
                 scale: float | None = None, alpha: float | None = None) -> Adapter:
    """Read an adapter of any registered family; with `base` (a local path, or a container: adaptools.sources opens
    a Hub base for its names), kohya module names are mapped to the base's paths.

    `scale` / `alpha` set the scale where the file does not record it (PEFT weights without a config,
    mlx-examples .npz archives); families that record it ignore them.
    """
    if scale is not None and alpha is not None:
        raise InvalidArgumentError("pass --scale or --alpha, not both")
    adapter = detect_family(path).read(Path(path), allow_pickle=allow_pickle, scale=scale, alpha=alpha)
    if base is not None and has_kohya_names(adapter):
        container = base if isinstance(base, Container) else open_container(base)
        return remap_to_base(adapter, container.names.kohya_names())
    return adapter


def default_format(adapter: Adapter) -> str:
    """The format an adapter is written in by default: the family it was read from where adaptools writes that
    family (kohya stays kohya, mlx stays mlx), else kohya for kohya module names (a LyCORIS file), else "peft"."""
    if adapter.source_format in WRITERS:
        return adapter.source_format
    return "kohya" if has_kohya_names(adapter) else "peft"


def save_adapter(adapter: Adapter, path: str | os.PathLike, format: str = "peft", overwrite: bool = False,
                 layout: str = "portable", pad_rank: int | None = None) -> None:
    """Write `adapter` atomically in `format` (one of FORMATS): a folder or a file, as the family writes it.

    PEFT folders are written in `layout` (adaptools.formats.layout): "portable" pads every module to one rank
    (`pad_rank`, default the largest) so that every consumer reads it alike; "compact" keeps per-module ranks.
    kohya files carry one alpha per module and are never padded: `layout="compact"` or `pad_rank` there is an error.
    """
    family = WRITERS.get(format)
    if family is None:
        raise InvalidArgumentError(f"unknown adapter format {format!r} (choose {', '.join(FORMATS)})")
    if not adapter.modules:
        raise InvalidArgumentError("the adapter holds no LoRA modules: there is nothing to write")
    if family is not kohya and has_kohya_names(adapter):
        raise InvalidArgumentError(
            f"kohya module names cannot be written as {format} without the base checkpoint: pass --base (base=...) "
            "to map them"
        )
    adapter = written_layout(adapter, format, layout, pad_rank)
    with atomic_output(path, overwrite=overwrite, is_file=family.WRITES_FILE) as out:
        family.write(adapter, out)


register_writer(save_adapter)

__all__ = ["FAMILIES", "FORMATS", "default_format", "detect_family", "detect_format", "load_adapter", "save_adapter"]
