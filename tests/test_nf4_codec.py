"""NF4 codec against bitsandbytes (the reference, CPU): packed bytes, statistics, checkpoint tensors, dequantize,
and a transformers model loaded from a checkpoint we quantized."""
from __future__ import annotations

import json

import pytest
import torch

from adaptools.errors import AdapterFormatError, InvalidArgumentError, NonFiniteError, ShapeMismatchError
from adaptools.checkpoints.nf4_quant import (
    NF4_CODE,
    create_dynamic_map,
    dequantize_nf4,
    is_nf4_weight,
    nf4_from_state_dict,
    nf4_state_dict,
    nf4_state_keys,
    nf4_survival,
    quantization_config,
    quantize_nf4,
)

F = pytest.importorskip("bitsandbytes.functional")

NAME = "model.layers.0.mlp.up_proj.weight"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# odd element counts, sizes not a multiple of the blocksize, 1-D and 3-D, > 256 blocks (two nested blocks, one short)
SHAPES = ((64, 64), (33, 17), (7,), (3, 5, 7), (300, 70), (128, 48))


def weight(shape, dtype, seed=0) -> torch.Tensor:
    """Random weight of LLM scale with an all-zero stretch (whole zero blocks for every blocksize <= 64)."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    w.view(-1)[64:192] = 0.0
    return w.to(dtype)


def bnb_state_dict(packed, state) -> dict[str, torch.Tensor]:
    """What bitsandbytes' Linear4bit saves for weight NAME."""
    return {NAME: packed} | {f"{NAME}.{k}": v for k, v in state.as_dict(packed=True).items()}


def reference_dequantize(packed, state) -> torch.Tensor:
    """NF4 code[q] · absmax of the element's flat block, in fp32, from bitsandbytes' own statistics (dense torch)."""
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    q = torch.stack((packed.view(-1) >> 4, packed.view(-1) & 15), dim=1).view(-1).long()
    n = state.shape.numel()
    values = F.get_4bit_type("nf4", device="cpu")[q[:n]] * absmax.repeat_interleave(state.blocksize)[:n]
    return values.to(state.dtype).view(state.shape)


def test_dynamic_map_is_bitsandbytes():
    assert torch.equal(create_dynamic_map(), F.create_dynamic_map())


@pytest.mark.parametrize("double_quant", (False, True))
@pytest.mark.parametrize("blocksize", (32, 64, 256, 4096))
@pytest.mark.parametrize("dtype", DTYPES)
def test_codec_matches_bitsandbytes(dtype, blocksize, double_quant):
    for seed, shape in enumerate(SHAPES):
        w = weight(shape, dtype, seed)
        ref_packed, ref_state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
        packed, state = quantize_nf4(w, blocksize, double_quant)

        expected, ours = bnb_state_dict(ref_packed, ref_state), nf4_state_dict(NAME, packed, state)
        assert list(ours) == list(expected)
        for key, tensor in expected.items():
            assert ours[key].dtype == tensor.dtype and ours[key].shape == tensor.shape, key
            assert torch.equal(ours[key], tensor), (key, shape)

        out = dequantize_nf4(packed, state)
        assert out.dtype == dtype and out.shape == w.shape
        assert torch.equal(out, reference_dequantize(ref_packed, ref_state))
        if _bnb_cpu_dequantize_is_exact(shape, blocksize, dtype):
            assert torch.equal(out, F.dequantize_4bit(ref_packed, ref_state, quant_type="nf4"))


def _bnb_cpu_dequantize_is_exact(shape, blocksize, dtype) -> bool:
    """Where bitsandbytes 0.50.2's CPU dequantize rounds code·absmax (fp32) to the dtype exactly.
    Its AVX-512 kernel takes absmax per row, wrong when the last dim is a multiple of 16 but not of the blocksize;
    and the CPU kernels inside its CUDA library convert to float16 in software, ties away from zero."""
    avx512_row_bug = torch.backends.cpu.get_cpu_capability() == "AVX512" and len(shape) > 1 and shape[-1] % 16 == 0
    if avx512_row_bug and shape[-1] % blocksize and blocksize < 2048:
        return False
    from bitsandbytes.cextension import lib

    return not (dtype == torch.float16 and getattr(lib, "compiled_with_cuda", False))


