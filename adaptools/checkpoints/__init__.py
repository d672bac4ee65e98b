"""Base checkpoints (DESIGN §14): containers (how a base is stored: a Hugging Face folder, ...), name maps (where
an adapter module's update lands in one) and codecs (how stored tensors decode to float32 and merged ones encode
back). The merge engine, extract, dora and spectrum read every base through `open_container`.

A container module has `NAME`, `detect(path, files=LOCAL) -> bool` and a class taking the path (and the `Files`
its safetensors files are found through, where it reads any); `CONTAINERS` lists them in
the order they are tried (the most specific first). A new container is a new module listed there.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import gguf, hf_folder, pipeline, single_file
from .container import LOCAL, Container, Files
from .gguf import GGUFFile
from .hf_folder import HFFolder
from .pipeline import Pipeline
from .single_file import SingleFile
from .names import NameMap, Target

CONTAINERS: list[tuple[Any, type[Container]]] = [(gguf, GGUFFile), (single_file, SingleFile), (pipeline, Pipeline),
                                                 (hf_folder, HFFolder)]
"""(module, container class) pairs, tried in order; the Hugging Face folder comes last (it takes any folder)."""

DIFFUSION_CONTAINERS = (single_file, pipeline)
"""Container modules of diffusion checkpoints (they have `components()` and `family`)."""

BaseCheckpoint = HFFolder
"""The Hugging Face folder container under its earlier name."""


def is_diffusion_checkpoint(path: str | os.PathLike, files: Files = LOCAL) -> bool:
    """True for a single-file diffusion checkpoint or a diffusers pipeline folder (what `info` describes as a base),
    found through `files`."""
    path = Path(path)
    return (path.exists() or files.has(path)) and any(module.detect(path, files) for module in DIFFUSION_CONTAINERS)


def open_container(path: str | os.PathLike, files: Files = LOCAL) -> Container:
    """The container of a local base path: the first of CONTAINERS whose `detect` takes it (a folder or file that
    none takes is opened as a Hugging Face folder, whose reader says what is wrong with it). With `files` other
    than LOCAL (a Hub base opened for names: its weights are not on disk, their headers are fetched), the
    container lists keys, shapes and dtypes and maps names, but reads no tensor."""
    path = Path(path)
    for module, cls in CONTAINERS:
        if (path.exists() or files.has(path)) and module.detect(path, files):
            return cls(path, files)
    return HFFolder(path, files)


__all__ = ["BaseCheckpoint", "CONTAINERS", "Container", "Files", "LOCAL", "GGUFFile", "HFFolder", "NameMap", "Target",
           "open_container", "Pipeline", "SingleFile", "is_diffusion_checkpoint"]
