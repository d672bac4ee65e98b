"""llama.cpp LoRA adapters (`llama-cli --lora`, DESIGN §17): a GGUF file with `general.type = adapter`,
`adapter.type = lora`, `adapter.lora.alpha` and per module `<tensor>.weight.lora_a` (r, in) / `.lora_b` (out, r)
under llama.cpp's tensor names, as convert_lora_to_gguf.py writes it: lora_b's rows in the base tensor's row order
(q/k permuted for llama), an embedding's lora_a transposed (vocab, r).

llama.cpp scales each tensor by alpha / rank (alpha 0: by 1), one alpha for the file. When every module's scale is
that rule for one alpha (plain LoRA), the factors and alpha are written as they are (the converter's values);
otherwise (rsLoRA, rank or alpha patterns, merged adapters) each module's scale is folded into lora_b and alpha
is 0, so llama.cpp applies exactly ΔW = scale · B @ A, what PEFT applies (the converter is 0.5× and 7× off there).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ..adapter import Adapter
from ..atomic import atomic_output
from ..checkpoints import GGUFFile
from ..checkpoints.names_gguf import HF_ARCHITECTURES, GGUFNames
from ..errors import AdapterFormatError, BaseMismatchError, UnknownModuleError
from ..names import listed
from ..sources import open_names

NAME = "gguf"


def base_names(base: str | os.PathLike) -> tuple[GGUFNames, str]:
    """The name map of a base given as a GGUF file, a Hugging Face folder or a Hub repo id (only its header or its
    config and safetensors headers are read: a Hub repo costs no weights), and its GGUF architecture."""
    container = open_names(base)
    if isinstance(container, GGUFFile):
        return container.names, container.names.architecture
    config = container.config
    arch = HF_ARCHITECTURES.get(str(config.get("model_type")))
    if arch is None:
        raise BaseMismatchError(f"base model_type {config.get('model_type')!r}: llama.cpp adapters are written for "
                                f"{', '.join(sorted(HF_ARCHITECTURES))} bases")
    blocks = config.get("num_hidden_layers")
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if not all(isinstance(v, int) and v > 0 for v in (blocks, heads)):
        raise BaseMismatchError("the base's config.json lacks num_hidden_layers / num_attention_heads")
    import gguf

    names = gguf.get_tensor_name_map({n: c for c, n in gguf.MODEL_ARCH_NAMES.items()}[arch], blocks)
    keys = {}
    for key in container.keys():
        stored = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if stored is not None:
            keys[stored] = container.shape(key)
    return GGUFNames(keys, arch, blocks, heads, kv_heads if isinstance(kv_heads, int) else None, keys), arch


def one_alpha(adapter: Adapter) -> float | None:
    """The alpha for which llama.cpp's alpha / rank is every module's scale, or None when there is none."""
    alphas = {m.scale * m.rank for m in adapter.modules.values()}
    alpha = next(iter(alphas))
    return alpha if alpha != 0 and all(math.isclose(a, alpha, rel_tol=1e-6) for a in alphas) else None


def write_gguf_adapter(adapter: Adapter, base: str | os.PathLike, path: str | os.PathLike,
                       overwrite: bool = False) -> Path:
    """Write `adapter` as the llama.cpp LoRA adapter of `base` at `path` (atomically), F32 factors."""
    import gguf

    refused = [f"{name} ({why})" for name, m in adapter.items()
               for why in [("DoRA" if m.is_dora else "a LoRA bias" if m.bias is not None else
                            f"a {m.kind} layer" if m.kind not in ("linear", "embedding") else None)] if why]
    if refused or adapter.extra:
        raise AdapterFormatError("llama.cpp adapters hold plain LoRA factors of linear and embedding layers: "
                                 f"{listed(refused + [f'{k} (a full tensor)' for k in adapter.extra])} cannot be "
                                 "written (merge them instead, or `dora to-lora` first)")
    if not adapter.modules:
        raise AdapterFormatError("the adapter holds no LoRA modules: there is nothing to write")
    names, arch = base_names(base)
    alpha = one_alpha(adapter)
    tensors: dict[str, torch.Tensor] = {}
    missing = []
    for name, module in adapter.items():
        target = names.target(name)
        if target is None:
            missing.append(name)
            continue
        if target.rows is not None:
            raise BaseMismatchError(f"module {name!r} is a row block of {target.key} in this base (q, k and v fused "
                                    "by convert_hf_to_gguf.py --fuse-qkv); adaptools writes llama.cpp adapters for "
                                    "bases that store them apart (merge into this one instead)")
        A, B = module.A.float(), module.B.float()
        if alpha is None:
            B = B * module.scale
        if target.row_order is not None:
            B = B[target.row_order]
        tensors[f"{target.key}.lora_a"] = A.T if module.kind == "embedding" else A
        tensors[f"{target.key}.lora_b"] = B
    if missing:
        raise UnknownModuleError(f"{len(missing)} module(s) have no tensor in the {arch} base: {listed(missing)}")
    with atomic_output(path, overwrite=overwrite, is_file=True) as out:
        writer = gguf.GGUFWriter(out, arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0 if alpha is None else float(alpha))
        for key, tensor in tensors.items():
            writer.add_tensor(key, tensor.contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(path)
