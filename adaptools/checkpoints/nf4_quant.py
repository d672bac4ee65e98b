"""NF4 codec in the bitsandbytes layout (bit-exact with bitsandbytes 0.50.2 on CPU): quantize, dequantize,
checkpoint tensors and the transformers `quantization_config`.

Quantize: per block of `blocksize` elements (row-major), q = nearest NF4 code of x / absmax; two codes per byte.
Double quant stores the block absmax as 8-bit codes of (absmax - mean) in blocks of 256 (bitsandbytes' dynamic map).
"""
from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from ..device import torch_threads
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
def _nibble_table(device: torch.device) -> Tensor:
    """Nearest-code lookup on the bits of an fp32 value x, split into its top 16 bits h and low 16 bits l:
    code(x) = (T[h] + l') >> 16, with l' = l where x >= 0 and 0xFFFF - l where x < 0 (x grows with l' for fixed h).

    The fp32 values with top bits h form an interval; T[h] (int32) = 65536·(midpoints below it), plus
    65535 - l'(m) when a midpoint m lies inside (at most one does: the intervals are far narrower than the gaps
    between midpoints), so that the sum carries into the code exactly where l' > l'(m), i.e. x > m. So the lookup
    is exactly `bucketize(x, midpoints)` (a value on a midpoint takes the lower code).
    """
    bounds = _nf4_bounds(torch.device("cpu"))
    h = torch.arange(1 << 16, dtype=torch.int64)
    ends = torch.stack(((h << 16).to(torch.int32), ((h << 16) | 0xFFFF).to(torch.int32))).view(torch.float32)
    lo, hi = torch.minimum(*ends).nan_to_num(0.0), torch.maximum(*ends).nan_to_num(0.0)  # NaN/Inf: never looked up
    table = (bounds < lo[:, None]).sum(dim=1) << 16
    inside = (bounds >= lo[:, None]) & (bounds <= hi[:, None])
    assert int(inside.sum(dim=1).max()) <= 1
    rows, cols = inside.nonzero(as_tuple=True)
    low = bounds[cols].view(torch.int32).to(torch.int64) & 0xFFFF
    table[rows] += 0xFFFF - torch.where(bounds[cols] < 0, 0xFFFF - low, low)
    return table.to(torch.int32).to(device)


@lru_cache(maxsize=None)
def _byte_table(device: torch.device) -> Tensor:
    """(256, 2) fp32: the two NF4 codes (high nibble, low nibble) of every packed byte."""
    byte = torch.arange(256)
    return torch.stack((NF4_CODE[byte >> 4], NF4_CODE[byte & 15]), dim=1).to(device)


@lru_cache(maxsize=None)
def _pair_table(device: torch.device) -> Tensor:
    """The four fp32 NF4 codes of every two packed bytes, indexed by the bytes read as one uint16 (in this
    machine's byte order); stored as 65,536 complex128 (16 bytes each): a 1-D lookup of 16-byte items is faster
    than one of 4-float rows."""
    pair = torch.arange(1 << 16)
    first, second = (pair & 255, pair >> 8) if sys.byteorder == "little" else (pair >> 8, pair & 255)
    table = _byte_table(torch.device("cpu"))
    return torch.cat((table[first], table[second]), dim=1).view(torch.complex128).view(-1).to(device)


@lru_cache(maxsize=None)
def _dynamic_lut(device: torch.device) -> Tensor:
    """uint8 table: bin i of [-1, 1] (value -1 + 2i/65535 in fp32) -> number of code midpoints strictly below it."""
    code = create_dynamic_map()
    midpoints = (code[:-1] + code[1:]) * 0.5
    bins = torch.arange(_LUT_BINS, dtype=torch.float32)
    values = (bins + bins) / (_LUT_BINS - 1) - 1.0
    return torch.bucketize(values, midpoints).to(torch.uint8).to(device)


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
    half = (blocks * inverse[:, None]).clamp_(-1.0, 1.0).add_(1.0).mul_(0.5)
    # fp32 fma emulated in fp64: the product is exact there, and the sum too wherever truncation can be affected
    bins = half.double().mul_(_LUT_BINS - 1).add_(0.5).float().int()
    codes = torch.index_select(_dynamic_lut(x.device), 0, bins.view(-1)).view(bins.shape)
    codes[absmax == 0] = 0
    return codes.view(-1)[: x.numel()], absmax


