"""A diffusers pipeline folder (`model_index.json` and one folder per component) as a base: the components
adapters may change (`unet/` or `transformer/`, `text_encoder/`, `text_encoder_2/`) are its tensors, keyed
`<component>/<key>`; an output is the same pipeline with those components merged and every other file copied, so
it loads with the pipeline's `from_pretrained`.

Module paths: the denoiser's own (`down_blocks.0...`, `transformer_blocks.0...`), text-encoder paths with their
component (`text_encoder.text_model.encoder...`, with or without `text_model.`), kohya names by namespace.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import BaseMismatchError, InputNotFoundError, InvalidArgumentError
from ..jsonio import read_json_object
from ..names import plain_name
from .container import LOCAL, Files
from .hf_folder import read_index
from .names import NameMap, Target
from .names_diffusion import TEXT_ENCODERS, kohya_namespace_names, ldm_unet_modules
from .safetensors_io import TensorInfo
from .shards import Layout, OutputSink, copy_side_files, shard_names
from .single_file import Component, DiffusionContainer, dtype_parameters

NAME = "pipeline"
INDEX = "model_index.json"
DENOISERS = ("unet", "transformer")
MERGEABLE = (*DENOISERS, *TEXT_ENCODERS)
"""The components an adapter may change."""
STEMS = ("diffusion_pytorch_model", "model")
"""Weight file stems: diffusers models, transformers models (text encoders)."""
FAMILIES = {"StableDiffusionPipeline": "sd1", "StableDiffusionXLPipeline": "sdxl", "FluxPipeline": "flux",
            "StableDiffusionXLImg2ImgPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3"}


def pipeline_family(index: dict) -> str:
    """The family a model_index.json names by its pipeline class (an SDXL one without CLIP-L: the refiner)."""
    name = index.get("_class_name")
    family = FAMILIES.get(name, str(name)) if isinstance(name, str) else "unknown"
    refiner = family == "sdxl" and index.get("text_encoder") in (None, [None, None]) and "text_encoder_2" in index
    return "sdxl-refiner" if refiner else family


def detect(path: Path, files: Files = LOCAL) -> bool:
    """A folder holding model_index.json."""
    return path.is_dir() and (path / INDEX).is_file()


def component_files(folder: Path, files: Files = LOCAL) -> tuple[str, list[str], bool]:
    """(stem, weight file names, indexed) of one component folder: `<stem>.safetensors` or an index and shards."""
    for stem in STEMS:
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            return stem, read_index(index), True
        if files.has(folder / f"{stem}.safetensors"):
            return stem, [f"{stem}.safetensors"], False
    raise BaseMismatchError(f"{str(folder)!r} holds no diffusion_pytorch_model.safetensors or model.safetensors "
                            "(nor an index of them)")


class PipelineNames(NameMap):
    """Module paths of a pipeline's components → `<component>/<key>` targets."""

    full_tensors = False

    def __init__(self, keys: Sequence[str]):
        super().__init__(keys)
        self._targets: dict[str, Target] = {}
        self._tensors: dict[str, str] = {}
        for key in keys:
            component, _, inner = key.partition("/")
            module, _, param = inner.rpartition(".")
            if component in DENOISERS:
                names = [module]
            else:
                bare = module.removeprefix("text_model.")
                names = [f"{component}.text_model.{bare}", f"{component}.{bare}"]
            for name in names:
                self._tensors[f"{name}.{param}"] = key
                if param == "weight":
                    self._targets[name] = Target(key)
        unet = [key.removeprefix("unet/").removesuffix(".weight") for key in keys
                if key.startswith("unet/") and key.endswith(".weight")]
        self._original = ldm_unet_modules(unet)  # kohya's LDM-style UNet names (SDXL files) → diffusers paths
        for original, module in self._original.items():
            self._targets.setdefault(original, self._targets[module])

    def modules(self) -> list[str]:
        return list(self._targets)

    def target(self, module: str) -> Target | None:
        return self._targets.get(module)

    def key(self, name: str) -> str | None:
        return self._tensors.get(name)

    def kohya_names(self) -> dict[str, set[str]]:
        return kohya_namespace_names(self._targets, self._original)

    def adapter_modules(self, key: str) -> list[tuple[str, tuple[int, int] | None]]:
        """`unet/x.weight` → x; `text_encoder/encoder...weight` → text_encoder.text_model.encoder..."""
        component, _, inner = key.partition("/")
        module = inner.removesuffix(".weight")
        if component in DENOISERS:
            return [(module, None)]
        return [(f"{component}.text_model.{module.removeprefix('text_model.')}", None)]


