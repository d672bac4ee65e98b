"""A single-file diffusion checkpoint (SD1.x/SD2.x/SDXL in the LDM layout, Flux in the BFL layout) as a base:
its key list, shapes and dtypes from the safetensors header alone, the model family, its components, and the name
map (`names_diffusion.DiffusionNames`) adapters' module paths resolve through. A merge writes one file with the
same keys, dtypes and `__metadata__`.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import BaseMismatchError
from ..formats.checkpoint import BaseCheckpoint, read_header
from ..formats.tensors import safetensors_header
from .names_diffusion import (CLIP_PREFIXES, OPEN_CLIP_PREFIXES, UNET_PREFIX, VAE_PREFIX, DiffusionNames, flux_prefix)

DIFFUSION_HEADS = (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.", "conditioner.embedders.", "double_blocks.",
                   "single_blocks.", "joint_blocks.")
"""Key prefixes that mark a file as a single-file diffusion checkpoint (then its family must be known)."""


def detect(path: Path) -> bool:
    """A .safetensors file (not a folder) whose keys are in an original diffusion layout (read from its header)."""
    if not path.is_file() or path.suffix != ".safetensors":
        return False
    header = safetensors_header(path)
    return header is not None and any(key.startswith(DIFFUSION_HEADS) for key in header[0])


def component_of(key: str, family: str) -> str:
    """The diffusers component a stored key belongs to: unet / transformer, text_encoder(_2), vae, or other."""
    if family == "flux":
        return "transformer" if not key.startswith((VAE_PREFIX, "text_encoders.")) else "other"
    if key.startswith(UNET_PREFIX):
        return "unet"
    if key.startswith(VAE_PREFIX):
        return "vae"
    for prefix, component in {**CLIP_PREFIXES, **OPEN_CLIP_PREFIXES}.items():
        if key.startswith(prefix):
            return component
    return "other"


@dataclass(frozen=True)
class Component:
    """One component of a checkpoint: its tensors, parameters and dtypes (safetensors names, with counts)."""

    name: str
    tensors: int
    parameters: int
    dtypes: dict[str, int]


class SingleFile(BaseCheckpoint):
    """A single-file diffusion checkpoint read from its header: family, components, `names` (a DiffusionNames)."""

    output_is_file = True

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        super().__init__(path)
        if not path.is_file():
            raise BaseMismatchError(f"{str(path)!r} is not a single-file checkpoint")
        self.file = path
        _, self.metadata = read_header(path)
        self.names = DiffusionNames({k: self.shape(k) for k in self.keys()})
        self.family = self.names.family
        self.label = f"{self.family} single file"

    @property
    def config(self) -> dict:
        """A single file carries no config.json."""
        return {}

    def components(self) -> list[Component]:
        """The checkpoint's components in a fixed order, with their parameter counts and dtypes."""
        grouped: dict[str, list[str]] = {}
        for key in self.keys():
            grouped.setdefault(component_of(key, self.family), []).append(key)
        order = ("unet", "transformer", "text_encoder", "text_encoder_2", "vae", "other")
        return [Component(name, len(keys), sum(math.prod(self.shape(k)) for k in keys), dtype_counts(self, keys))
                for name in order if (keys := grouped.get(name))]

    def denoiser_prefix(self) -> str:
        """The key prefix of the denoiser's tensors ("" for a Flux file without `model.diffusion_model.`)."""
        return (flux_prefix(self.keys()) or "") if self.family == "flux" else UNET_PREFIX


def dtype_counts(ckpt: BaseCheckpoint, keys: Iterable[str]) -> dict[str, int]:
    """safetensors dtype name → number of parameters stored in it."""
    counts: dict[str, int] = {}
    for key in keys:
        counts[ckpt.dtype_name(key)] = counts.get(ckpt.dtype_name(key), 0) + math.prod(ckpt.shape(key))
    return counts


def open(path: str | os.PathLike) -> SingleFile:  # noqa: A001 (the CONTAINERS interface: detect / open)
    return SingleFile(path)
