"""FP8 (e4m3) weights of base checkpoints (DESIGN §16): the two layouts, which scheme each stored weight has, its
scale tensors' checks, and the codec math W = q·s per tensor, per output channel or per block, decoded to float32
and encoded with fresh scales bit-exact with each layout's reference quantizer:

- compressed-tensors `float-quantized` (`FloatQuantizationCompressor` with `calculate_qparams`' scales):
  s = amax/448 in the weight's dtype (0 → that dtype's eps), stored in the scale's dtype; q = fp8(clamp(W/s, ±448))
  with W/s in the promoted dtype of W and s.
- the fine-grained / DeepSeek-V3 layout (`weight_quant`): s = amax/448 in float32 (0 → 1); q = fp8(W/s), stored as
  `weight_scale_inv` (a multiplier despite its name).

The math runs in cache-sized row bands, a few torch calls per band (never a loop per block). Nothing here reads
files: `checkpoints.fp8` applies it to a container's tensors.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import BaseMismatchError, InvalidArgumentError, NonFiniteError
from .quantizing import retained_sums

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
"""The largest finite e4m3fn value (casts beyond it saturate to ±448 in torch)."""
COMPRESSED_TENSORS, FINE_GRAINED = "compressed-tensors", "fine-grained"
LAYOUTS = (COMPRESSED_TENSORS, FINE_GRAINED)
STRATEGIES = ("tensor", "channel", "block")
DEFAULT_BLOCK = (128, 128)
SCALE_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})
MAX_BLOCK = 1 << 20
"""Largest block side a config may give (a sanity bound on a value read from a file)."""


@dataclass(frozen=True)
class FP8Scheme:
    """How one weight is stored in FP8: the layout (which rule, which scale name), the strategy, the block
    (strategy "block"), the stored scale's dtype and whether the config's static activation scheme needs an
    `input_scale` with it."""

    layout: str
    strategy: str
    block: tuple[int, int] | None = None
    scale_dtype: torch.dtype = torch.float32
    input_scale: bool = False

    @property
    def scale_suffix(self) -> str:
        """The scale tensor's name after the module path."""
        return "weight_scale_inv" if self.layout == FINE_GRAINED else "weight_scale"

    def scale_key(self, key: str) -> str:
        """`m.weight` → `m.weight_scale` (or `m.weight_scale_inv`)."""
        return f"{key.removesuffix('weight')}{self.scale_suffix}"

    def scale_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The scale's shape for a weight of `shape` (out, in): [1] (fine-grained per tensor: []), [out, 1] or
        [⌈out/bh⌉, ⌈in/bw⌉]."""
        if self.strategy == "channel":
            return (shape[0], 1)
        if self.strategy == "block":
            return (-(-shape[0] // self.block[0]), -(-shape[1] // self.block[1]))
        return () if self.layout == FINE_GRAINED else (1,)

    def entries(self, key: str, shape: Sequence[int]) -> dict[str, int]:
        """The weight's and its scale's keys in this scheme with their bytes."""
        return {key: math.prod(shape),
                self.scale_key(key): math.prod(self.scale_shape(shape)) * self.scale_dtype.itemsize}


def input_scale_key(key: str) -> str:
    """`m.weight` → `m.input_scale` (a static activation scale: kept as stored)."""
    return f"{key.removesuffix('weight')}input_scale"


# --------------------------------------------------------------------------- the math


BAND_ELEMENTS = 1 << 16
"""Elements per row band of the codec loops (its temporaries stay in the cache)."""
_SIGN_SHIFT_CLEAR = ~(1 << 14)
"""int16 mask clearing the bit that the sign extension of an e4m3 byte shifted into fp16's top exponent bit."""


