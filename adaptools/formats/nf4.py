"""NF4 codec in the bitsandbytes layout (bit-exact with bitsandbytes 0.50.2 on CPU): quantize, dequantize,
checkpoint tensors and the transformers `quantization_config`.

Quantize: per block of `blocksize` elements (row-major), q = nearest NF4 code of x / absmax; two codes per byte.
Double quant stores the block absmax as 8-bit codes of (absmax - mean) in blocks of 256 (bitsandbytes' dynamic map).
"""
from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from ..errors import AdapterFormatError, InvalidArgumentError, NonFiniteError, ShapeMismatchError
from ..jsonio import parse_json

NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
QUANT_STATE_SUFFIX = ".quant_state.bitsandbytes__nf4"
_STAT_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_LUT_BINS = 65536  # bitsandbytes' CPU 8-bit quantizer rounds through a table of this many bins over [-1, 1]
_ABSMAX_FLOOR = 1e-38  # bitsandbytes clamps a block's absmax to this before taking its reciprocal


@dataclass(frozen=True, eq=False)
class NF4State:
    """Everything besides the packed nibbles needed to dequantize one NF4 tensor.

    `absmax` is fp32 (one per block) without double quant, uint8 codes of `nested_quant_map` with it;
    then a block's absmax = nested_quant_map[absmax[i]] * nested_absmax[i // nested_blocksize] + offset.
    """

    absmax: Tensor
    blocksize: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    nested_absmax: Tensor | None = None
    nested_quant_map: Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    offset: float | None = None

    @property
    def double_quant(self) -> bool:
        """True when the block absmax values are themselves 8-bit quantized."""
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        """Number of elements of the original weight."""
        return math.prod(self.shape)


def create_dynamic_map() -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map: ±10^(e-6)·(midpoints of linspace(0.1, 1, 2^e + 1)), e = 0..6, plus 0 and 1."""
    values = [0.0, 1.0]
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += ((10 ** (e - 6)) * means).tolist() + (-(10 ** (e - 6)) * means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


@lru_cache(maxsize=None)
def _dynamic_map(device: torch.device) -> Tensor:
    return create_dynamic_map().to(device)


@lru_cache(maxsize=None)
def _nf4_bounds(device: torch.device) -> Tensor:
    """fp32 midpoints between neighbouring NF4 codes (a value on a midpoint takes the lower code)."""
    return ((NF4_CODE[:-1] + NF4_CODE[1:]) / 2).to(device)


@lru_cache(maxsize=None)
def _byte_table(device: torch.device) -> Tensor:
    """(256, 2) fp32: the two NF4 codes (high nibble, low nibble) of every packed byte."""
    byte = torch.arange(256)
    return torch.stack((NF4_CODE[byte >> 4], NF4_CODE[byte & 15]), dim=1).to(device)


@lru_cache(maxsize=None)
def _dynamic_lut(device: torch.device) -> Tensor:
    """int64 table: bin i of [-1, 1] (value -1 + 2i/65535 in fp32) -> number of code midpoints strictly below it."""
    code = create_dynamic_map()
    midpoints = (code[:-1] + code[1:]) * 0.5
    bins = torch.arange(_LUT_BINS, dtype=torch.float32)
    values = (bins + bins) / (_LUT_BINS - 1) - 1.0
    return torch.bucketize(values, midpoints).to(device)


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise InvalidArgumentError(f"NF4 blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, got {blocksize}")


def _blocks(flat: Tensor, blocksize: int) -> Tensor:
    """`flat` zero-padded to whole blocks, viewed (blocks, blocksize)."""
    pad = -flat.numel() % blocksize
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize) if pad else flat.view(-1, blocksize)


def _quantize_dynamic(x: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """8-bit blockwise quantization of fp32 `x` as bitsandbytes' CPU kernel does it: per block, bin index
    trunc(fma(65535, (clamp(x/absmax, -1, 1) + 1)/2, 1/2)) into the 65,536-bin table. Returns (codes, block absmax)."""
    blocks = _blocks(x, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inverse = torch.where(absmax == 0, 0.0, 1.0 / absmax)
    scaled = (blocks * inverse[:, None]).clamp_(-1.0, 1.0)
    half = (scaled + 1.0) * 0.5
    # fp32 fma emulated in fp64: the product is exact there, and the sum too wherever truncation can be affected
    bins = (half.double() * (_LUT_BINS - 1) + 0.5).float().long()
    codes = _dynamic_lut(x.device)[bins].to(torch.uint8)
    codes[absmax == 0] = 0
    return codes.view(-1)[: x.numel()], absmax


def _scale(flat: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Block absmax (fp32) and the values scaled into [-1, 1], with bitsandbytes' arithmetic: x·(1/absmax) for
    whole blocks, x/absmax for a short last block (whose absmax is also floored at 1e-38)."""
    n = flat.numel()
    full = n - n % blocksize
    whole = flat[:full].view(-1, blocksize)
    absmax = whole.abs().amax(dim=1)
    scaled = torch.empty(n + n % 2, dtype=torch.float32, device=flat.device)
    torch.mul(whole, (1.0 / absmax.clamp(min=_ABSMAX_FLOOR))[:, None], out=scaled[:full].view(-1, blocksize))
    if full < n:
        tail_absmax = flat[full:].abs().amax().clamp(min=_ABSMAX_FLOOR)
        torch.div(flat[full:], tail_absmax, out=scaled[full:n])
        absmax = torch.cat((absmax, tail_absmax[None]))
    scaled[n:] = 0.0
    return absmax, scaled.clamp_(-1.0, 1.0)