def test_nested_quantization_matches_bitsandbytes_kernel():
    """The 8-bit step alone, on values that hit the 65,536-bin table's bin edges and the ends of [-1, 1]."""
    from adaptools.checkpoints.nf4_quant import _quantize_dynamic

    g = torch.Generator().manual_seed(5)
    bins = torch.randint(0, 65536, (256 * 400,), generator=g).float()
    edges = (bins + bins) / 65535 - 1 + torch.randint(-3, 4, bins.shape, generator=g) * 2.0**-24
    x = torch.cat((edges, torch.randn(256 * 100 + 77, generator=g) * 3e-3, torch.zeros(256)))
    x[: 256 * 400 : 256] = 1.0  # absmax 1: the scaled value is the value itself
    codes, absmax = _quantize_dynamic(x, 256)
    ref_codes, ref_state = F.quantize_blockwise(x, blocksize=256)
    assert torch.equal(absmax, ref_state.absmax)
    assert torch.equal(codes, ref_codes)


@pytest.mark.parametrize("double_quant", (False, True))
def test_state_dict_round_trip(double_quant):
    w = weight((96, 80), torch.bfloat16)
    packed, state = quantize_nf4(w, 128, double_quant)
    tensors = nf4_state_dict(NAME, packed, state)
    assert is_nf4_weight(NAME, tensors.keys()) and not is_nf4_weight("other.weight", tensors.keys())
    assert set(tensors) - {NAME} <= set(nf4_state_keys(NAME))
    packed2, state2 = nf4_from_state_dict(NAME, tensors)
    assert torch.equal(packed2, packed)
    assert (state2.blocksize, state2.dtype, state2.shape, state2.offset) == (128, torch.bfloat16, (96, 80), state.offset)
    assert torch.equal(dequantize_nf4(packed2, state2), dequantize_nf4(packed, state))
    assert all(torch.equal(a, b) for a, b in zip(nf4_state_dict(NAME, packed2, state2).values(), tensors.values()))
    # bitsandbytes' own tensors parse too
    ref_packed, ref_state = F.quantize_4bit(w, blocksize=128, compress_statistics=double_quant, quant_type="nf4")
    out = dequantize_nf4(*nf4_from_state_dict(NAME, bnb_state_dict(ref_packed, ref_state)))
    assert torch.equal(out, reference_dequantize(ref_packed, ref_state))


def _broken(tensors, key, value=None):
    out = dict(tensors)
    if value is None:
        del out[key]
    else:
        out[key] = value
    return out


def _json(meta) -> torch.Tensor:
    return torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


def test_malformed_state_dicts_raise():
    tensors = nf4_state_dict(NAME, *quantize_nf4(weight((64, 64), torch.float16), 64, True))
    qs = f"{NAME}.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(tensors[qs].tolist()))
    cases = [
        _broken(tensors, qs),
        _broken(_broken(tensors, qs), f"{NAME}.quant_state.bitsandbytes__fp4", tensors[qs]),
        _broken(tensors, qs, torch.tensor(list(b"{not json"), dtype=torch.uint8)),
        _broken(tensors, qs, _json(meta | {"blocksize": 48})),
        _broken(tensors, qs, _json(meta | {"dtype": "int8"})),
        _broken(tensors, qs, _json(meta | {"shape": [64, 65]})),
        _broken(tensors, qs, _json({k: v for k, v in meta.items() if k != "nested_offset"})),
        _broken(tensors, NAME),
        _broken(tensors, f"{NAME}.absmax", tensors[f"{NAME}.absmax"][:-1]),
        _broken(tensors, f"{NAME}.absmax", tensors[f"{NAME}.absmax"].float()),
        _broken(tensors, f"{NAME}.nested_quant_map"),
    ]
    for case in cases:
        with pytest.raises(AdapterFormatError):
            nf4_from_state_dict(NAME, case)


