"""FP8 codecs (DESIGN §16): read FP8 bases, write FP8 outputs, on the merge engine's decoder/encoder interface.

- `FP8Decoder` reads a checkpoint whose config declares FP8 (fine-grained `quant_method: fp8`, or
  compressed-tensors `float-quantized`): each F8_E4M3 weight, with its scale (`weight_scale_inv` /
  `weight_scale`) and static `input_scale`, is one tensor to the merge, dequantized to float32 (W = q·s).
- `FP8Encoder` writes FP8: from an FP8 base it requantizes each merged weight in the base's own scheme with fresh
  scales (unchanged weights are copied byte for byte, input scales kept) and measures how much of ΔW survives;
  from an unquantized or NF4 base it quantizes the linear weights (`quantize --to fp8`, `merge --dtype fp8`) in
  compressed-tensors' format (default) or the fine-grained layout, leaving embeddings, norms, lm_head and the
  skip patterns' modules unquantized and listed in the config's `ignore` / `modules_to_not_convert`.
- An FP8 base merged with `--dtype bf16|fp16|fp32` is written dequantized (the shared DequantizedEncoder).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import BaseMismatchError, InvalidArgumentError
from .container import Container
from .fp8_format import (
    COMPRESSED_TENSORS,
    E4M3,
    SCALE_DTYPES,
    FP8Config,
    FP8Scheme,
    check_scale,
    dequantize_fp8,
    input_scale_key,
    is_fp8_config,
    output_config,
    output_scheme,
    parse_fp8_config,
    quantize_fp8,
    requantize_fp8,
)
from .quantizing import chosen_weights, ratio
from .safetensors_io import DTYPE_NAMES, TensorInfo
from .stored import CastEncoder, StoredDecoder, TensorSpec, check_range, is_conv1d

NAME = "fp8"
TARGETS = frozenset({"fp8"})
"""The output dtypes this codec encodes into."""
OPTIONS = frozenset({"fp8_scheme", "fp8_format"})
"""The keyword options its encoder takes (besides `skip`, which `quantize` passes)."""
FLOAT8_DTYPES = frozenset({torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz})
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_inv")


def detect(ckpt: Container) -> bool:
    """True when the base's config.json declares FP8 weights, or float8 weights come with scale tensors."""
    if is_fp8_config(ckpt.config):
        return True
    weights = (k[: k.rindex("_scale")] for k in ckpt.keys() if k.endswith(SCALE_SUFFIXES))
    return any(w in ckpt and ckpt.dtype(w) in FLOAT8_DTYPES for w in weights)


@dataclass(frozen=True)
class FP8Spec(TensorSpec):
    """An FP8 weight of the base as the merge sees it: float32 of its stored shape, its scheme, and the stored
    keys that go with it (weight, scale[, input_scale]); `nbytes` counts all of them."""

    fmt: FP8Scheme
    keys: tuple[str, ...] = ()
    encoded = True


# --------------------------------------------------------------------------- reading an FP8 base