def quantize_nf4(w: Tensor, blocksize: int = 64, double_quant: bool = True) -> tuple[Tensor, NF4State]:
    """NF4-quantize `w` (fp16/bf16/fp32, any shape): packed uint8 ((n+1)//2, 1) and its state, as
    `bitsandbytes.functional.quantize_4bit(w, quant_type="nf4", blocksize=blocksize, compress_statistics=double_quant)`."""
    _check_blocksize(blocksize)
    if w.dtype not in _DTYPE_NAMES:
        raise InvalidArgumentError(f"NF4 quantizes float16, bfloat16 or float32 tensors, not {w.dtype}")
    if w.numel() == 0:
        raise ShapeMismatchError(f"cannot NF4-quantize an empty tensor of shape {tuple(w.shape)}")
    absmax, scaled = _scale(w.detach().reshape(-1).float(), blocksize)
    if not torch.isfinite(absmax).all():
        raise NonFiniteError("cannot NF4-quantize a tensor holding NaN or Inf")
    nibbles = torch.bucketize(scaled, _nf4_bounds(w.device), out_int32=True).to(torch.uint8).view(-1, 2)
    packed = ((nibbles[:, 0] << 4) | nibbles[:, 1]).unsqueeze(1)
    shape = tuple(w.shape)
    if not double_quant:
        return packed, NF4State(absmax=absmax, blocksize=blocksize, dtype=w.dtype, shape=shape)
    offset = absmax.mean()
    codes, nested_absmax = _quantize_dynamic(absmax - offset, NESTED_BLOCKSIZE)
    state = NF4State(
        absmax=codes,
        blocksize=blocksize,
        dtype=w.dtype,
        shape=shape,
        nested_absmax=nested_absmax,
        nested_quant_map=_dynamic_map(w.device).clone(),
        offset=offset.item(),
    )
    return packed, state


def block_absmax(state: NF4State) -> Tensor:
    """fp32 absmax per block; with double quant code[q]·nested_absmax[i // nested_blocksize] + offset."""
    if not state.double_quant:
        return state.absmax.float()
    codes = state.nested_quant_map.float()[state.absmax.long()]
    absmax = (_blocks(codes, state.nested_blocksize) * state.nested_absmax.float()[:, None]).view(-1)
    return absmax[: codes.numel()] + torch.tensor(state.offset, dtype=torch.float32, device=codes.device)


