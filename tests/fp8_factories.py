"""FP8 test checkpoints made by the references: compressed-tensors 0.20.1 (its presets, scales from its own
`calculate_qparams`, compressed by its `ModelCompressor`) and the fine-grained / DeepSeek-V3 layout built by
DeepSeek's `weight_quant` rule, written here block by block as an independent reference."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from factories import tiny_llama_config

os.environ.setdefault("COMPRESSED_TENSORS_LOG_DISABLED", "1")

FP8_LLAMA = dict(hidden_size=160, intermediate_size=288)
"""Weights of 160x160, 80x160, 288x160 and 160x288: full and partial 128x128 blocks."""
PRESETS = {"tensor": "FP8", "channel": "FP8_DYNAMIC", "block": "FP8_BLOCK"}


def ct_scheme(strategy: str):
    """compressed-tensors' preset QuantizationScheme of a strategy (FP8 static per tensor, FP8_DYNAMIC per channel,
    FP8_BLOCK 128x128) for Linear modules."""
    from compressed_tensors.quantization import preset_name_to_scheme

    return preset_name_to_scheme(PRESETS[strategy], ["Linear"])


def ct_scale(weight: torch.Tensor, strategy: str, scale_dtype: torch.dtype) -> torch.Tensor:
    """compressed-tensors' scale of a weight: min/max per tensor, row or (zero-padded) block, through its own
    calculate_qparams, stored in `scale_dtype`."""
    from compressed_tensors.quantization.utils import calculate_qparams

    args = ct_scheme(strategy).weights
    if strategy == "tensor":
        low, high = weight.amin().reshape(1), weight.amax().reshape(1)
    elif strategy == "channel":
        low, high = weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True)
    else:
        bh, bw = args.block_structure
        rows, cols = math.ceil(weight.shape[0] / bh), math.ceil(weight.shape[1] / bw)
        padded = weight.new_zeros(rows * bh, cols * bw)
        padded[: weight.shape[0], : weight.shape[1]] = weight
        blocks = padded.reshape(rows, bh, cols, bw)
        low, high = blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))
    return calculate_qparams(low, high, args)[0].to(scale_dtype)


def ct_quantize(weight: torch.Tensor, strategy: str, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) of compressed-tensors' FloatQuantizationCompressor.compress with calculate_qparams' scale."""
    from compressed_tensors.compressors import FloatQuantizationCompressor

    scale = ct_scale(weight, strategy, scale_dtype)
    out = FloatQuantizationCompressor.compress({"weight": weight, "weight_scale": scale}, ct_scheme(strategy))
    return out["weight"], out["weight_scale"]


def ct_dequantize(q: torch.Tensor, scale: torch.Tensor, strategy: str) -> torch.Tensor:
    """compressed-tensors' own decompress (in the scale's dtype)."""
    from compressed_tensors.compressors import FloatQuantizationCompressor

    return FloatQuantizationCompressor.decompress({"weight": q, "weight_scale": scale}, ct_scheme(strategy))["weight"]


def deepseek_quantize(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's weight_quant rule, block by block: in float32 s = amax/448 (an all-zero block: 1), q = fp8(W/s)."""
    weight = weight.float()
    bh, bw = block
    q = torch.empty(weight.shape, dtype=torch.float8_e4m3fn)
    scale = torch.empty(math.ceil(weight.shape[0] / bh), math.ceil(weight.shape[1] / bw))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            part = weight[i * bh:(i + 1) * bh, j * bw:(j + 1) * bw]
            amax = part.abs().max()
            s = amax / 448.0 if amax > 0 else torch.tensor(1.0)
            scale[i, j] = s
            q[i * bh:(i + 1) * bh, j * bw:(j + 1) * bw] = (part / s).to(torch.float8_e4m3fn)
    return q, scale


def is_quantized_linear(key: str, tensor: torch.Tensor) -> bool:
    """The 2-D linear weights the FP8 layouts quantize in a tiny Llama (not embeddings or lm_head)."""
    return key.endswith(".weight") and tensor.dim() == 2 and "embed" not in key and "lm_head" not in key


def make_ct_fp8_base(path: Path, strategy: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                     **overrides) -> Path:
    """A tiny Llama quantized and saved by compressed-tensors (preset of `strategy`, scales from calculate_qparams;
    the static per-tensor preset gets input scales too)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(**{**FP8_LLAMA, **overrides})).to(dtype)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": ct_scheme(strategy)},
                                                        ignore=["lm_head"]), show_progress=False)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_scale"):
                module.weight_scale.copy_(ct_scale(module.weight.data, strategy, dtype))
            if hasattr(module, "input_scale"):
                module.input_scale.fill_(0.0123)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)
    return Path(path)


def make_fine_grained_base(path: Path, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                           block: tuple[int, int] = (128, 128), **overrides) -> Path:
    """A tiny Llama in the fine-grained / DeepSeek layout: linear weights F8_E4M3 with float32 weight_scale_inv by
    `deepseek_quantize`, config quantization_config {quant_method fp8, weight_block_size}."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(**{**FP8_LLAMA, **overrides})).to(dtype)
    model.save_pretrained(path)
    tensors = load_file(Path(path) / "model.safetensors")
    out = {}
    for key, tensor in tensors.items():
        if is_quantized_linear(key, tensor):
            out[key], out[key + "_scale_inv"] = deepseek_quantize(tensor, block)
        else:
            out[key] = tensor
    save_file(out, Path(path) / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((Path(path) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block), "modules_to_not_convert": ["lm_head"]}
    (Path(path) / "config.json").write_text(json.dumps(config, indent=2))
    return Path(path)
