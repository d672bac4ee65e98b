"""Base model checkpoints: a Hugging Face folder (model.safetensors or shards + index), read tensor by tensor."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import Tensor

from ..errors import BaseMismatchError, InputNotFoundError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class BaseCheckpoint:
    """Lazy view of a base checkpoint: key → (shard, shape, dtype) without loading tensors."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.exists():
            raise InputNotFoundError(f"base {str(path)!r} does not exist")
        self.root = path if path.is_dir() else path.parent
        self.shards = self._find_shards(path)
        self.weight_map: dict[str, str] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for shard in self.shards:
            try:
                with safe_open(str(self.root / shard), framework="pt") as f:
                    for key in f.keys():
                        sl = f.get_slice(key)
                        self.weight_map[key] = shard
                        self._meta[key] = (tuple(sl.get_shape()), sl.get_dtype())
            except (SafetensorError, OSError) as exc:
                raise BaseMismatchError(f"base shard {str(self.root / shard)!r} is not a readable safetensors file ({exc})") from exc

    def _find_shards(self, path: Path) -> list[str]:
        if path.is_file():
            return [path.name]
        index = path / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise BaseMismatchError(f"{str(index)!r} is not a valid safetensors index ({exc})") from exc
            return list(dict.fromkeys(weight_map.values()))
        if (path / SINGLE_NAME).exists():
            return [SINGLE_NAME]
        found = sorted(p.name for p in path.glob("*.safetensors"))
        if not found:
            raise BaseMismatchError(f"{str(path)!r} holds no model.safetensors, index or *.safetensors file")
        return found

    @property
    def config(self) -> dict:
        """config.json of the base folder, or {} when there is none."""
        cfg = self.root / "config.json"
        return json.loads(cfg.read_text()) if cfg.exists() else {}

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, key: object) -> bool:
        return key in self.weight_map

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype_name(self, key: str) -> str:
        """safetensors dtype name of `key` (e.g. "F16", "BF16", "F32", "U8")."""
        return self._meta[key][1]

    def shard_keys(self, shard: str) -> list[str]:
        return [k for k, s in self.weight_map.items() if s == shard]

    def get(self, key: str) -> Tensor:
        """Load one tensor."""
        with safe_open(str(self.root / self.weight_map[key]), framework="pt") as f:
            return f.get_tensor(key)

    def iter_shard(self, shard: str) -> Iterator[tuple[str, Tensor]]:
        """(key, tensor) for each tensor of one shard, loaded one at a time."""
        with safe_open(str(self.root / shard), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