def dequantize_nf4(packed: Tensor, state: NF4State) -> Tensor:
    """W = NF4_CODE[q] · absmax[i // blocksize] in fp32, cast to the original dtype and shape."""
    n = state.numel
    data = packed.reshape(-1).view(torch.uint8).int()
    values = torch.nn.functional.embedding(data, _byte_table(packed.device)).view(-1)[:n]  # a fast gather on CPU and CUDA
    absmax = block_absmax(state).to(packed.device)
    out = torch.empty(absmax.numel(), state.blocksize, dtype=state.dtype, device=packed.device)
    torch.mul(_blocks(values, state.blocksize), absmax[:, None], out=out)  # fp32 product, rounded once to dtype
    out = out.view(-1)
    return (out if out.numel() == n else out[:n].clone()).view(state.shape)


def nf4_survival(w: Tensor, delta: Tensor, blocksize: int = 64, double_quant: bool = True) -> float | Tensor:
    """⟨deq(Q(W+ΔW)) − deq(Q(W)), ΔW⟩ / ‖ΔW‖²: the fraction of an update ΔW, merged into the dequantized NF4 base
    W, that survives requantization (0: erased, 1: kept). A (batch, out, in) stack gives one value per matrix."""
    if w.shape != delta.shape:
        raise ShapeMismatchError(f"weight {tuple(w.shape)} and update {tuple(delta.shape)} differ in shape")
    if w.dim() == 3:
        return torch.tensor([nf4_survival(wi, di, blocksize, double_quant) for wi, di in zip(w, delta)])
    delta = delta.float()
    base = dequantize_nf4(*quantize_nf4(w, blocksize, double_quant)).float()
    merged = dequantize_nf4(*quantize_nf4((w.float() + delta).to(w.dtype), blocksize, double_quant)).float()
    energy = delta.square().sum()
    return 0.0 if energy == 0 else (torch.vdot((merged - base).view(-1), delta.view(-1)) / energy).item()


def _quant_state_json(state: NF4State) -> dict:
    meta = {
        "quant_type": "nf4",
        "blocksize": state.blocksize,
        "dtype": _DTYPE_NAMES[state.dtype],
        "shape": list(state.shape),
    }
    if state.double_quant:
        meta |= {"nested_blocksize": state.nested_blocksize, "nested_dtype": "float32", "nested_offset": state.offset}
    return meta


def nf4_state_dict(name: str, packed: Tensor, state: NF4State) -> dict[str, Tensor]:
    """Checkpoint tensors of an NF4 weight `name`, with the keys and values bitsandbytes' Linear4bit saves
    (`QuantState.as_dict(packed=True)` under `name.`)."""
    tensors = {name: packed, f"{name}.absmax": state.absmax, f"{name}.quant_map": NF4_CODE.clone()}
    if state.double_quant:
        tensors[f"{name}.nested_absmax"] = state.nested_absmax
        tensors[f"{name}.nested_quant_map"] = state.nested_quant_map.clone()
    text = json.dumps(_quant_state_json(state)).encode("utf-8")
    tensors[name + QUANT_STATE_SUFFIX] = torch.tensor(list(text), dtype=torch.uint8)
    return tensors


def is_nf4_weight(name: str, keys: Collection[str]) -> bool:
    """True when checkpoint `keys` hold `name` as a bitsandbytes NF4 weight."""
    return name + QUANT_STATE_SUFFIX in keys


def nf4_state_keys(name: str) -> tuple[str, ...]:
    """Every checkpoint key that an NF4 weight `name` may come with, besides `name` itself."""
    return tuple(name + suffix for suffix in (*_STAT_SUFFIXES, QUANT_STATE_SUFFIX))


def _tensor(tensors: Mapping[str, Tensor], key: str, dtype: torch.dtype, numel: int | None = None) -> Tensor:
    if key not in tensors:
        raise AdapterFormatError(f"NF4 weight is missing {key!r}")
    tensor = tensors[key]
    if tensor.dtype != dtype:
        raise AdapterFormatError(f"{key!r} must be {dtype}, found {tensor.dtype}")
    if numel is not None and tensor.numel() != numel:
        raise AdapterFormatError(f"{key!r} has {tensor.numel()} elements, expected {numel}")
    return tensor.reshape(-1)


