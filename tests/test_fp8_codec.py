"""The FP8 codec math against its references, byte for byte: compressed-tensors' FloatQuantizationCompressor (with
scales from its calculate_qparams) for tensor / channel / block strategies in fp32, bf16 and fp16, the merge chain
(a float32 weight into bf16 scales), and DeepSeek-V3's weight_quant rule for the fine-grained layout; decoding
equals q·s of each element's scale."""
from __future__ import annotations

import pytest
import torch
from fp8_factories import ct_dequantize, ct_quantize, deepseek_quantize

from adaptools.checkpoints.fp8_format import (
    COMPRESSED_TENSORS,
    FINE_GRAINED,
    FP8Scheme,
    dequantize_fp8,
    quantize_fp8,
)

SHAPES = [(160, 160), (80, 160), (288, 160), (3, 5), (256, 128)]


def weight(shape, dtype, seed=0, zero_block=True) -> torch.Tensor:
    """Random weights with a few outliers and (when large enough) an all-zero 128x128 block."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=generator) * 0.05
    w.view(-1)[:: 97] *= 40
    if zero_block and shape[0] >= 128 and shape[1] >= 128:
        w[:128, :128] = 0
    return w.to(dtype)


def scheme(strategy, scale_dtype, layout=COMPRESSED_TENSORS):
    return FP8Scheme(layout, strategy, (128, 128) if strategy == "block" else None, scale_dtype)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8)) \
        if a.element_size() == 1 else a.dtype == b.dtype and a.shape == b.shape and torch.equal(
            a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("strategy", ["tensor", "channel", "block"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_equals_compressed_tensors(strategy, dtype, shape):
    w = weight(shape, dtype)
    q, s = quantize_fp8(w, scheme(strategy, dtype))
    ref_q, ref_s = ct_quantize(w, strategy, dtype)
    assert same_bytes(q, ref_q) and same_bytes(s, ref_s)


@pytest.mark.parametrize("strategy", ["tensor", "channel", "block"])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_merge_chain_equals_compressed_tensors(strategy, scale_dtype):
    """Requantizing a merged float32 weight into the base's scale dtype (|W/s| may pass 448: saturated)."""
    base_q, base_s = ct_quantize(weight((288, 160), torch.bfloat16), strategy, scale_dtype)
    merged = dequantize_fp8(base_q, base_s, scheme(strategy, scale_dtype)) + weight((288, 160), torch.float32, 7) * 0.1
    q, s = quantize_fp8(merged, scheme(strategy, scale_dtype))
    ref_q, ref_s = ct_quantize(merged, strategy, scale_dtype)
    assert same_bytes(q, ref_q) and same_bytes(s, ref_s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", [(128, 128), (64, 32)])
def test_fine_grained_equals_deepseek_rule(dtype, shape, block):
    w = weight(shape, dtype)
    q, s = quantize_fp8(w, FP8Scheme(FINE_GRAINED, "block", block, torch.float32))
    ref_q, ref_s = deepseek_quantize(w, block)
    assert same_bytes(q, ref_q) and same_bytes(s, ref_s)


@pytest.mark.parametrize("strategy", ["tensor", "channel", "block"])
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_is_q_times_its_scale(strategy, shape):
    q, s = ct_quantize(weight(shape, torch.bfloat16), strategy, torch.float32)
    got = dequantize_fp8(q, s, scheme(strategy, torch.float32))
    rows, cols = shape
    if strategy == "block":
        full = s.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    else:
        full = s.reshape(-1, 1).expand(rows, cols) if strategy == "channel" else s.expand(rows, cols)
    assert got.dtype == torch.float32 and torch.equal(got, q.float() * full)
    assert torch.equal(got, ct_dequantize(q, s, strategy))  # float32 scales: compressed-tensors' own decompress


def test_all_zero_weight_scales():
    """compressed-tensors: a zero block's scale is the eps of the weight's dtype; fine-grained: 1."""
    w = torch.zeros(130, 140, dtype=torch.bfloat16)
    _, s = quantize_fp8(w, scheme("block", torch.bfloat16))
    assert torch.equal(s, torch.full((2, 2), torch.finfo(torch.bfloat16).eps, dtype=torch.bfloat16))
    _, s = quantize_fp8(w, FP8Scheme(FINE_GRAINED, "block", (128, 128)))
    assert torch.equal(s, torch.ones(2, 2))


@pytest.mark.parametrize("dtype, most", [(torch.float32, 1e-5), (torch.bfloat16, 5e-3)])
def test_transformers_fine_grained_rule_differs_only_in_scale_rounding(dtype, most):
    """transformers' Fp8Quantize stores 1/(448/amax) and multiplies by 448/amax: its scales differ from DeepSeek's
    amax/448 in the last bit only, its fp8 bytes hardly ever from fp32 weights; bf16 weights hit e4m3 ties far more
    often (a ratio of two bf16 values times 448 is often exactly halfway), so there about 0.1% of bytes differ."""
    from types import SimpleNamespace

    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    w = weight((512, 768), dtype, zero_block=True)
    config = SimpleNamespace(weight_block_size=[128, 128], scale_fmt="float")
    theirs = Fp8Quantize(SimpleNamespace(quantization_config=config))._quantize_one("m.weight", w)
    q, s = quantize_fp8(w, FP8Scheme(FINE_GRAINED, "block", (128, 128), torch.float32))
    differ = (q.view(torch.uint8) != theirs["m.weight"].view(torch.uint8)).float().mean().item()
    assert differ <= most
    torch.testing.assert_close(s, theirs["m.weight_scale_inv"], rtol=2.5e-7, atol=0)
