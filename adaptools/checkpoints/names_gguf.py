"""transformers module paths ↔ llama.cpp tensor names (DESIGN §17), as llama.cpp's convert_hf_to_gguf.py maps them.

The names come from gguf-py's `TensorNameMap` for the file's `general.architecture` and `<arch>.block_count`.
`RENAMED` lists the architectures whose linear and embedding weights the converter stores as renamed copies (checked
against the converter's output in tests/test_gguf_architectures.py). Llama-family files store q and k with their
rows permuted for llama.cpp's RoPE (`w.reshape(n, 2, rows // n // 2, cols).swapaxes(1, 2)`, n = head_count for q,
head_count_kv for k): the Target carries that permutation for ΔW's rows. Gemma files store each norm as 1 + w: a
full norm tensor is refused there. Architectures whose conversion does more than rename (fused, split or
re-interleaved projections, stacked experts, transposed weights) are refused by name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import gguf
import torch
from torch import Tensor

from ..errors import BaseMismatchError
from .names import NameMap, Target


@dataclass(frozen=True)
class Renamed:
    """How convert_hf_to_gguf.py stores an architecture it only renames: `permuted`, q/k rows in llama.cpp's RoPE
    order (LlamaModel.permute); `shifted_norms`, every `*norm.weight` stored as 1 + w (Gemma's RMSNorm); `spelled`,
    the transformers module names (under `model.layers.N.`, or whole) this architecture uses where gguf-py's map
    lists another spelling of the same tensor first."""

    permuted: bool = False
    shifted_norms: bool = False
    spelled: tuple[str, ...] = ()


RENAMED = {
    "llama": Renamed(permuted=True),  # Llama, Mistral, TinyLlama, SmolLM 1-2 (and Mixtral's attention)
    "smollm3": Renamed(permuted=True), "granite": Renamed(permuted=True), "olmo": Renamed(permuted=True),
    "qwen2": Renamed(), "qwen3": Renamed(), "olmo2": Renamed(), "stablelm": Renamed(), "exaone4": Renamed(),
    "command-r": Renamed(),
    "gemma": Renamed(shifted_norms=True), "gemma2": Renamed(shifted_norms=True), "gemma3": Renamed(shifted_norms=True),
    "phi3": Renamed(spelled=("self_attn.qkv_proj", "mlp.gate_up_proj")),  # fused by transformers itself
    "phi2": Renamed(spelled=("self_attn.dense", "mlp.fc1", "mlp.fc2", "model.final_layernorm")),
    "starcoder2": Renamed(spelled=("mlp.c_fc", "mlp.c_proj")),
}
"""GGUF architecture → how its tensors relate to the transformers model's (every other one is refused)."""
REFUSED = {
    "qwen2moe": "its experts are stacked into one tensor per layer",
    "qwen3moe": "its experts are stacked into one tensor per layer",
    "olmoe": "its experts are stacked into one tensor per layer",
    "falcon": "its fused query_key_value rows are re-interleaved per head group",
    "internlm2": "its fused wqkv is split into q, k and v, rows permuted",
    "gpt2": "its Conv1D weights are transposed",
}
"""Architectures known to need more than renaming, with why (named in the refusal)."""
HF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "smollm3": "smollm3",
                    "granite": "granite", "olmo": "olmo", "olmo2": "olmo2", "qwen2": "qwen2", "qwen3": "qwen3",
                    "stablelm": "stablelm", "exaone4": "exaone4", "cohere": "command-r", "gemma": "gemma",
                    "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3", "phi": "phi2",
                    "starcoder2": "starcoder2"}
"""transformers model_type → the GGUF architecture convert_hf_to_gguf.py writes for it (those in RENAMED)."""
CANDIDATE = re.compile(r"model\.layers\.\d+\.[a-z_0-9.]+|model\.[a-z_]+|lm_head")
"""The transformers spellings of a tensor among the many the name map lists (other models' layouts left out)."""
MODULE_PATH = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.(?![a-z_]*norm)[a-z_0-9]+|model\.embed_tokens|lm_head")
"""The module paths adapters name: projections and embeddings."""
PREFERRED = ("mlp.up_proj", "self_attn.q_norm", "self_attn.k_norm")
"""Spellings the architectures here use (after their own `spelled`) where the map lists another first."""
BLOCK = re.compile(r"model\.layers\.\d+\.")
QKV = re.compile(r"(?P<block>blk\.\d+)\.attn_[qkv]\.weight")
"""A q, k or v weight, which `convert_hf_to_gguf.py --fuse-qkv` stores as a row block of `<block>.attn_qkv.weight`."""
FUSED_QKV = re.compile(r"blk\.\d+\.attn_qkv\.weight")


