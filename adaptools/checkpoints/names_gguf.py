"""transformers module paths ↔ llama.cpp tensor names (DESIGN §17), as llama.cpp's convert_hf_to_gguf.py maps them.

The names come from gguf-py's `TensorNameMap` for the file's `general.architecture` and `<arch>.block_count`.
Llama-family files store q and k with their rows permuted for llama.cpp's RoPE
(`w.reshape(n, 2, rows // n // 2, cols).swapaxes(1, 2)`, n = head_count for q, head_count_kv for k): the Target
carries that permutation for ΔW's rows. Architectures whose conversion does more than rename (fused or stacked
tensors, split experts) are refused by name.
"""
from __future__ import annotations

import re
from functools import cached_property

import gguf
import torch
from torch import Tensor

from ..errors import BaseMismatchError
from .names import NameMap, Target

RENAMED = {"llama": True, "qwen2": False, "qwen3": False}
"""Architectures whose linear and embedding weights the converter only renames: name → whether q/k rows are
permuted (llama: LlamaModel.permute). Others (fused qkv, stacked experts, shifted norms) are refused."""
MODULE_PATH = re.compile(r"(model\.layers\.\d+\.(self_attn|mlp)\.[a-z]+_proj|model\.embed_tokens|lm_head)")
"""The transformers module paths adapters name (the name map lists many other spellings of each tensor)."""
FULL_PATH = re.compile(r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm|self_attn\.[qk]_norm)|model\.norm")
"""transformers paths of the other tensors an extracted adapter may carry whole (norms)."""


def rope_order(rows: int, heads: int) -> Tensor:
    """Row order llama.cpp stores a q/k weight in: stored[i] = hf[order[i]] (LlamaModel.permute)."""
    if heads <= 0 or rows % (2 * heads):
        raise BaseMismatchError(f"a q/k weight of {rows} rows cannot be split into {heads} heads of two halves")
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


class GGUFNames(NameMap):
    """Module paths of a transformers model → tensor names of its GGUF conversion."""

    def __init__(self, keys, architecture: str | None, block_count: int, heads: int | None, kv_heads: int | None,
                 shapes: dict[str, tuple[int, ...]]):
        super().__init__(keys)
        arch = {name: code for code, name in gguf.MODEL_ARCH_NAMES.items()}.get(architecture or "")
        if architecture not in RENAMED or arch is None:
            raise BaseMismatchError(
                f"GGUF architecture {architecture!r}: mapping its tensors to transformers modules needs more than "
                f"renaming (or is unknown); adaptools merges into {', '.join(sorted(RENAMED))} GGUF files")
        self.architecture = architecture
        self._map = gguf.get_tensor_name_map(arch, block_count)
        self._permuted = RENAMED[architecture]
        self._heads = {"attn_q": heads, "attn_k": kv_heads or heads}
        self._shapes = shapes
        self._modules = sorted(path for path, (_, name) in self._map.mapping.items()
                               if MODULE_PATH.fullmatch(path) and f"{name}.weight" in self._keys)

    def modules(self) -> list[str]:
        return list(self._modules)

    def stored(self, module: str) -> str | None:
        """The GGUF tensor name of `module`'s weight (held by this file or not), None when the map has none."""
        name = self._map.get_name(module)
        return None if name is None else f"{name}.weight"

    def target(self, module: str) -> Target | None:
        key = self.stored(module)
        if key is None or key not in self._keys:
            if key == "output.weight" and "token_embd.weight" in self._keys:
                raise BaseMismatchError(f"module {module!r}: this GGUF ties its output to token_embd (it has no "
                                        "output.weight), so llama.cpp has no separate lm_head for the update")
            return None
        kind = key.split(".")[-2] if key.startswith("blk.") else ""
        if self._permuted and kind in self._heads:
            return Target(key, row_order=rope_order(self._shapes[key][0], self._heads[kind]))
        return Target(key)

    def key(self, name: str) -> str | None:
        stored = self._map.get_name(name, try_suffixes=(".weight", ".bias"))
        if stored is None or stored not in self._keys:
            return None
        if self._permuted and stored.split(".")[-2] in self._heads and stored.startswith("blk."):
            raise BaseMismatchError(f"{name!r}: a full tensor of a q/k projection, stored with rows permuted in "
                                    "GGUF; adaptools does not write such tensors into GGUF files")
        return stored

    @cached_property
    def _sources(self) -> dict[str, str]:
        """GGUF tensor stem → its transformers path (projections and embeddings first, then norms)."""
        found: dict[str, str] = {}
        for pattern in (MODULE_PATH, FULL_PATH):
            for path, (_, name) in self._map.mapping.items():
                if pattern.fullmatch(path):
                    found.setdefault(name, path)
        return found

    def source(self, key: str) -> tuple[str, Tensor | None]:
        stem, _, suffix = key.rpartition(".")
        path = self._sources.get(stem)
        if path is None:
            return key, None
        kind = stem.split(".")[-1] if stem.startswith("blk.") else ""
        order = None
        if self._permuted and kind in self._heads:
            order = torch.argsort(rope_order(self._shapes[key][0], self._heads[kind]))
        return f"{path}.{suffix}", order

    def adapter_modules(self, key: str) -> list[tuple[str, tuple[int, int] | None]]:
        return [(self.source(key)[0].removesuffix(".weight"), None)]