def test_bad_arguments_raise():
    w = weight((8, 64), torch.float32)
    for blocksize in (16, 48, 8192):
        with pytest.raises(InvalidArgumentError):
            quantize_nf4(w, blocksize)
        with pytest.raises(ValueError):  # bitsandbytes refuses the same blocksizes
            F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    with pytest.raises(InvalidArgumentError):
        quantize_nf4(w.to(torch.int32))
    with pytest.raises(ShapeMismatchError):
        quantize_nf4(torch.empty(0, 64))
    for bad in (float("nan"), float("inf")):
        w_bad = w.clone()
        w_bad[3, 5] = bad
        with pytest.raises(NonFiniteError):
            quantize_nf4(w_bad)


@pytest.mark.parametrize("double_quant", (False, True))
def test_quantization_config_is_transformers(double_quant):
    from transformers import BitsAndBytesConfig

    for compute, skip in (("bfloat16", None), ("float16", ["lm_head"])):
        expected = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute,
            llm_int8_skip_modules=skip,
        ).to_dict()
        assert quantization_config(double_quant, compute, skip) == expected
    with pytest.raises(InvalidArgumentError):
        quantization_config(True, blocksize=100)


def test_survival():
    g = torch.Generator().manual_seed(7)
    w = torch.stack([dequantize_nf4(*quantize_nf4(m)) for m in torch.randn(3, 128, 256, generator=g) * 0.02])  # NF4 base
    direction = torch.randn(3, 128, 256, generator=g)
    direction *= w.norm() / direction.norm()
    tiny = nf4_survival(w, 1e-4 * direction)
    large = nf4_survival(w, 3.0 * direction)
    assert tiny.shape == (3,) and large.shape == (3,)
    assert (tiny < 0.05).all() and (large > 0.9).all() and (large < 1.1).all()
    assert nf4_survival(w[1], 3.0 * direction[1]) == pytest.approx(large[1].item())
    # the definition, computed directly
    delta = 0.1 * direction[0]
    base = dequantize_nf4(*quantize_nf4(w[0])).float()
    merged = dequantize_nf4(*quantize_nf4(w[0] + delta)).float()
    expected = ((merged - base) * delta).sum() / delta.square().sum()
    assert nf4_survival(w[0], delta) == pytest.approx(expected.item(), rel=1e-5)
    assert nf4_survival(w[0], torch.zeros_like(w[0])) == 0.0