def _read_meta(name: str, tensors: Mapping[str, Tensor]) -> dict:
    key = name + QUANT_STATE_SUFFIX
    if key not in tensors:
        other = [k for k in tensors if k.startswith(f"{name}.quant_state.")]
        detail = f"it has {other[0]!r}; only nf4 is supported" if other else f"{key!r} is missing"
        raise AdapterFormatError(f"{name!r} is not an NF4 weight: {detail}")
    meta = parse_json(bytes(_tensor(tensors, key, torch.uint8).tolist()), key, AdapterFormatError)
    if not isinstance(meta, dict) or meta.get("quant_type") != "nf4":
        raise AdapterFormatError(f"{key!r} does not describe an nf4 tensor: {meta!r}")
    return meta


def nf4_from_state_dict(name: str, tensors: Mapping[str, Tensor]) -> tuple[Tensor, NF4State]:
    """Parse the checkpoint tensors of NF4 weight `name` (as bitsandbytes or transformers save them)."""
    meta = _read_meta(name, tensors)
    blocksize, dtype_name, shape = meta.get("blocksize"), meta.get("dtype"), meta.get("shape")
    if blocksize not in BLOCKSIZES:
        raise AdapterFormatError(f"{name!r}: unsupported NF4 blocksize {blocksize!r}")
    if dtype_name not in _DTYPES:
        raise AdapterFormatError(f"{name!r}: unsupported NF4 dtype {dtype_name!r}")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise AdapterFormatError(f"{name!r}: bad NF4 shape {shape!r}")
    if name not in tensors:
        raise AdapterFormatError(f"NF4 weight is missing {name!r}")
    n = math.prod(shape)
    packed = tensors[name].contiguous().reshape(-1).view(torch.uint8)  # quant_storage other than uint8 is a view
    if packed.numel() != (n + 1) // 2:
        raise AdapterFormatError(f"{name!r} holds {packed.numel()} bytes, shape {shape} needs {(n + 1) // 2}")
    blocks = -(-n // blocksize)
    common = {"blocksize": blocksize, "dtype": _DTYPES[dtype_name], "shape": tuple(shape)}
    if f"{name}.nested_absmax" not in tensors:
        absmax = _tensor(tensors, f"{name}.absmax", torch.float32, blocks)
        return packed.unsqueeze(1), NF4State(absmax=absmax, **common)
    nested_blocksize, offset = meta.get("nested_blocksize"), meta.get("nested_offset")
    if not isinstance(nested_blocksize, int) or nested_blocksize <= 0 or not isinstance(offset, (int, float)):
        raise AdapterFormatError(f"{name!r}: double-quant fields missing or malformed in {meta!r}")
    if meta.get("nested_dtype", "float32") != "float32":
        raise AdapterFormatError(f"{name!r}: unsupported nested_dtype {meta['nested_dtype']!r}")
    state = NF4State(
        absmax=_tensor(tensors, f"{name}.absmax", torch.uint8, blocks),
        nested_absmax=_tensor(tensors, f"{name}.nested_absmax", torch.float32, -(-blocks // nested_blocksize)),
        nested_quant_map=_tensor(tensors, f"{name}.nested_quant_map", torch.float32, 256),
        nested_blocksize=nested_blocksize,
        offset=float(offset),
        **common,
    )
    return packed.unsqueeze(1), state


def quantization_config(
    double_quant: bool, compute_dtype: str = "bfloat16", skip_modules: list[str] | None = None, blocksize: int = 64
) -> dict:
    """The config.json `quantization_config` of an NF4 checkpoint, as transformers' BitsAndBytesConfig.to_dict()
    writes it. transformers has no blocksize setting (each weight's quant_state carries its own); `blocksize` is
    only checked here."""
    _check_blocksize(blocksize)
    if compute_dtype not in _DTYPES:
        raise InvalidArgumentError(f"compute dtype must be one of {', '.join(_DTYPES)}, got {compute_dtype!r}")
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": False,
        "_load_in_4bit": True,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": list(skip_modules) if skip_modules is not None else None,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "load_in_4bit": True,
        "load_in_8bit": False,
    }