def _splits(size: int, side: int) -> list[tuple[slice, slice, int]]:
    """(elements, blocks, block width) of the full blocks of a dimension and of its partial last block."""
    full = size // side * side
    parts = [(slice(0, full), slice(0, full // side), side)] if full else []
    if full < size:
        parts.append((slice(full, size), slice(full // side, full // side + 1), size - full))
    return parts


def _grid_shape(shape: Sequence[int], scheme: FP8Scheme) -> tuple[int, int]:
    """The scales as a 2-D grid: (1, 1) per tensor, (out, 1) per channel, the block grid per block."""
    if scheme.strategy == "block":
        return scheme.scale_shape(shape)  # type: ignore[return-value]
    return (shape[0], 1) if scheme.strategy == "channel" else (1, 1)


def _bands(shape: Sequence[int], scheme: FP8Scheme) -> Iterator[tuple[slice, slice]]:
    """Row bands of about BAND_ELEMENTS elements, none crossing a block row: (rows, their rows of the scale grid)."""
    rows, cols = shape
    height = scheme.block[0] if scheme.strategy == "block" else max(rows, 1)
    step = max(1, BAND_ELEMENTS // max(cols, 1))
    for top in range(0, rows, height):
        end = min(top + height, rows)
        grid_row = slice(top // height, top // height + 1)
        for start in range(top, end, step):
            band = slice(start, min(start + step, end))
            yield band, band if scheme.strategy == "channel" else grid_row


def _per_column(grid: Tensor, scheme: FP8Scheme, cols: int) -> Tensor:
    """The scale grid broadcastable against a band of rows: block scales repeated over their columns."""
    return grid.repeat_interleave(scheme.block[1], dim=1)[:, :cols] if scheme.strategy == "block" else grid


def _half_bits(q: Tensor) -> Tensor:
    """e4m3 values as float16 of value·2⁻⁸, exactly (fp16's wider exponent holds every e4m3 value, subnormals
    included, when the byte's 7 magnitude bits move up by 7): sign-extend, shift, clear the sign's copy."""
    bits = q.view(torch.int8).to(torch.int16)
    bits <<= 7
    bits &= _SIGN_SHIFT_CLEAR
    return bits.view(torch.float16)


def _has_nan(q: Tensor) -> bool:
    """True when some e4m3 byte is NaN: 0x7F (the largest int8) or 0xFF (the largest uint8)."""
    return q.numel() > 0 and (int(q.view(torch.int8).max()) == 0x7F or int(q.view(torch.uint8).max()) == 0xFF)


def decoding_grid(scale: Tensor, scheme: FP8Scheme, shape: Sequence[int], exact: bool) -> Tensor:
    """The float32 scales of a `shape` weight broadcastable against its row bands (`_per_column`), times 2⁸
    unless `exact` (the grid of `decode_band`)."""
    grid = scale.to(torch.float32).reshape(_grid_shape(shape, scheme))
    return _per_column(grid if exact else grid * 256.0, scheme, shape[1])


def decode_band(q: Tensor, grid: Tensor, exact: bool, values: Tensor) -> Tensor:
    """`values` (float32, q's shape) = q·s for a band of rows of q and their rows of `decoding_grid`: e4m3 → float
    through float16 bits (`_half_bits`, 2⁻⁸ folded into the grid, exact) unless `exact` (NaN bytes, which would
    decode finite that way, are converted the plain way)."""
    # convert, then scale in float32 (a mixed-dtype broadcast multiply is many times slower)
    return values.copy_(q if exact else _half_bits(q)).mul_(grid)


def dequantize_fp8(q: Tensor, scale: Tensor, scheme: FP8Scheme, out: Tensor | None = None) -> Tensor:
    """W = q·s in float32 (each element times the scale of its tensor, row or block), per cache-sized row band
    (`decode_band`), into `out` (float32 of q's shape; a new tensor when None)."""
    weight = torch.empty(q.shape, dtype=torch.float32, device=q.device) if out is None else out
    exact = _has_nan(q)
    grid = decoding_grid(scale.to(q.device), scheme, q.shape, exact)
    for band, row in _bands(q.shape, scheme):
        decode_band(q[band], grid[row], exact, weight[band])
    return weight


def fresh_scales(weight: Tensor, scheme: FP8Scheme) -> Tensor:
    """The scales the layout's reference gives W, as a 2-D grid (`_grid_shape`) in the scheme's scale dtype.

    compressed-tensors: amax/448 computed in float32 and rounded to W's dtype, zeros → eps of W's dtype, then
    stored in the scale dtype; fine-grained: amax/448 in float32, zeros → 1.
    """
    amax = weight.new_zeros(_grid_shape(weight.shape, scheme))
    width = scheme.block[1] if scheme.strategy == "block" else max(weight.shape[1], 1)
    columns = _splits(weight.shape[1], width)
    for band, row in _bands(weight.shape, scheme):
        magnitude = weight[band].abs()
        for cols, blocks, size in columns:
            part = magnitude[:, cols].unflatten(1, (-1, size)).amax(dim=2)
            if scheme.strategy != "channel":
                part = part.amax(dim=0, keepdim=True)
            index = (row, blocks if scheme.strategy == "block" else slice(0, 1))
            torch.maximum(amax[index], part, out=amax[index])
    scale = amax.float().div_(E4M3_MAX)
    if scheme.layout == FINE_GRAINED:
        return scale.masked_fill_(scale == 0, 1.0)
    scale = scale.to(weight.dtype)
    return scale.masked_fill_(scale == 0, torch.finfo(weight.dtype).eps).to(scheme.scale_dtype)


def _quantizing(weight: Tensor, scheme: FP8Scheme) -> tuple[Tensor, Tensor, Iterator[tuple[slice, slice]]]:
    """(q, s as a grid, the bands): q is written band by band as the iterator (`_bands`) goes on."""
    if weight.dim() != 2:
        raise InvalidArgumentError(f"FP8 quantizes 2-D weights, not shape {tuple(weight.shape)}")
    scale = fresh_scales(weight, scheme)
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise NonFiniteError(f"the FP8 scales of a weight of shape {list(weight.shape)} are not finite and positive "
                             f"in {str(scheme.scale_dtype).removeprefix('torch.')} (NaN/Inf in the weight, or "
                             "values out of the scale dtype's range); write the merge in bf16 or fp32")
    q = torch.empty(weight.shape, dtype=E4M3, device=weight.device)
    fine = scheme.layout == FINE_GRAINED
    work = torch.float32 if fine else torch.promote_types(weight.dtype, scale.dtype)  # the reference's W/s dtype
    grid = _per_column(scale.to(work), scheme, weight.shape[1])  # widened exactly: one dtype, the fast kernels

    def bands() -> Iterator[tuple[slice, slice]]:
        buffer = torch.empty(min(q.numel(), max(BAND_ELEMENTS, q.shape[1])), dtype=work, device=q.device)
        for band, row in _bands(weight.shape, scheme):
            scaled = buffer[: q[band].numel()].view(q[band].shape)
            torch.div(weight[band], grid[row], out=scaled).clamp_(-E4M3_MAX, E4M3_MAX)  # W/s computed in `work`
            q[band].copy_(scaled.float())  # exact; torch casts float32 to e4m3 5-8x faster than bf16/fp16
            yield band, row

    return q, scale, bands()


def quantize_fp8(weight: Tensor, scheme: FP8Scheme) -> tuple[Tensor, Tensor]:
    """(q, s): W quantized to e4m3 with fresh scales (`fresh_scales`), bit-exact with the layout's reference:
    q = fp8(clamp(W/s, ±448)), W/s in the promoted dtype of W and s (float32 in the fine-grained rule)."""
    q, scale, bands = _quantizing(weight, scheme)
    for _ in bands:
        pass
    return q, scale.reshape(scheme.scale_shape(weight.shape))


def requantize_fp8(weight: Tensor, scheme: FP8Scheme, base: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(q, s, retained sums): `quantize_fp8` of a merged weight W and `retained_sums(base, q·s, W)` (ΔW = W − base),
    each band measured while it is in the cache: W is read once, q·s never stored whole.

    q holds no NaN (its scales are finite and positive, W/s is clamped), so its bands decode through float16 bits.
    """
    q, scale, bands = _quantizing(weight, scheme)
    grid = decoding_grid(scale, scheme, weight.shape, exact=False)
    buffer = torch.empty(min(q.numel(), max(BAND_ELEMENTS, q.shape[1])), dtype=torch.float32, device=q.device)
    sums = torch.zeros(2, dtype=torch.float64)
    for band, row in bands:
        after = decode_band(q[band], grid[row], False, buffer[: q[band].numel()].view(q[band].shape))
        sums = sums + retained_sums(base[band], after, weight[band])
    return q, scale.reshape(scheme.scale_shape(weight.shape)), sums


# --------------------------------------------------------------------------- configs


def _field(config: Mapping, name: str, types: type | tuple[type, ...], where: str, default: object = ...) -> object:
    """config[name], checked to be of `types` (BaseMismatchError naming the field otherwise)."""
    if name not in config:
        if default is ...:
            raise BaseMismatchError(f"{where} has no {name!r}")
        return default
    value, types = config[name], types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or isinstance(value, bool) and bool not in types:  # JSON true is no integer
        raise BaseMismatchError(f"{where}: {name!r} is {value!r}, not of the expected type")
    return value


def _block(value: object, where: str) -> tuple[int, int]:
    """A [height, width] block of positive ints."""
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_BLOCK for v in value)):
        raise BaseMismatchError(f"{where} must be two positive integers, not {value!r}")
    return value[0], value[1]


@dataclass(frozen=True)
class FP8Group:
    """One compressed-tensors config group: the modules it targets and the weight scheme (scale dtype unset)."""

    targets: tuple[str, ...]
    scheme: FP8Scheme

    def matches(self, module: str) -> bool:
        """compressed-tensors' name rule for checkpoints: `re:` entries match by regex, plain names exactly; a class
        name such as "Linear" (unknowable from a file) matches every module."""
        return any(re.match(t[3:], module) if t.startswith("re:") else t == module or "." not in t and t[:1].isupper()
                   for t in self.targets)


@dataclass(frozen=True)
class FP8Config:
    """A checkpoint's FP8 quantization_config: its layout and groups (fine-grained: one). Which weights are FP8 is
    what the file stores (F8_E4M3 with a scale); the config's unconverted modules (`ignore`,
    `modules_to_not_convert`) are checked for type and kept in outputs as they are."""

    layout: str
    groups: tuple[FP8Group, ...]

    def scheme(self, module: str) -> FP8Scheme | None:
        """The scheme of the first group whose targets match `module` (None: no group does)."""
        return next((g.scheme for g in self.groups if g.matches(module)), None)


def is_fp8_config(config: Mapping) -> bool:
    """True when config.json's quantization_config declares FP8 weights (fine-grained, or compressed-tensors
    float-quantized)."""
    qc = config.get("quantization_config")
    if not isinstance(qc, Mapping):
        return False
    if qc.get("quant_method") == "fp8":
        return True
    return qc.get("quant_method") == "compressed-tensors" and (
        qc.get("format") == "float-quantized"
        or any(isinstance(g, Mapping) and g.get("format") == "float-quantized"
               for g in (qc.get("config_groups") or {}).values() if isinstance(qc.get("config_groups"), Mapping)))


def parse_fp8_config(config: Mapping) -> FP8Config:
    """The FP8Config of config.json, every field checked (BaseMismatchError naming the field)."""
    qc = config["quantization_config"]
    where = "config.json quantization_config"
    if qc.get("quant_method") == "fp8":
        fmt = _field(qc, "fmt", str, where, "e4m3")
        if fmt != "e4m3":
            raise BaseMismatchError(f"{where}: fmt {fmt!r} is not supported (FP8 bases must be e4m3)")
        if _field(qc, "scale_fmt", str, where, "float") != "float":
            raise BaseMismatchError(f"{where}: scale_fmt {qc['scale_fmt']!r} is not supported (float32 scales only)")
        block = _field(qc, "weight_block_size", (list, type(None)), where, list(DEFAULT_BLOCK))
        block = None if block is None else _block(block, f"{where}: weight_block_size")
        static = _field(qc, "activation_scheme", str, where, "dynamic") == "static"
        _names(_field(qc, "modules_to_not_convert", (list, type(None)), where, None) or [], where)
        scheme = FP8Scheme(FINE_GRAINED, "tensor" if block is None else "block", block, torch.float32, static)
        return FP8Config(FINE_GRAINED, (FP8Group(("Linear",), scheme),))
    groups = _field(qc, "config_groups", dict, where)
    parsed = []
    for name, group in groups.items():
        at = f"{where}: config_groups[{name!r}]"
        if not isinstance(group, dict):
            raise BaseMismatchError(f"{at} is not an object")
        weights = _field(group, "weights", dict, at)
        if (_field(weights, "type", str, at) != "float" or _field(weights, "num_bits", int, at) != 8
                or not _field(weights, "symmetric", bool, at, True)):
            raise BaseMismatchError(f"{at}: only symmetric 8-bit float weights are FP8 (got {weights!r})")
        strategy = _field(weights, "strategy", str, at)
        if strategy not in STRATEGIES:
            raise BaseMismatchError(f"{at}: weight strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
        block = _block(weights.get("block_structure"), f"{at}: block_structure") if strategy == "block" else None
        acts = _field(group, "input_activations", (dict, type(None)), at, None)
        static = bool(acts) and not _field(acts, "dynamic", (bool, str), at, False)
        parsed.append(FP8Group(_names(_field(group, "targets", list, at), at),
                               FP8Scheme(COMPRESSED_TENSORS, strategy, block, torch.float32, static)))
    _names(_field(qc, "ignore", (list, type(None)), where, None) or [], where)
    return FP8Config(COMPRESSED_TENSORS, tuple(parsed))


def _names(values: list, where: str) -> tuple[str, ...]:
    """A list of module names / patterns (strings)."""
    if not all(isinstance(v, str) for v in values):
        raise BaseMismatchError(f"{where}: module lists must hold strings")
    return tuple(values)


MAX_SCALE = torch.finfo(torch.float32).max / E4M3_MAX
"""The largest scale whose dequantized weights stay finite in float32."""


def check_scale(key: str, scale_key: str, scale: Tensor) -> None:
    """BaseMismatchError naming the scale tensor of `key` unless every value is finite, positive and small enough
    for q·s to stay finite in float32."""
    values = scale.float()
    bad = values[~((values > 0) & (values <= MAX_SCALE))].flatten()  # NaN fails both comparisons
    if bad.numel():
        raise BaseMismatchError(f"FP8 scale {scale_key!r} of {key!r} holds {bad[0].item()!r}: scales must be finite, "
                                f"positive and at most {MAX_SCALE:.3g}")


def output_config(scheme: FP8Scheme, ignore: Sequence[str]) -> dict:
    """The quantization_config of an FP8 output in `scheme`, leaving the `ignore` modules unconverted."""
    if scheme.layout == FINE_GRAINED:
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": None if scheme.block is None else list(scheme.block),
                "modules_to_not_convert": list(ignore)}
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": scheme.strategy,
               "dynamic": False, "actorder": None, "observer": None, "observer_kwargs": {}}
    if scheme.block is not None:
        weights["block_structure"] = list(scheme.block)
    return {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "float-quantized"}},
        "ignore": list(ignore), "kv_cache_scheme": None, "global_compression_ratio": None,
        "sparsity_config": {}, "transform_config": {},
    }


def output_scheme(layout: str = COMPRESSED_TENSORS, strategy: str | None = None,
                  scale_dtype: torch.dtype = torch.float32) -> FP8Scheme:
    """The scheme of a `--dtype fp8` output: compressed-tensors (default strategy block) or fine-grained
    (block only; float32 scales)."""
    if layout not in LAYOUTS:
        raise InvalidArgumentError(f"FP8 format {layout!r} is not one of {', '.join(LAYOUTS)}")
    strategy = strategy or "block"
    if strategy not in STRATEGIES:
        raise InvalidArgumentError(f"FP8 scheme {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if layout == FINE_GRAINED:
        if strategy != "block":
            raise InvalidArgumentError("the fine-grained FP8 format stores 128x128 blocks: use --fp8-scheme block "
                                       "or --fp8-format compressed-tensors")
        return FP8Scheme(FINE_GRAINED, "block", DEFAULT_BLOCK, torch.float32)
    return FP8Scheme(COMPRESSED_TENSORS, strategy, DEFAULT_BLOCK if strategy == "block" else None, scale_dtype)