def test_code_table_is_bitsandbytes():
    assert torch.equal(NF4_CODE, F.get_4bit_type("nf4", device="cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    w = weight((300, 70), torch.bfloat16)
    for double_quant in (False, True):
        cpu = nf4_state_dict(NAME, *quantize_nf4(w, 64, double_quant))
        packed, state = quantize_nf4(w.cuda(), 64, double_quant)
        gpu = nf4_state_dict(NAME, packed, state)
        assert torch.equal(gpu[NAME].cpu(), cpu[NAME])
        if not double_quant:  # with double quant the offset is a mean whose summation order differs on CUDA
            assert torch.equal(gpu[f"{NAME}.absmax"].cpu(), cpu[f"{NAME}.absmax"])
        out = dequantize_nf4(packed, state)
        assert out.is_cuda and torch.allclose(out.cpu().float(), dequantize_nf4(*quantize_nf4(w, 64, double_quant)).float())


def test_transformers_loads_our_checkpoint(tmp_path):
    """A tiny Llama quantized by us loads as Linear4bit and gives the logits of transformers' own NF4 quantization;
    the checkpoint transformers saves for its model holds our tensors."""
    import bitsandbytes as bnb
    from factories import input_ids, make_base
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # in/out features multiples of 64/32: bitsandbytes' CPU (AVX512-BF16) forward needs in % blocksize == 0, out % 32 == 0
    base = make_base(tmp_path / "base", "llama", dtype=torch.bfloat16, hidden_size=64, intermediate_size=128, vocab_size=96)
    tensors = {}
    for key, tensor in load_file(base / "model.safetensors").items():
        linear = key.startswith("model.layers.") and key.endswith("proj.weight")
        tensors |= nf4_state_dict(key, *quantize_nf4(tensor)) if linear else {key: tensor}
    ours = tmp_path / "ours"
    ours.mkdir()
    save_file(tensors, ours / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = quantization_config(double_quant=True)
    (ours / "config.json").write_text(json.dumps(config))

    model = AutoModelForCausalLM.from_pretrained(ours, device_map="cpu").eval()
    assert isinstance(model.model.layers[1].mlp.down_proj, bnb.nn.Linear4bit)
    reference = AutoModelForCausalLM.from_pretrained(
        base,
        device_map="cpu",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype="bfloat16"
        ),
    ).eval()
    reference.save_pretrained(tmp_path / "reference")  # before any CPU forward, which repacks the weights in place
    saved = load_file(tmp_path / "reference" / "model.safetensors")
    assert saved.keys() == tensors.keys()
    assert all(saved[k].dtype == v.dtype and torch.equal(saved[k].view(-1), v.view(-1)) for k, v in tensors.items())
    ids = input_ids(vocab_size=96)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_ties_and_neighbours_of_every_midpoint_match_bitsandbytes():
    """Values on the code midpoints (ties go to the lower code), one ulp either side, and the ends of [-1, 1],
    in blocks whose absmax is 1 (the scaled value is the value itself)."""
    mid = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    values = torch.cat((mid, torch.nextafter(mid, torch.tensor(2.0)), torch.nextafter(mid, torch.tensor(-2.0)),
                        NF4_CODE, torch.tensor([-0.0, 1e-30, -1e-30])))
    blocks = values.view(1, -1).repeat(64, 1).view(-1)
    w = torch.cat((blocks, torch.ones(64))).view(-1, 64)
    w[:, 0] = 1.0  # absmax 1 in every block
    for double_quant in (False, True):
        ref_packed, ref_state = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        packed, state = quantize_nf4(w, 64, double_quant)
        assert torch.equal(packed, ref_packed)
        assert torch.equal(nf4_state_dict(NAME, packed, state)[f"{NAME}.absmax"], ref_state.as_dict(packed=True)["absmax"])


def test_nibble_lookup_is_bucketize_at_every_16_bit_interval():
    """The top-16-bit table against the nearest-midpoint search, at both ends of every interval in [-1, 1] and
    one value inside each."""
    from adaptools.checkpoints.nf4_quant import _nf4_bounds, _pack_codes, _Scratch

    top = torch.arange(1 << 16, dtype=torch.int64) << 16
    x = torch.cat([(top | low).to(torch.int32).view(torch.float32) for low in (0, 0x1234, 0xFFFF)])
    x = x[x.abs() <= 1.0]
    x = x[: x.numel() // 2 * 2]
    expected = torch.bucketize(x, _nf4_bounds(x.device)).to(torch.uint8).view(-1, 2)
    out = torch.empty(x.numel() // 2, dtype=torch.uint8)
    _pack_codes(x, out, _Scratch(x.numel(), torch.float32, x.device))
    assert torch.equal(out, expected[:, 0] * 16 + expected[:, 1])


@pytest.mark.parametrize("threads", (1, 2))
def test_chunked_on_threads_matches_bitsandbytes(threads, monkeypatch):
    """Many chunks (a small chunk size), split over threads, with a short last block and an odd length."""
    import adaptools.checkpoints.nf4_quant as nf4

    monkeypatch.setattr(nf4, "CHUNK_ELEMENTS", 256)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = weight((41, 301), torch.bfloat16, seed=3)
        for blocksize in (64, 256):
            ref_packed, ref_state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
            packed, state = quantize_nf4(w, blocksize, True)
            assert torch.equal(packed, ref_packed)
            assert torch.equal(dequantize_nf4(packed, state), reference_dequantize(ref_packed, ref_state))
    finally:
        torch.set_num_threads(before)


def test_dequantize_reads_packed_bytes_at_an_odd_address():
    """Memory-mapped packed data may start at an odd byte; the two-byte lookup must not misread it."""
    w = weight((16, 64), torch.float16)
    packed, state = quantize_nf4(w, 64, False)
    shifted = torch.empty(packed.numel() + 1, dtype=torch.uint8)[1:]
    shifted.copy_(packed.view(-1))
    assert shifted.data_ptr() % 2 == 1
    assert torch.equal(dequantize_nf4(shifted.view(-1, 1), state), dequantize_nf4(packed, state))
