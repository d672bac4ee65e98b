"""`quantize`: an unquantized checkpoint folder to bitsandbytes NF4 (DESIGN §7), streamed through the merge
engine's pass with no adapters and the NF4 encoder (adaptools.checkpoints.nf4)."""
from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence

import torch

from .atomic import check_output
from .device import resolve_device
from .errors import InvalidArgumentError
from .checkpoints import Container
from .checkpoints.shards import parse_size
from .merge import MergeReport, OutputPlan, StoredDecoder, write_outputs
from .checkpoints.nf4 import NF4Encoder
from .checkpoints.nf4 import detect as is_nf4_checkpoint
from .sources import open_base

__all__ = ["quantize"]


def quantize(base: str | os.PathLike | Container, out: str | os.PathLike, *, blocksize: int = 64,
             double_quant: bool = True, compute_dtype: str | torch.dtype = "bf16", skip: Sequence[str] = (),
             device: str | torch.device = "auto", overwrite: bool = False, max_shard_size: str | int | None = None,
             batch_bytes: int | None = None, progress: bool = False, hash_inputs: bool = False) -> MergeReport:
    """Quantize a checkpoint folder to bitsandbytes NF4, streaming shard by shard (the merge pipeline, no adapters).

    The 2-D linear weights become NF4 (bit-exact with bitsandbytes; `blocksize` elements per absmax, block absmax
    8-bit quantized with `double_quant`); embeddings, norms, the LM head and modules matched by a `skip` pattern
    (module docstring) keep their dtype. config.json gets transformers' `quantization_config`
    (bnb_4bit_compute_dtype = `compute_dtype`), so `AutoModelForCausalLM.from_pretrained(out)` loads Linear4bit layers.
    With `hash_inputs`, the base files' sha256 come from this pass's reads (see `merge`).
    Returns the MergeReport (`quantized`: weights written as NF4).
    """
    start = time.perf_counter()
    target = check_output(out, overwrite)
    device = resolve_device(device)
    shard_bytes = None if max_shard_size is None else parse_size(max_shard_size)
    ckpt = open_base(base, "model")
    if is_nf4_checkpoint(ckpt):
        raise InvalidArgumentError(f"{str(ckpt.root)!r} is already an NF4 checkpoint")
    decoder = StoredDecoder()
    specs = decoder.specs(ckpt)
    encoder = NF4Encoder.quantizing(ckpt, specs, device, blocksize=blocksize, double_quant=double_quant,
                                    compute_dtype=compute_dtype, skip=skip)
    if not encoder.formats:
        warnings.warn(f"{str(ckpt.root)!r} has no weight to quantize (no 2-D floating weight outside the skip "
                      "patterns)", stacklevel=2)
    report = write_outputs(ckpt, specs, [OutputPlan(target.name, {})], decoder, encoder, target, each=False,
                           device=device, overwrite=overwrite, shard_bytes=shard_bytes, batch_bytes=batch_bytes,
                           progress=progress, hash_inputs=hash_inputs, desc="quantizing")
    report.seconds = time.perf_counter() - start
    return report