class Pipeline(DiffusionContainer):
    """A diffusers pipeline folder; its mergeable components' tensors keyed `<component>/<key>`."""

    def __init__(self, path: str | os.PathLike, files: Files = LOCAL):
        path = Path(path)
        if not detect(path):
            raise InputNotFoundError(f"{str(path)!r} is not a diffusers pipeline folder (no {INDEX})")
        self.index = read_json_object(path / INDEX, BaseMismatchError)
        folders = set(files.folders(path))
        self.present = [c for c in MERGEABLE if c in self.index and c in folders]
        if not self.present:
            raise BaseMismatchError(f"{str(path)!r}: {INDEX} names none of {', '.join(MERGEABLE)} with its folder")
        self.layouts: dict[str, tuple[str, bool]] = {}
        shards = []
        for component in self.present:
            stem, names, indexed = component_files(path / component, files)
            self.layouts[component] = (stem, indexed)
            shards += [f"{component}/{plain_name(f, 'a shard file name', BaseMismatchError)}" for f in names]
        super().__init__(path, shards, files)
        self.read_shards()
        self.names = PipelineNames(self.keys())
        self.family = pipeline_family(self.index)
        self.label = f"{self.family} pipeline"

    def read_shards(self) -> None:
        """The components' headers, keys prefixed by their component."""
        for shard in self.shards:
            component = shard.split("/", 1)[0]
            infos, self.metadata[shard] = self.files.header(self.root / shard)
            for key, info in infos.items():
                self.weight_map[f"{component}/{key}"] = shard
                self._info[f"{component}/{key}"] = info

    def components(self) -> list[Component]:
        """Every component folder with safetensors weights (the mergeable ones and the rest: vae, ...)."""
        found = []
        for component in self.files.folders(self.root):
            if component in self.present:
                keys = [k for k in self.keys() if k.startswith(f"{component}/")]
                found.append(Component(component, len(keys), sum(math.prod(self.shape(k)) for k in keys),
                                       dtype_parameters(self.info(k) for k in keys)))
                continue
            try:
                _, names, _ = component_files(self.root / component, self.files)
            except BaseMismatchError:
                continue
            infos = [info for f in names for info in self.files.header(self.root / component / f)[0].values()]
            found.append(Component(component, len(infos), sum(math.prod(i.shape) for i in infos),
                                   dtype_parameters(infos)))
        return found

    def plan_layout(self, units: Sequence[tuple[dict[str, int], str]], max_shard_bytes: int | None) -> Layout:
        """Each component's own shard layout (files named by diffusers / transformers: `<stem>.safetensors` or
        `<stem>-0000i-of-0000n.safetensors`), keyed `<component>/<file>`."""
        if max_shard_bytes is not None:
            raise InvalidArgumentError("a pipeline keeps each component's shard layout: --max-shard-size does not apply")
        files: dict[str, dict[str, int]] = {shard: {} for shard in self.shards}
        for entries, shard in units:
            for key, nbytes in entries.items():
                files[self.weight_map.get(key, shard)][key] = nbytes
        renamed: dict[str, dict[str, int]] = {}
        for component in self.present:
            stem, _ = self.layouts[component]
            mine = [shard for shard in self.shards if shard.startswith(f"{component}/")]
            for shard, name in zip(mine, shard_names(len(mine), stem)):
                renamed[f"{component}/{name}"] = files[shard]
        return Layout(renamed, any(indexed for _, indexed in self.layouts.values()))

    def open_output(self, folder: Path, encoder: Any, layout: Layout, *, hash_inputs: bool = False,
                    skip: Sequence[str] = ()) -> PipelineSink:
        """The output pipeline folder: every file and component folder copied except the merged components'
        weights, which the returned sink writes."""
        folder.mkdir(parents=True, exist_ok=True)
        copy_side_files(self.root, folder, skip=skip, record_digests=hash_inputs, weights=True)
        for sub in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            plain_name(sub.name, "a pipeline component folder", BaseMismatchError)
            if sub.is_symlink() and not sub.resolve().is_relative_to(self.root.resolve()):
                continue
            (folder / sub.name).mkdir()
            copy_side_files(sub, folder / sub.name, record_digests=hash_inputs, weights=sub.name not in self.present,
                            root=self.root)
        sinks = {}
        for component in self.present:
            stem, indexed = self.layouts[component]
            files = {name.split("/", 1)[1]: {k.split("/", 1)[1]: n for k, n in sizes.items()}
                     for name, sizes in layout.files.items() if name.startswith(f"{component}/")}
            sinks[component] = OutputSink(folder / component, Layout(files, indexed),
                                          index_name=f"{stem}.safetensors.index.json")
        return PipelineSink(sinks)


class PipelineSink:
    """The merged components' sinks of one output pipeline, keys `<component>/<key>` routed to theirs."""

    def __init__(self, sinks: Mapping[str, OutputSink]):
        self.sinks = dict(sinks)

    @property
    def total_size(self) -> int:
        return sum(sink.total_size for sink in self.sinks.values())

    def _route(self, key: str) -> tuple[OutputSink, str]:
        component, _, inner = key.partition("/")
        return self.sinks[component], inner

    def write(self, key: str, tensor: Tensor, row: int = 0, rows: int | None = None) -> None:
        sink, inner = self._route(key)
        sink.write(inner, tensor, row, rows)

    def copy(self, key: str, source: Path, info: TensorInfo) -> None:
        sink, inner = self._route(key)
        sink.copy(inner, source, info)

    def close(self, total_parameters: int) -> None:
        for sink in self.sinks.values():
            sink.close(total_parameters)

    def abort(self) -> None:
        for sink in self.sinks.values():
            sink.abort()