def rope_order(rows: int, heads: int) -> Tensor:
    """Row order llama.cpp stores a q/k weight in: stored[i] = hf[order[i]] (LlamaModel.permute)."""
    if not heads or heads <= 0 or rows % (2 * heads):
        raise BaseMismatchError(f"a q/k weight of {rows} rows cannot be split into {heads} heads of two halves")
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


def renamed(architecture: str | None) -> Renamed:
    """How `architecture`'s tensors relate to the transformers model's; BaseMismatchError naming it and why when the
    converter does more than rename them."""
    layout = RENAMED.get(architecture or "")
    if layout is None or architecture not in gguf.MODEL_ARCH_NAMES.values():
        why = REFUSED.get(architecture or "", "not known to be a renaming of the transformers weights")
        raise BaseMismatchError(f"GGUF architecture {architecture!r}: mapping its tensors to transformers modules needs "
                                f"more than renaming ({why}); adaptools merges into {', '.join(sorted(RENAMED))} "
                                "GGUF files")
    return layout


class GGUFNames(NameMap):
    """Module paths of a transformers model → tensor names of its GGUF conversion."""

    def __init__(self, keys, architecture: str | None, block_count: int, heads: int | None, kv_heads: int | None,
                 shapes: dict[str, tuple[int, ...]]):
        super().__init__(keys)
        self.layout = renamed(architecture)
        self.architecture = architecture
        arch = next(code for code, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture)
        self._map = gguf.get_tensor_name_map(arch, block_count)
        self._heads = {"attn_q": heads, "attn_k": kv_heads or heads}
        self._shapes = shapes

    def modules(self) -> list[str]:
        return sorted(path for stem, path in self._sources.items()
                      if MODULE_PATH.fullmatch(path) and f"{stem}.weight" in self._keys)

    def stored(self, module: str) -> str | None:
        """The GGUF tensor name of `module`'s weight (held by this file or not), None when the map has none."""
        name = self._map.get_name(module)
        return None if name is None else f"{name}.weight"

    def _rope(self, kind: str, rows: int) -> Tensor | None:
        """The stored order of the `rows` rows of a `kind` tensor (attn_q, ffn_up, ...): llama.cpp's RoPE order for
        q and k of a permuted architecture, else None (as in the model)."""
        return rope_order(rows, self._heads[kind]) if self._permutes(kind) else None

    def _permutes(self, kind: str) -> bool:
        """Whether tensors of `kind` have their rows in llama.cpp's RoPE order (q and k of a permuted architecture)."""
        return self.layout.permuted and kind in self._heads

    def _fused_rows(self, fused: str) -> dict[str, tuple[int, int]]:
        """Row blocks of q, k and v in `fused` (cat(q, k, v): head_count, head_count_kv and head_count_kv heads of
        one size)."""
        rows, heads, kv_heads = self._shapes[fused][0], self._heads["attn_q"], self._heads["attn_k"]
        if not heads or rows % (heads + 2 * kv_heads):
            raise BaseMismatchError(f"{fused}: {rows} rows are not q, k and v of {heads} and {kv_heads} heads")
        q, k = heads * (rows // (heads + 2 * kv_heads)), kv_heads * (rows // (heads + 2 * kv_heads))
        return {"attn_q": (0, q), "attn_k": (q, q + k), "attn_v": (q + k, rows)}

    def target(self, module: str) -> Target | None:
        key = self.stored(module)
        if key is None:
            return None
        if key in self._keys:
            return Target(key, row_order=self._rope(kind_of(key), self._shapes[key][0]))
        match = QKV.fullmatch(key)
        fused = f"{match['block']}.attn_qkv.weight" if match else None
        if fused in self._keys and not self._native_qkv:  # written with --fuse-qkv: a row block of attn_qkv
            start, stop = self._fused_rows(fused)[kind_of(key)]
            return Target(fused, rows=(start, stop), row_order=self._rope(kind_of(key), stop - start))
        if key == "output.weight" and "token_embd.weight" in self._keys:
            raise BaseMismatchError(f"module {module!r}: this GGUF ties its output to token_embd (it has no "
                                    "output.weight), so llama.cpp has no separate lm_head for the update")
        return None

    def _refuse_shifted(self, name: str, stored: str) -> None:
        """A norm of a Gemma file is stored as 1 + w (convert_hf_to_gguf.py): adaptools neither writes nor reads
        such a tensor as the model's."""
        if self.layout.shifted_norms and stored.endswith("norm.weight"):
            raise BaseMismatchError(f"{name!r}: {self.architecture} GGUF files store each norm as 1 + w (as "
                                    "convert_hf_to_gguf.py writes them); adaptools does not carry full norm tensors "
                                    "into or out of such files")

    def key(self, name: str) -> str | None:
        stored = self._map.get_name(name, try_suffixes=(".weight", ".bias"))
        if stored is None or stored not in self._keys:
            return None
        if self._permutes(kind_of(stored)):
            raise BaseMismatchError(f"{name!r}: a full tensor of a q/k projection, stored with rows permuted in "
                                    "GGUF; adaptools does not write such tensors into GGUF files")
        self._refuse_shifted(name, stored)
        return stored

    @cached_property
    def _sources(self) -> dict[str, str]:
        """GGUF tensor stem → its transformers path (this architecture's spelling where the map lists several)."""
        found: dict[str, list[str]] = {}
        for path, (_, name) in self._map.mapping.items():
            if CANDIDATE.fullmatch(path):
                found.setdefault(name, []).append(path)
        rank = {spelling: i for i, spelling in enumerate(self.layout.spelled + PREFERRED)}
        return {name: min(paths, key=lambda p: rank.get(BLOCK.sub("", p, count=1), len(rank)))
                for name, paths in found.items()}

    @cached_property
    def _native_qkv(self) -> bool:
        """Whether the model itself fuses q, k and v (phi3's qkv_proj: attn_qkv is its renamed weight)."""
        return any(BLOCK.sub("", path, count=1) in self.layout.spelled
                   for stem, path in self._sources.items() if stem.endswith(".attn_qkv"))

    def _unfused(self, key: str) -> dict[str, tuple[int, int]] | None:
        """The row blocks of q, k and v when `key` is an attn_qkv the converter fused (--fuse-qkv), else None."""
        return None if self._native_qkv or not FUSED_QKV.fullmatch(key) else self._fused_rows(key)

    def source(self, key: str) -> tuple[str, Tensor | None]:
        blocks = self._unfused(key)
        if blocks is not None:  # the rows back to cat(q, k, v) of the model
            return key, torch.cat([start + (torch.arange(stop - start) if (order := self._rope(kind, stop - start))
                                            is None else torch.argsort(order)) for kind, (start, stop) in blocks.items()])
        stem, _, suffix = key.rpartition(".")
        path = self._sources.get(stem)
        if path is None:
            return key, None
        self._refuse_shifted(key, key)
        order = self._rope(kind_of(key), self._shapes[key][0])
        return f"{path}.{suffix}", None if order is None else torch.argsort(order)

    def adapter_modules(self, key: str) -> list[tuple[str, tuple[int, int] | None]]:
        blocks = self._unfused(key)
        if blocks is None:
            return [(self.source(key)[0].removesuffix(".weight"), None)]
        block = key.rsplit(".", 2)[0]
        return [(self._sources[f"{block}.{kind}"], rows) for kind, rows in blocks.items()]


def kind_of(key: str) -> str:
    """The kind of a block tensor (`blk.3.attn_q.weight` → attn_q); '' for the others (token_embd, output, ...)."""
    return key.split(".")[2] if key.startswith("blk.") and key.count(".") >= 3 else ""
