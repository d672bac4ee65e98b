"""NF4 codecs of the merge engine (DESIGN §7, §8): read bitsandbytes NF4 bases, write NF4 outputs.

- `NF4Decoder` reads a checkpoint that transformers/bitsandbytes saved in 4-bit (per weight `X.weight` packed
  uint8 + `X.weight.absmax`, `quant_map`, `nested_*`, `quant_state.bitsandbytes__nf4`): each weight is one
  tensor to the merge, dequantized (W = code[q]·absmax) to its original dtype and shape.
- `NF4Encoder` writes NF4: from an NF4 base it requantizes the merged weights with each weight's own
  blocksize and double-quant setting (unchanged weights are copied byte for byte) and measures how much of
  each ΔW survives; from an unquantized base it quantizes the linear weights (`quantize`, `merge --dtype nf4`).
- `detect`, `decoder` and `encoder` are this codec's entries in the registry (`adaptools.checkpoints.codecs`);
  an NF4 base merged into another dtype is written by `stored.DequantizedEncoder`.

Which weights are quantized: every 2-D floating `X.weight` except the modules a skip pattern matches.
The default patterns keep embeddings and the LM head unquantized (norms are 1-D). A pattern follows
transformers' `llm_int8_skip_modules` rule: it matches module name M when `re.match(pattern, M)` ends at a
module boundary ("layers.1" matches "layers.1.mlp", not "layers.11.mlp"; "layers\\.1.*\\.mlp" is a regex)
or when M ends with it ("down_proj"). The patterns are written into the output's `quantization_config`, so
transformers leaves exactly those modules unconverted when it loads the checkpoint.

GPT-2-style architectures store their projections (Conv1D) as (in, out); transformers quantizes them
transposed (out, in), so they are transposed on the way in and out and the merge sees the stored layout.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import BaseMismatchError, InvalidArgumentError
from .container import Container
from .nf4_quant import (
    NESTED_BLOCKSIZE,
    QUANT_STATE_SUFFIX,
    NF4State,
    dequantize_nf4,
    is_nf4_weight,
    nf4_from_state_dict,
    nf4_state_dict,
    nf4_state_keys,
    quantization_config,
    quantize_nf4,
)
from ..names import listed
from .safetensors_io import DTYPE_NAMES, TensorInfo
from .stored import DTYPES, CastEncoder, StoredDecoder, TensorSpec, check_range, is_conv1d

NAME = "nf4"
TARGETS = frozenset({"nf4"})
"""The output dtypes this codec encodes into."""
OPTIONS = frozenset({"double_quant"})
"""The keyword options its encoder takes."""

DEFAULT_SKIP = ("lm_head", r".*embed[^.]*", "wte", "wpe")
"""Modules left unquantized by default: the LM head and embeddings (embed_tokens, embed_in/out, word_embeddings,
GPT-2's wte/wpe). Norms and biases are 1-D and never quantized."""
QUANTIZABLE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
"""Dtypes of the weights bitsandbytes' NF4 quantizes (the quant state names one of them)."""
_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"
_OFFSET_FOR_SIZE = -1.2345678901234567e-05  # a nested_offset with a long repr: quant-state sizes for shard planning


# --------------------------------------------------------------------------- which weights, in which format


@dataclass(frozen=True)
class NF4Format:
    """How one weight is stored in NF4: blocksize, double quant, dtype before quantization, whether the
    checkpoint's unquantized layout is the transpose (Conv1D) of the quantized (out, in) matrix, and the dtype
    the packed data is stored as (bnb_4bit_quant_storage)."""

    blocksize: int
    double_quant: bool
    dtype: torch.dtype
    transposed: bool = False
    storage: torch.dtype = torch.uint8

    def entries(self, key: str, shape: Sequence[int]) -> dict[str, int]:
        """The checkpoint keys of weight `key` in this format with their bytes (the quant-state JSON's estimated)."""
        numel = math.prod(shape)
        blocks = -(-numel // self.blocksize)
        meta = dict(device="meta")
        state = NF4State(
            absmax=torch.empty(blocks, dtype=torch.uint8 if self.double_quant else torch.float32, **meta),
            blocksize=self.blocksize, dtype=self.dtype, shape=tuple(shape),
            nested_absmax=torch.empty(-(-blocks // NESTED_BLOCKSIZE), **meta) if self.double_quant else None,
            nested_quant_map=torch.empty(256, **meta) if self.double_quant else None,
            offset=_OFFSET_FOR_SIZE if self.double_quant else None,
        )
        packed = torch.empty((numel + 1) // 2, 1, dtype=torch.uint8, **meta)
        return {k: t.numel() * t.element_size() for k, t in nf4_state_dict(key, packed, state).items()}


@dataclass(frozen=True)
class NF4Spec(TensorSpec):
    """An NF4 weight of the base as the merge sees it: its unquantized shape and dtype, and its NF4 format;
    `nbytes` counts every stored tensor of the weight (each 64-byte aligned in the read buffer)."""

    fmt: NF4Format
    encoded = True


def skipped(module: str, patterns: Sequence[str]) -> bool:
    """transformers' `llm_int8_skip_modules` rule: a pattern matching from the start up to a module boundary
    (as a regex), or a suffix of the module name."""
    return any(re.match(rf"(?:{p}){_BOUNDARY}", module) or module.endswith(p) for p in patterns)


def _check_patterns(patterns: Sequence[str]) -> None:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise InvalidArgumentError(f"skip pattern {pattern!r} is not a valid regular expression ({exc})") from None


def quantized_formats(specs: dict[str, TensorSpec], model_type: str | None, *, blocksize: int, double_quant: bool,
                      skip: Sequence[str] = ()) -> dict[str, NF4Format]:
    """{key: format} of the base's weights to quantize: 2-D floating `*.weight` tensors whose module no pattern of
    DEFAULT_SKIP + `skip` matches. A `skip` pattern that matches none of these weights' modules is an error."""
    _check_patterns(skip)
    linear = [k for k, s in specs.items() if k.endswith(".weight") and len(s.shape) == 2 and s.dtype.is_floating_point]
    modules = [k.removesuffix(".weight") for k in linear]
    unused = [p for p in skip if not any(skipped(m, [p]) for m in modules)]
    if unused:
        raise InvalidArgumentError(
            f"skip pattern(s) {', '.join(map(repr, unused))} match no 2-D weight of the base (a pattern is a regex "
            "matched from the start of a module name up to a '.', or a suffix of it, e.g. 'down_proj')"
        )
    patterns = [*DEFAULT_SKIP, *skip]
    chosen = [k for k, m in zip(linear, modules) if not skipped(m, patterns)]
    refused = [f"{k} ({DTYPE_NAMES[specs[k].dtype]})" for k in chosen if specs[k].dtype not in QUANTIZABLE_DTYPES]
    if refused:
        raise BaseMismatchError(
            f"{len(refused)} weight(s) to quantize are stored in a dtype NF4 cannot take (fp16, bf16 or fp32): "
            f"{listed(refused)}; leave them as stored with a skip pattern"
        )
    return {k: NF4Format(blocksize, double_quant, specs[k].dtype, is_conv1d(model_type, k)) for k in chosen}


# --------------------------------------------------------------------------- reading an NF4 base


class NF4Decoder(StoredDecoder):
    """An NF4 checkpoint's weights dequantized (one tensor per weight, its stats folded in); other tensors as stored."""

    def __init__(self, ckpt: Container):
        self.model_type = ckpt.config.get("model_type")
        self._specs: dict[str, TensorSpec] | None = None

    @staticmethod
    def group(ckpt: Container, key: str) -> list[str]:
        """`key` and the stored statistics of NF4 weight `key`."""
        return [key, *(k for k in nf4_state_keys(key) if k in ckpt)]

    def specs(self, ckpt: Container) -> dict[str, TensorSpec]:
        """{key: spec} in shard order: NF4Spec per NF4 weight (its statistics are not listed), TensorSpec otherwise."""
        if self._specs is None:
            weights = [k.removesuffix(QUANT_STATE_SUFFIX) for k in ckpt.keys() if k.endswith(QUANT_STATE_SUFFIX)]
            groups = {w: self.group(ckpt, w) for w in weights}
            stats = {k for keys in groups.values() for k in keys[1:]}
            self._specs = {key: self._nf4_spec(ckpt, key, groups[key]) if key in groups else spec
                           for key, spec in super().specs(ckpt).items() if key not in stats}
        return self._specs

    def _nf4_spec(self, ckpt: Container, key: str, group: list[str]) -> NF4Spec:
        """The weight's spec from its quant-state JSON, checked against the other tensors' headers (not read)."""
        tensors = {k: torch.empty(ckpt.shape(k), dtype=ckpt.dtype(k), device="meta") for k in group}
        tensors[key + QUANT_STATE_SUFFIX] = ckpt.get(key + QUANT_STATE_SUFFIX)
        state = nf4_from_state_dict(key, tensors)[1]
        expected = {key, f"{key}.absmax", f"{key}.quant_map", key + QUANT_STATE_SUFFIX}
        if state.double_quant:
            expected |= {f"{key}.nested_absmax", f"{key}.nested_quant_map"}
        if set(group) != expected:
            raise BaseMismatchError(f"NF4 weight {key!r} is stored with {sorted(group)}; expected {sorted(expected)}")
        fmt = NF4Format(state.blocksize, state.double_quant, state.dtype, is_conv1d(self.model_type, key),
                        ckpt.dtype(key))
        shape = state.shape[::-1] if fmt.transposed else state.shape
        return NF4Spec(shape, fmt.dtype, ckpt.weight_map[key], sum(ckpt.nbytes(k) for k in group), fmt)

    def read(self, ckpt: Container, key: str) -> Tensor:
        """The weight dequantized, in the unquantized checkpoint layout (its stored tensors memory-mapped)."""
        if not is_nf4_weight(key, ckpt.weight_map):
            return ckpt.mapped(key)
        weight = dequantize_nf4(*nf4_from_state_dict(key, {k: ckpt.mapped(k) for k in self.group(ckpt, key)}))
        return weight.T if is_conv1d(self.model_type, key) else weight

    def sources(self, ckpt: Container, key: str) -> dict[str, tuple[Path, TensorInfo]]:
        """The stored bytes of every tensor of weight `key`."""
        return {k: (ckpt.path(k), ckpt.info(k)) for k in self.group(ckpt, key)}


# --------------------------------------------------------------------------- writing NF4 or dequantized outputs


RETAINED_CHUNK = 2**16
"""Elements per pass of retained_fraction (its float32 temporaries stay in the cache)."""


def retained_fraction(base: Tensor, after: Tensor, merged: Tensor) -> float | None:
    """⟨after − base, ΔW⟩ / ‖ΔW‖² with ΔW = merged − base: the part of the change that `after` (the stored
    result) keeps (1: all, 0: erased); None when ΔW = 0. Differences in float32, in cache-sized chunks."""
    base, after, merged = base.reshape(-1), after.reshape(-1), merged.reshape(-1)
    sums = []
    for start in range(0, base.numel(), RETAINED_CHUNK):
        part = slice(start, start + RETAINED_CHUNK)
        low = base[part].to(torch.float32, copy=True)  # negated in place below: never the caller's tensor
        delta = torch.sub(merged[part], low)
        sums.append(torch.stack((torch.vdot(low.neg_().add_(after[part]), delta), torch.vdot(delta, delta))))
    kept, energy = torch.stack(sums).double().sum(dim=0).tolist()
    return None if energy == 0 else kept / energy


class NF4Encoder(CastEncoder):
    """NF4 output: the weights in `formats` quantized (`nf4_state_dict` entries), the others as in the base.

    With `requantize` (an NF4 base) merged tensors arrive in float32, unchanged NF4 weights are copied as stored
    and `survival` measures each merged weight; otherwise (an unquantized base) tensors arrive in their own dtype
    and `quantization_config` is added to config.json.
    """

    row_wise = False
    """Blocks and their scales span rows: a weight is quantized whole."""

    def __init__(self, formats: dict[str, NF4Format], specs: dict[str, TensorSpec], device: torch.device,
                 requantize: bool, config: dict | None = None):
        super().__init__(None)
        self.formats, self.specs, self.device = formats, specs, device
        self.requantize, self.config = requantize, config

    @classmethod
    def quantizing(cls, ckpt: Container, specs: dict[str, TensorSpec], device: torch.device, *,
                   blocksize: int = 64, double_quant: bool = True, compute_dtype: str | torch.dtype = "bf16",
                   skip: Sequence[str] = ()) -> NF4Encoder:
        """The encoder that quantizes an unquantized base's linear weights (see `quantize`)."""
        compute = DTYPES.get(compute_dtype.lower(), compute_dtype) if isinstance(compute_dtype, str) else compute_dtype
        if compute not in DTYPES.values():
            raise InvalidArgumentError(f"the NF4 compute dtype must be bf16, fp16 or fp32, not {compute_dtype!r}")
        config = quantization_config(double_quant, str(compute).removeprefix("torch."),
                                     [*DEFAULT_SKIP, *skip], blocksize)
        if ckpt.config.get("quantization_config"):
            method = ckpt.config["quantization_config"].get("quant_method", "unknown")
            raise InvalidArgumentError(f"the base is already quantized ({method}); quantize an unquantized base")
        formats = quantized_formats(specs, ckpt.config.get("model_type"), blocksize=blocksize,
                                    double_quant=double_quant, skip=skip)
        return cls(formats, specs, device, requantize=False, config=config)

    @classmethod
    def requantizing(cls, specs: dict[str, TensorSpec], device: torch.device,
                     double_quant: bool | None = None) -> NF4Encoder:
        """The encoder that writes an NF4 base's merge in NF4, each weight in its own format."""
        formats = {k: s.fmt for k, s in specs.items() if isinstance(s, NF4Spec)}
        stored_as = {str(f.storage).removeprefix("torch.") for f in formats.values()} - {"uint8"}
        if stored_as:
            raise InvalidArgumentError(
                f"the base stores its NF4 data as {', '.join(sorted(stored_as))} (bnb_4bit_quant_storage); NF4 outputs "
                "are written as uint8: merge with --dtype bf16 and quantize the result"
            )
        if double_quant is not None and any(f.double_quant != double_quant for f in formats.values()):
            have = "with" if not double_quant else "without"
            raise InvalidArgumentError(
                f"the base's NF4 weights are stored {have} double quant, and merging into an NF4 base keeps each "
                "weight's NF4 settings; drop the double-quant option, or merge with --dtype bf16 and quantize "
                "the result"
            )
        return cls(formats, specs, device, requantize=True)

    @property
    def label(self) -> str:
        return "nf4"

    @property
    def quantized(self) -> int:
        return len(self.formats)

    def dtype_for(self, spec: TensorSpec) -> torch.dtype:
        return torch.float32 if self.requantize and spec.dtype.is_floating_point else spec.dtype

    def keeps(self, key: str, spec: TensorSpec) -> bool:
        return self.requantize or key not in self.formats

    def entries(self, key: str, spec: TensorSpec) -> dict[str, int]:
        fmt = self.formats.get(key)
        if fmt is None:
            return {key: spec.numel * spec.dtype.itemsize}
        return fmt.entries(key, spec.shape[::-1] if fmt.transposed else spec.shape)

    def encode(self, key: str, tensor: Tensor) -> dict[str, Tensor]:
        """NF4 tensors of a weight in `formats` (quantized on the encoder's device); others cast to the base's dtype."""
        fmt = self.formats.get(key)
        dtype = self.specs[key].dtype if fmt is None else fmt.dtype
        if tensor.dtype != dtype:  # the executor checked `tensor` in its own dtype
            check_range([key], tensor.unsqueeze(0), dtype)
        if fmt is None:
            return {key: tensor.to(dtype)}
        weight = tensor.to(self.device, dtype)
        weight = weight.T if fmt.transposed else weight
        return nf4_state_dict(key, *quantize_nf4(weight, fmt.blocksize, fmt.double_quant))

    def survival(self, key: str, base: Tensor, merged: Tensor, encoded: dict[str, Tensor]) -> float | None:
        """retained_fraction of the merged weight after requantization (NF4 base only)."""
        fmt = self.formats.get(key)
        if not self.requantize or fmt is None:
            return None
        after = dequantize_nf4(*nf4_from_state_dict(key, encoded))
        return retained_fraction(base.to(self.device), after.T if fmt.transposed else after, merged.to(self.device))

    def update_config(self, config: dict) -> dict:
        return config if self.config is None else {**config, "quantization_config": self.config}


def detect(ckpt: Container) -> bool:
    """True when the checkpoint holds bitsandbytes NF4 weights."""
    return any(key.endswith(QUANT_STATE_SUFFIX) for key in ckpt.keys())


def decoder(ckpt: Container) -> NF4Decoder:
    """The decoder of an NF4 base."""
    return NF4Decoder(ckpt)


def encoder(ckpt: Container, decoder: StoredDecoder, dtype: str | None, *, device: torch.device,
            double_quant: bool | None = None) -> NF4Encoder:
    """NF4 output: an NF4 base requantized with each weight's own settings (`double_quant` must agree), or an
    unquantized base's linear weights quantized (`double_quant` default True)."""
    if isinstance(decoder, NF4Decoder):
        return NF4Encoder.requantizing(decoder.specs(ckpt), device, double_quant)
    dq = True if double_quant is None else double_quant
    return NF4Encoder.quantizing(ckpt, decoder.specs(ckpt), device, double_quant=dq)
