"""The Hugging Face folder container: config.json, model.safetensors or shards + model.safetensors.index.json,
tokenizer and other side files (DESIGN §8). Outputs keep the base's shard layout (or re-shard) under
transformers' names, with the side files copied and config.json updated by the encoder."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import BaseMismatchError, InputNotFoundError
from ..jsonio import check_fields, json_object, read_json_object, string
from ..names import plain_name, shown
from .codecs import choose_codecs, decoder_for
from .container import LOCAL, Container, Files
from .shards import INDEX_NAME, SINGLE_NAME, Layout, OutputSink, copy_side_files, plan_shards, shard_names, write_new

NAME = "hf-folder"

CONFIG_FIELDS = {"model_type": string, "_name_or_path": string, "quantization_config": json_object}
"""Keys of a base's config.json that adaptools reads, with their checks (null means absent)."""


def read_index(index: Path) -> list[str]:
    """Shard file names of a model.safetensors.index.json, in first-use order: `weight_map` must map tensor names
    to plain file names (`adaptools.names.plain_name`); BaseMismatchError naming the file and key otherwise."""
    weight_map = read_json_object(index, BaseMismatchError).get("weight_map")
    if not isinstance(weight_map, dict):
        raise BaseMismatchError(f"{str(index)!r}: 'weight_map' must be a JSON object of tensor name -> shard file, "
                                f"got {shown(weight_map)}")
    for key, shard in weight_map.items():
        plain_name(shard, f"{str(index)!r}: the shard of {shown(key)} in 'weight_map'", BaseMismatchError)
    return list(dict.fromkeys(weight_map.values()))


def detect(path: Path, files: Files = LOCAL) -> bool:
    """A folder (or one .safetensors file, read as a one-shard folder)."""
    return path.is_dir() or path.suffix == ".safetensors"


class HFFolder(Container):
    """A Hugging Face model folder read lazily: key → (shard, shape, dtype) without loading tensors."""

    label = "hf folder"

    def __init__(self, path: str | os.PathLike, files: Files = LOCAL):
        path = Path(path)
        if not (path.exists() or files.has(path)):
            raise InputNotFoundError(f"base {str(path)!r} does not exist")
        self._indexed = path.is_dir() and (path / INDEX_NAME).exists()
        super().__init__(path if path.is_dir() else path.parent, self._find_shards(path, files), files)
        self.read_shards()

    @staticmethod
    def _find_shards(path: Path, files: Files) -> list[str]:
        if not path.is_dir():
            return [path.name]
        index = path / INDEX_NAME
        if index.exists():
            return read_index(index)
        if files.has(path / SINGLE_NAME):
            return [SINGLE_NAME]
        found = files.safetensors(path)
        if not found:
            raise BaseMismatchError(f"{str(path)!r} holds no model.safetensors, index or *.safetensors file")
        return found

    @property
    def indexed(self) -> bool:
        return self._indexed

    @property
    def config(self) -> dict:
        """config.json of the base folder, or {} when there is none; the keys adaptools reads are type-checked."""
        cfg = self.root / "config.json"
        if not cfg.exists():
            return {}
        config = read_json_object(cfg, BaseMismatchError)
        check_fields(config, CONFIG_FIELDS, str(cfg), BaseMismatchError, nullable=tuple(CONFIG_FIELDS))
        return config

    def decoder(self) -> Any:
        return decoder_for(self)

    def codecs(self, dtype: str | torch.dtype | None, *, device: torch.device, **options: Any) -> tuple[Any, Any]:
        return choose_codecs(self, dtype, device=device, **options)

    def plan_layout(self, units: Sequence[tuple[dict[str, int], str]], max_shard_bytes: int | None) -> Layout:
        """The base's own shard layout (an output key stays in its base shard, a new one goes to its tensor's), or
        new shards of at most `max_shard_bytes` in write order. Either way the files get transformers' names
        (`shard_names`), never names taken from the base's index: those are strings from a downloaded file."""
        if max_shard_bytes is None:
            files: dict[str, dict[str, int]] = {shard: {} for shard in self.shards}
            for entries, shard in units:
                for key, nbytes in entries.items():
                    files[self.weight_map.get(key, shard)][key] = nbytes
            groups = [files[shard] for shard in sorted(files) if files[shard]]  # numbered in the base's name order
            indexed = self.indexed or len(groups) > 1
        else:
            groups = plan_shards([entries for entries, _ in units], max_shard_bytes)
            indexed = len(groups) > 1
        return Layout(dict(zip(shard_names(len(groups)), groups)), indexed)

    def open_output(self, folder: Path, encoder: Any, layout: Layout, *, hash_inputs: bool = False,
                    skip: Sequence[str] = ()) -> OutputSink:
        """An output folder with the base's side files (their sha256 recorded with `hash_inputs`) and its
        config.json (dtype set by the encoder), ready for shards."""
        folder.mkdir(parents=True, exist_ok=True)
        copy_side_files(self.root, folder, skip=("config.json", *skip), record_digests=hash_inputs)
        if (self.root / "config.json").exists():
            config = json.dumps(encoder.update_config(self.config), indent=2, sort_keys=True)
            write_new(folder / "config.json", config + "\n")
        return OutputSink(folder, layout)
