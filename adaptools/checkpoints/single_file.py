"""A single-file diffusion checkpoint (SD1.x/SD2.x/SDXL in the LDM layout, Flux in the BFL layout) as a base:
its key list, shapes and dtypes from the safetensors header alone, the model family, its components, and the name
map (`names_diffusion.DiffusionNames`) adapters' module paths resolve through. A merge writes one file with the
same keys, dtypes and `__metadata__`.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from typing import Any

import torch

from ..errors import InputNotFoundError, InvalidArgumentError
from .codecs import CODECS, choose_codecs, decoder_for
from .container import LOCAL, Container, Files
from .names_diffusion import CLIP_PREFIXES, OPEN_CLIP_PREFIXES, UNET_PREFIX, VAE_PREFIX, DiffusionNames
from .safetensors_io import TensorInfo
from .shards import Layout, OutputSink

NAME = "single-file"
RECIPE_RESERVE = 16384
"""Header bytes kept free in a single-file output for the recipe the CLI stores in its metadata afterwards."""

DIFFUSION_HEADS = (UNET_PREFIX, VAE_PREFIX, "cond_stage_model.", "conditioner.embedders.", "double_blocks.",
                   "single_blocks.", "joint_blocks.")
"""Key prefixes that mark a file as a single-file diffusion checkpoint (then its family must be known)."""


def detect(path: Path, files: Files = LOCAL) -> bool:
    """A .safetensors file (not a folder) whose keys are in an original diffusion layout, read from its header: a
    header that is not valid is an error here, the first time it is read (a Hub file's is fetched once)."""
    if path.suffix != ".safetensors" or not files.has(path):
        return False
    infos, _ = files.header(path)
    return any(key.startswith(DIFFUSION_HEADS) for key in infos)


def component_of(key: str, family: str) -> str:
    """The diffusers component a stored key belongs to: unet / transformer, text_encoder(_2), vae, or other."""
    if key.startswith(VAE_PREFIX):
        return "vae"
    for prefix, component in {**CLIP_PREFIXES, **OPEN_CLIP_PREFIXES}.items():
        if key.startswith(prefix):
            return component
    if key.startswith("text_encoders."):
        return "other"
    if family in ("flux", "sd3"):
        return "transformer"
    return "unet" if key.startswith(UNET_PREFIX) else "other"


@dataclass(frozen=True)
class Component:
    """One component of a checkpoint: its tensors, parameters and dtypes (safetensors names, with counts)."""

    name: str
    tensors: int
    parameters: int
    dtypes: dict[str, int]


class DiffusionContainer(Container):
    """A diffusion checkpoint of safetensors files (single file or pipeline): its `family`, `components()`, and the
    codec registry's decoder and codecs."""

    family = "unknown"

    def components(self) -> list[Component]:
        raise NotImplementedError

    def decoder(self) -> Any:
        return decoder_for(self)

    def codecs(self, dtype: str | torch.dtype | None, *, device: torch.device, **options: Any) -> tuple[Any, Any]:
        """The registry's codecs for a float output dtype; quantized encodings (NF4, ...) are refused: SD tools and
        diffusers read these checkpoints' weights as floats."""
        if isinstance(dtype, str) and any(dtype.lower() in codec.TARGETS for codec in CODECS):
            raise InvalidArgumentError(f"a {self.label} is written in a float dtype (fp16, bf16 or fp32): --dtype "
                                       f"{dtype} does not apply")
        return choose_codecs(self, dtype, device=device, **options)


class SingleFile(DiffusionContainer):
    """A single-file diffusion checkpoint read from its header: family, components, `names` (a DiffusionNames).
    Outputs are one file with the same keys, dtypes and `__metadata__` (tensors no adapter changes copied as
    stored)."""

    output_is_file = True

    def __init__(self, path: str | os.PathLike, files: Files = LOCAL):
        path = Path(path)
        if not files.has(path):
            raise InputNotFoundError(f"base {str(path)!r} is not a file")
        super().__init__(path.parent, [path.name], files)
        self.read_shards()
        self.file = path
        self.names = DiffusionNames({k: self.shape(k) for k in self.keys()})
        self.family = self.names.family
        self.label = f"{self.family} single file"

    def components(self) -> list[Component]:
        """The checkpoint's components in a fixed order, with their parameter counts and dtypes."""
        grouped: dict[str, list[str]] = {}
        for key in self.keys():
            grouped.setdefault(component_of(key, self.family), []).append(key)
        order = ("unet", "transformer", "text_encoder", "text_encoder_2", "vae", "other")
        return [Component(name, len(keys), sum(math.prod(self.shape(k)) for k in keys),
                          dtype_parameters(self.info(k) for k in keys)) for name in order if (keys := grouped.get(name))]

    def plan_layout(self, units: Sequence[tuple[dict[str, int], str]], max_shard_bytes: int | None) -> Layout:
        """One file holding every output key (its name is given when the output opens)."""
        if max_shard_bytes is not None:
            raise InvalidArgumentError("a single-file checkpoint is merged into one file: --max-shard-size does not "
                                       "apply")
        return Layout({self.file.name: {k: n for entries, _ in units for k, n in entries.items()}}, False)

    def open_output(self, folder: Path, encoder: Any, layout: Layout, *, hash_inputs: bool = False,
                    skip: Sequence[str] = ()) -> OutputSink:
        """The output file `folder` (a path to write): the base's `__metadata__`, room for a recipe."""
        (sizes,) = layout.files.values()
        return OutputSink(folder.parent, Layout({folder.name: sizes}, False), metadata=self.metadata[self.file.name],
                          reserve=RECIPE_RESERVE)


def dtype_parameters(infos: Iterable[TensorInfo]) -> dict[str, int]:
    """safetensors dtype name → number of parameters stored in it, over tensor infos."""
    counts: dict[str, int] = {}
    for info in infos:
        counts[info.dtype] = counts.get(info.dtype, 0) + math.prod(info.shape)
    return counts