class FP8Decoder(StoredDecoder):
    """An FP8 checkpoint's weights dequantized to float32 (scales folded in); other tensors as stored."""

    def __init__(self, ckpt: Container):
        if not is_fp8_config(ckpt.config):
            raise BaseMismatchError(f"{str(ckpt.root)!r} holds float8 weights with scale tensors, but its config.json "
                                    "declares no FP8 quantization_config (quant_method fp8 or compressed-tensors)")
        self.config: FP8Config = parse_fp8_config(ckpt.config)
        self._specs: dict[str, TensorSpec] | None = None

    def specs(self, ckpt: Container) -> dict[str, TensorSpec]:
        """{key: spec} in shard order: FP8Spec per FP8 weight (its scales are not listed), TensorSpec otherwise."""
        if self._specs is None:
            weights = {k: self._fp8_spec(ckpt, k) for k in ckpt.keys() if ckpt.dtype(k) in FLOAT8_DTYPES
                       and k.endswith(".weight")}
            side = {k for spec in weights.values() for k in spec.keys[1:]}
            self._specs = {k: weights.get(k, spec) for k, spec in super().specs(ckpt).items() if k not in side}
        return self._specs

    def _fp8_spec(self, ckpt: Container, key: str) -> FP8Spec:
        """The weight's spec, its scale tensor checked: present, floating, of the scheme's shape (header), finite and
        positive (read: scales are small), so that a bad one fails before anything is written."""
        shape = ckpt.shape(key)
        if ckpt.dtype(key) != E4M3:
            raise BaseMismatchError(f"FP8 weight {key!r} is stored as {DTYPE_NAMES[ckpt.dtype(key)]}; only F8_E4M3 "
                                    "weights can be decoded")
        scheme = self.config.scheme(key.removesuffix(".weight"))
        if scheme is None:
            raise BaseMismatchError(f"FP8 weight {key!r} matches no config group of quantization_config")
        if len(shape) != 2:
            raise BaseMismatchError(f"FP8 weight {key!r} has shape {list(shape)}; FP8 weights are 2-D")
        scale = scheme.scale_key(key)
        if scale not in ckpt:
            raise BaseMismatchError(f"FP8 weight {key!r} has no scale tensor {scale!r}")
        expected = scheme.scale_shape(shape)
        allowed = {expected, (), (1,)} if expected in {(), (1,)} else {expected}
        if ckpt.shape(scale) not in allowed or ckpt.dtype(scale) not in SCALE_DTYPES:
            raise BaseMismatchError(
                f"FP8 scale {scale!r} is {DTYPE_NAMES.get(ckpt.dtype(scale), ckpt.dtype(scale))} of shape "
                f"{list(ckpt.shape(scale))}; the {scheme.strategy} scheme of a {list(shape)} weight needs a float "
                f"tensor of shape {list(expected)}")
        check_scale(key, scale, ckpt.get(scale))
        keys = [key, scale]
        act = input_scale_key(key)
        if scheme.input_scale and act not in ckpt:
            raise BaseMismatchError(f"FP8 weight {key!r} has no input scale {act!r}, which the config's static "
                                    "activation scheme needs")
        if act in ckpt:
            if ckpt.dtype(act) not in SCALE_DTYPES or len(ckpt.shape(act)) > 1 \
                    or ckpt.nbytes(act) > 4:
                raise BaseMismatchError(f"input scale {act!r} must be one float, not {list(ckpt.shape(act))}")
            keys.append(act)
        fmt = FP8Scheme(scheme.layout, scheme.strategy, scheme.block, ckpt.dtype(scale), scheme.input_scale)
        return FP8Spec(shape, torch.float32, ckpt.weight_map[key], sum(ckpt.nbytes(k) for k in keys), fmt,
                       tuple(keys))

    def read(self, ckpt: Container, key: str) -> Tensor:
        """The weight dequantized to float32, or the tensor as stored."""
        return self.read_into(ckpt, key, lambda shape, dtype: torch.empty(shape, dtype=dtype))

    def read_into(self, ckpt: Container, key: str, take: Callable[[tuple[int, ...], torch.dtype], Tensor]) -> Tensor:
        """`read`, an FP8 weight dequantized into `take(shape, torch.float32)`."""
        spec = self.specs(ckpt).get(key)
        if not isinstance(spec, FP8Spec):
            return ckpt.mapped(key)
        scale = ckpt.get(spec.keys[1]).reshape(spec.fmt.scale_shape(spec.shape))
        return dequantize_fp8(ckpt.mapped(key), scale, spec.fmt, take(spec.shape, torch.float32))

    def sources(self, ckpt: Container, key: str) -> dict[str, tuple[Path, TensorInfo]]:
        """The stored bytes of every tensor of weight `key`."""
        spec = self.specs(ckpt).get(key)
        keys = spec.keys if isinstance(spec, FP8Spec) else (key,)
        return {k: (ckpt.path(k), ckpt.info(k)) for k in keys}


# --------------------------------------------------------------------------- writing FP8


