"""`quantize`: a checkpoint folder to bitsandbytes NF4 (DESIGN §7) or FP8 (DESIGN §16), streamed through the merge
engine's pass with no adapters and the target's encoder (adaptools.checkpoints.nf4 / .fp8)."""
from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence

import torch

from .atomic import check_output
from .checkpoints import Container, fp8
from .checkpoints.nf4 import NF4Encoder
from .checkpoints.nf4 import detect as is_nf4_checkpoint
from .checkpoints.shards import parse_size
from .device import resolve_device
from .errors import InvalidArgumentError
from .merge import MergeReport, OutputPlan, StoredDecoder, write_outputs
from .sources import open_base

__all__ = ["quantize"]

TARGETS = ("nf4", "fp8")


def _given(**options: object) -> list[str]:
    """The names of the options that are set (not None)."""
    return [name.replace("_", " ") for name, value in options.items() if value is not None]


def quantize(base: str | os.PathLike | Container, out: str | os.PathLike, *, to: str = "nf4",
             blocksize: int | None = None, double_quant: bool | None = None,
             compute_dtype: str | torch.dtype | None = None, fp8_scheme: str | None = None,
             fp8_format: str | None = None, skip: Sequence[str] = (), device: str | torch.device = "auto",
             overwrite: bool = False, max_shard_size: str | int | None = None, batch_bytes: int | None = None,
             progress: bool = False, hash_inputs: bool = False) -> MergeReport:
    """Quantize a checkpoint folder to NF4 or FP8, streaming shard by shard (the merge pipeline, no adapters).

    `to="nf4"`: the 2-D linear weights of an unquantized base become NF4 (bit-exact with bitsandbytes; `blocksize`
    elements per absmax, default 64; block absmax 8-bit quantized with `double_quant`, default True); config.json
    gets transformers' `quantization_config` (bnb_4bit_compute_dtype = `compute_dtype`, default bf16), so
    `AutoModelForCausalLM.from_pretrained(out)` loads Linear4bit layers.
    `to="fp8"`: the linear weights of an unquantized or NF4 base become e4m3 with `fp8_scheme` scales ("block"
    128x128 by default, "channel", "tensor"), bit-exact with compressed-tensors' FloatQuantizationCompressor, in
    `fp8_format` "compressed-tensors" (default; vLLM and transformers load it) or "fine-grained" (DeepSeek's layout).
    Embeddings, norms, the LM head and modules matched by a `skip` pattern keep their dtype.
    With `hash_inputs`, the base files' sha256 come from this pass's reads (see `merge`).
    Returns the MergeReport (`quantized`: weights written quantized).
    """
    start = time.perf_counter()
    if to not in TARGETS:
        raise InvalidArgumentError(f"cannot quantize to {to!r} (choose {' or '.join(TARGETS)})")
    foreign = (_given(fp8_scheme=fp8_scheme, fp8_format=fp8_format) if to == "nf4" else
               _given(blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype))
    if foreign:
        raise InvalidArgumentError(f"{', '.join(foreign)} do(es) not apply to {to.upper()} outputs")
    target = check_output(out, overwrite)
    device = resolve_device(device)
    shard_bytes = None if max_shard_size is None else parse_size(max_shard_size)
    ckpt = open_base(base, "model")
    if is_nf4_checkpoint(ckpt) and to == "nf4" or fp8.detect(ckpt):
        kind = "an FP8" if fp8.detect(ckpt) else "an NF4"
        raise InvalidArgumentError(f"{str(ckpt.root)!r} is already {kind} checkpoint")
    if to == "nf4":
        decoder = StoredDecoder()
        encoder = NF4Encoder.quantizing(ckpt, decoder.specs(ckpt), device, blocksize=blocksize or 64,
                                        double_quant=True if double_quant is None else double_quant,
                                        compute_dtype=compute_dtype or "bf16", skip=skip)
    else:
        decoder = ckpt.decoder()
        encoder = fp8.encoder(ckpt, decoder, to, device=device, fp8_scheme=fp8_scheme, fp8_format=fp8_format,
                              skip=skip)
    if not encoder.formats:
        warnings.warn(f"{str(ckpt.root)!r} has no weight to quantize (no 2-D floating weight outside the skip "
                      "patterns)", stacklevel=2)
    report = write_outputs(ckpt, decoder.specs(ckpt), [OutputPlan(target.name, {})], decoder, encoder, target,
                           each=False, device=device, overwrite=overwrite, shard_bytes=shard_bytes,
                           batch_bytes=batch_bytes, progress=progress, hash_inputs=hash_inputs, desc="quantizing")
    report.seconds = time.perf_counter() - start
    return report