_BITS = {torch.float32: (torch.int32, 0x7FFFFFFF), torch.float16: (torch.int16, 0x7FFF),
         torch.bfloat16: (torch.int16, 0x7FFF)}
"""The integer view of each float dtype and the mask that clears its sign: for non-negative floats (NaN above
Inf) the order of the bit patterns is the order of the values, so max |x| is an integer max."""


class _Scratch:
    """One thread's chunk buffers for the quantizer (allocated once, reused from chunk to chunk)."""

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device):
        self.scaled = torch.empty(size, dtype=torch.float32, device=device)
        self.index = torch.empty(size, dtype=torch.int32, device=device)  # also |x| as bits, l', the packed pairs
        self.codes = torch.empty(size, dtype=torch.int32, device=device)
        self.bits = self.index.view(_BITS[dtype][0])


def _pack_codes(scaled: Tensor, out: Tensor, scratch: _Scratch) -> None:
    """out (n/2 bytes) = the nearest NF4 codes of fp32 `scaled` (n even), two per byte, the first in the high
    nibble: code = (T[h] + l') >> 16 on the top 16 bits h and the sign-adjusted low 16 bits l' (`_nibble_table`)."""
    n = scaled.numel()
    bits, index, codes = scaled.view(torch.int32), scratch.index[:n], scratch.codes[:n]
    torch.bitwise_right_shift(bits, 16, out=index)
    index.bitwise_and_(0xFFFF)
    torch.index_select(_nibble_table(scaled.device), 0, index, out=codes)  # int32: the fastest gather
    low = torch.bitwise_right_shift(bits, 31, out=index)  # -1 where x < 0, else 0
    low.bitwise_xor_(bits).bitwise_and_(0xFFFF)  # l' (the low bits flipped where x < 0)
    codes.add_(low).bitwise_right_shift_(16)
    pairs, packed = codes.view(-1, 2), index[: n // 2]
    torch.add(pairs[:, 1], pairs[:, 0], alpha=16, out=packed)
    out.copy_(packed)


CHUNK_ELEMENTS = 2**18
"""Elements per CPU chunk: large enough that each torch op's fixed cost (dispatch, the GIL) is small against its
work, small enough that the chunk's temporaries (`_Scratch`, 3 MiB) stay in the cache (the fastest of 2^15..2^21
for both codecs on 2 cores)."""


def _for_chunks(total: int, blocksize: int, device: torch.device, work: Callable[[int, int, object], None],
                scratch: Callable[[int], object]) -> None:
    """work(start, stop, buffers) for consecutive block-aligned chunks [start, stop) of [0, total) elements.

    On the CPU the chunks are CHUNK_ELEMENTS long and split into contiguous runs, one per torch thread, each on
    a thread of its own (torch releases the GIL inside its ops) with its own `scratch(size)` buffers and torch's
    intra-op threads set to 1: a chunk's ops are too short to share out, the threads share the chunks.
    On other devices: one chunk.
    """
    if total <= 0:
        return
    if device.type != "cpu":
        work(0, total, scratch(total))
        return
    chunk = max(blocksize, CHUNK_ELEMENTS // blocksize * blocksize)
    starts = range(0, total, chunk)
    threads = min(torch.get_num_threads(), len(starts))

    def run(part: range) -> None:
        buffers = scratch(min(chunk, total))
        for start in part:
            work(start, min(total, start + chunk), buffers)

    if threads <= 1:
        run(starts)
        return
    per = -(-len(starts) // threads)
    with torch_threads(1), ThreadPoolExecutor(threads, thread_name_prefix="adaptools-nf4") as pool:
        list(pool.map(run, [starts[i:i + per] for i in range(0, len(starts), per)]))


def quantize_nf4(w: Tensor, blocksize: int = 64, double_quant: bool = True) -> tuple[Tensor, NF4State]:
    """NF4-quantize `w` (fp16/bf16/fp32, any shape): packed uint8 ((n+1)//2, 1) and its state, as
    `bitsandbytes.functional.quantize_4bit(w, quant_type="nf4", blocksize=blocksize, compress_statistics=double_quant)`.

    Per block: absmax = max |x| (fp32), scaled = x·(1/absmax) (x/absmax in a short last block, whose absmax is
    floored at 1e-38), the nearest code by fp32 midpoints (ties to the lower code). One pass over `w`, in
    cache-sized chunks.
    """
    _check_blocksize(blocksize)
    if w.dtype not in _DTYPE_NAMES:
        raise InvalidArgumentError(f"NF4 quantizes float16, bfloat16 or float32 tensors, not {w.dtype}")
    if w.numel() == 0:
        raise ShapeMismatchError(f"cannot NF4-quantize an empty tensor of shape {tuple(w.shape)}")
    flat = w.detach().reshape(-1)
    n, device = flat.numel(), flat.device
    full = n - n % blocksize
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=device)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    int_dtype, sign_mask = _BITS[flat.dtype]

    def chunk(start: int, stop: int, scratch: _Scratch) -> None:
        blocks = flat[start:stop].view(-1, blocksize)
        block_max = absmax[start // blocksize: stop // blocksize]
        bits = scratch.bits[: stop - start].view(blocks.shape)
        torch.bitwise_and(blocks.view(int_dtype), sign_mask, out=bits)  # |x| as bits: their max is max |x|
        block_max.copy_(bits.amax(dim=1).view(flat.dtype))
        scaled = scratch.scaled[: stop - start]
        scaled.copy_(flat[start:stop])  # then an fp32 in-place product: faster than one mixed-dtype multiply
        scaled.view(blocks.shape).mul_(block_max.clamp(min=_ABSMAX_FLOOR).reciprocal_()[:, None])
        _pack_codes(scaled, packed[start // 2: stop // 2], scratch)

    _for_chunks(full, blocksize, device, chunk, lambda size: _Scratch(size, flat.dtype, device))
    if full < n:
        tail = flat[full:].float()
        absmax[-1] = tail.abs().amax().clamp(min=_ABSMAX_FLOOR)
        scaled = torch.zeros(n - full + n % 2, dtype=torch.float32, device=device)  # an odd end pads code 7 (0.0)
        torch.div(tail, absmax[-1], out=scaled[: n - full])
        _pack_codes(scaled, packed[full // 2:], _Scratch(scaled.numel(), flat.dtype, device))
    if not absmax.max() < math.inf:  # absmax >= 0, and a NaN propagates through max
        raise NonFiniteError("cannot NF4-quantize a tensor holding NaN or Inf")
    packed = packed.unsqueeze(1)
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
    """W = NF4_CODE[q] · absmax[i // blocksize] in fp32, cast to the original dtype and shape.

    Whole blocks go in cache-sized chunks, two packed bytes (four codes) per table lookup (`_pair_table`).
    """
    n, blocksize, device = state.numel, state.blocksize, packed.device
    data = packed.reshape(-1).view(torch.uint8)
    if data.numel() != (n + 1) // 2:
        raise ShapeMismatchError(f"{data.numel()} packed bytes cannot hold {n} NF4 codes")
    if data.data_ptr() % 2:  # the pair lookup reads bytes two at a time
        data = data.clone()
    absmax = block_absmax(state).to(device)
    out = torch.empty(n, dtype=state.dtype, device=device)
    full = n - n % blocksize
    pairs = _pair_table(device)

    def chunk(start: int, stop: int, buffers: tuple[Tensor, Tensor]) -> None:
        index, values = buffers[0][: (stop - start) // 4], buffers[1][: (stop - start) // 4]
        index.copy_(data[start // 2: stop // 2].view(torch.uint16))
        torch.index_select(pairs, 0, index, out=values)
        torch.mul(values.view(torch.float32).view(-1, blocksize), absmax[start // blocksize: stop // blocksize, None],
                  out=out[start:stop].view(-1, blocksize))  # fp32 product, rounded once to dtype

    _for_chunks(full, blocksize, device, chunk, lambda size: (
        torch.empty(size // 4, dtype=torch.int32, device=device),
        torch.empty(size // 4, dtype=torch.complex128, device=device)))
    if full < n:
        values = _byte_table(device)[data[full // 2:].long()].view(-1)[: n - full]
        torch.mul(values, absmax[-1], out=out[full:])
    return out.view(state.shape)


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