class FP8Encoder(CastEncoder):
    """FP8 output: the weights in `formats` quantized (weight + scale), the others as in the base.

    With `requantize` (an FP8 base) merged weights arrive in float32 and are requantized in their own scheme and
    scale dtype (the stored scale's shape and input scale kept), unchanged weights are copied as stored and
    `survival` measures each merged weight; otherwise tensors arrive in the base's dtype (the model one would
    have after merging) and are quantized as the reference quantizes that model.
    """

    row_wise = False
    """Blocks and per-tensor scales span rows: a weight is quantized whole."""

    def __init__(self, formats: dict[str, FP8Scheme], specs: dict[str, TensorSpec], device: torch.device,
                 requantize: bool, ckpt: Container, config: dict | None = None):
        super().__init__(None)
        self.formats, self.specs, self.device = formats, specs, device
        self.requantize, self.ckpt, self.config = requantize, ckpt, config

    @classmethod
    def requantizing(cls, ckpt: Container, specs: dict[str, TensorSpec], device: torch.device) -> FP8Encoder:
        """The encoder that writes an FP8 base's merge in FP8, each weight in its own scheme."""
        formats = {k: s.fmt for k, s in specs.items() if isinstance(s, FP8Spec)}
        return cls(formats, specs, device, requantize=True, ckpt=ckpt)

    @classmethod
    def quantizing(cls, ckpt: Container, specs: dict[str, TensorSpec], device: torch.device, *,
                   scheme: str | None = None, layout: str | None = None, skip: Sequence[str] = ()) -> FP8Encoder:
        """The encoder that quantizes an unquantized (or NF4) base's linear weights to FP8 in `layout`
        (compressed-tensors by default: scales in each weight's dtype; fine-grained: float32 block scales)."""
        template = output_scheme(layout or COMPRESSED_TENSORS, scheme)
        model_type = ckpt.config.get("model_type")
        chosen = [k for k in chosen_weights(specs, skip, "FP8") if not is_conv1d(model_type, k)]
        formats = {k: template if template.layout != COMPRESSED_TENSORS else
                   FP8Scheme(template.layout, template.strategy, template.block, specs[k].dtype) for k in chosen}
        kept = sorted(k.removesuffix(".weight") for k, s in specs.items() if k.endswith(".weight")
                      and len(s.shape) == 2 and k not in formats)
        ignore = ["lm_head", *(m for m in kept if m != "lm_head")]
        return cls(formats, specs, device, requantize=False, ckpt=ckpt, config=output_config(template, ignore))

    @property
    def label(self) -> str:
        return "fp8"

    @property
    def quantized(self) -> int:
        return len(self.formats)

    def dtype_for(self, spec: TensorSpec) -> torch.dtype:
        return torch.float32 if isinstance(spec, FP8Spec) else spec.dtype

    def keeps(self, key: str, spec: TensorSpec) -> bool:
        return self.requantize or key not in self.formats and not spec.encoded

    def entries(self, key: str, spec: TensorSpec) -> dict[str, int]:
        if isinstance(spec, FP8Spec):
            return {k: self.ckpt.nbytes(k) for k in spec.keys}
        fmt = self.formats.get(key)
        return {key: spec.numel * spec.dtype.itemsize} if fmt is None else fmt.entries(key, spec.shape)

    def encode(self, key: str, tensor: Tensor) -> dict[str, Tensor]:
        """FP8 weight and scale of a weight in `formats` (quantized on the encoder's device); others cast to the
        base's dtype."""
        spec, fmt = self.specs[key], self.formats.get(key)
        if fmt is None:
            if tensor.dtype != spec.dtype:
                check_range([key], tensor.unsqueeze(0), spec.dtype)
            return {key: tensor.to(spec.dtype)}
        if self.requantize:
            q, scale = quantize_fp8(tensor.to(self.device, torch.float32), fmt)
            return self._requantized(key, q, scale)
        if tensor.dtype != spec.dtype:
            check_range([key], tensor.unsqueeze(0), spec.dtype)
        q, scale = quantize_fp8(tensor.to(self.device, spec.dtype), fmt)
        return {key: q, fmt.scale_key(key): scale}

    def _requantized(self, key: str, q: Tensor, scale: Tensor) -> dict[str, Tensor]:
        """The stored tensors of a requantized FP8 weight: q, its scale in the stored scale's shape, the input
        scale kept."""
        keys = self.specs[key].keys  # type: ignore[attr-defined]
        encoded = {key: q, keys[1]: scale.reshape(self.ckpt.shape(keys[1]))}
        return {**encoded, **{k: self.ckpt.get(k) for k in keys[2:]}}

    def encode_merged(self, key: str, merged: Tensor, base: Tensor) -> tuple[dict[str, Tensor], float | None]:
        """A merged weight of an FP8 base requantized, and retained_fraction of the change after requantization
        measured in the same pass (`requantize_fp8`); other encodings as `encode`, unmeasured."""
        fmt = self.formats.get(key)
        if not self.requantize or fmt is None:
            return self.encode(key, merged), None
        q, scale, sums = requantize_fp8(merged.to(self.device, torch.float32), fmt, base.to(self.device))
        return self._requantized(key, q, scale), ratio(sums)

    def update_config(self, config: dict) -> dict:
        return config if self.config is None else {**config, "quantization_config": self.config}


def decoder(ckpt: Container) -> FP8Decoder:
    """The decoder of an FP8 base."""
    return FP8Decoder(ckpt)


def encoder(ckpt: Container, decoder: StoredDecoder, dtype: str | None, *, device: torch.device,
            fp8_scheme: str | None = None, fp8_format: str | None = None, skip: Sequence[str] = ()) -> FP8Encoder:
    """FP8 output: an FP8 base requantized in its own scheme (`fp8_scheme` / `fp8_format` must agree with it), or
    the linear weights of an unquantized or NF4 base quantized (compressed-tensors block scheme by default)."""
    specs = decoder.specs(ckpt)
    if isinstance(decoder, FP8Decoder):
        schemes = {(s.fmt.layout, s.fmt.strategy) for s in specs.values() if isinstance(s, FP8Spec)}
        wanted = {(fp8_format or layout, fp8_scheme or strategy) for layout, strategy in schemes}
        if skip or wanted != schemes:
            have = ", ".join(f"{layout} {strategy}" for layout, strategy in sorted(schemes))
            raise InvalidArgumentError(
                f"merging into an FP8 base keeps its own scheme ({have}); drop the FP8 options, or merge with "
                "--dtype bf16 and quantize the result")
        return FP8Encoder.requantizing(ckpt, specs, device)
    if type(decoder) is StoredDecoder and ckpt.config.get("quantization_config"):
        method = ckpt.config["quantization_config"].get("quant_method", "unknown")
        raise InvalidArgumentError(f"the base is quantized ({method}); FP8 outputs are made from fp16/bf16/fp32, "
                                   "NF4 or FP8 bases")
    return FP8Encoder.quantizing(ckpt, specs, device, scheme=fp8_scheme, layout=fp8_format, skip=skip)
