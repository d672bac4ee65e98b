"""The registry of stored encodings for safetensors-backed containers (DESIGN §8, §14), and the choice of a
merge's decoder and encoder from it.

A codec module has `NAME`, `TARGETS` (the output dtypes it encodes into, e.g. {"nf4"}), `OPTIONS` (the
keyword options its encoder takes, e.g. {"double_quant"}), `detect(container)` (the base is stored in this
encoding), `decoder(container)` and `encoder(container, decoder, dtype, *, device, **options)`. A new encoding is a new module listed in `CODECS`; the merge engine does not change.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import InvalidArgumentError
from . import fp8, nf4
from .container import Container
from .stored import DTYPES, CastEncoder, DequantizedEncoder, StoredDecoder, parse_dtype

CODECS: list[Any] = [nf4, fp8]
"""Codec modules, tried in order."""


def target_names() -> list[str]:
    """Every output dtype a merge can write: fp16, bf16, fp32 and each codec's targets."""
    return ["fp16", "bf16", "fp32", *(name for codec in CODECS for name in sorted(codec.TARGETS))]


def decoder_for(container: Container) -> StoredDecoder:
    """The decoder of the encoding the base is stored in (as stored when no codec detects one): every tensor as the
    model uses it (quantized weights decoded, their side tensors not listed)."""
    stored_in = next((c for c in CODECS if c.detect(container)), None)
    return stored_in.decoder(container) if stored_in is not None else StoredDecoder()


def choose_codecs(container: Container, dtype: str | torch.dtype | None, *, device: torch.device,
                  **options: Any) -> tuple[StoredDecoder, CastEncoder]:
    """(decoder, encoder) for a base and an output dtype: the decoder of the encoding the base is stored in (as
    stored when none), the encoder of the codec whose TARGETS hold `dtype`; with no dtype a quantized base keeps
    its encoding; a plain dtype writes a quantized base dequantized. Options (e.g. `double_quant`) go to the
    encoding codec; one given where no codec encodes is an error."""
    name = dtype.lower() if isinstance(dtype, str) else None
    target = next((c for c in CODECS if name in c.TARGETS), None)
    if isinstance(dtype, str) and target is None and name not in DTYPES:
        raise InvalidArgumentError(f"unsupported output dtype {dtype!r} (choose {', '.join(target_names())})")
    decoder = decoder_for(container)
    stored_in = next((c for c in CODECS if c.detect(container)), None)
    encoding = target or (stored_in if dtype is None else None)
    given = {k: v for k, v in options.items() if v is not None}
    foreign = sorted(set(given) - (encoding.OPTIONS if encoding is not None else set()))
    if foreign:
        owners = {k: [c.NAME for c in CODECS if k in c.OPTIONS] for k in foreign}
        raise InvalidArgumentError("; ".join(
            f"{k.replace('_', ' ')} applies to {'/'.join(owners[k])} outputs only (--dtype {'/'.join(owners[k])}, "
            "or such a base)" if owners[k] else f"--{k.replace('_', '-')} does not apply to this base"
            for k in foreign))
    if encoding is not None:
        return decoder, encoding.encoder(container, decoder, name, device=device, **given)
    return decoder, (DequantizedEncoder if stored_in is not None else CastEncoder)(parse_dtype(dtype))
