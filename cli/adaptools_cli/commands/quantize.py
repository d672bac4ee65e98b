"""`adaptools quantize`: a checkpoint folder to bitsandbytes NF4 or to FP8, shard by shard."""
from __future__ import annotations

import warnings

import click

import adaptools
from adaptools.checkpoints.nf4_quant import BLOCKSIZES

from ..options import output_options
from ..provenance import provenance
from .merge import _warn, echo_report, fp8_options

COMPUTE_DTYPES = ("bf16", "fp16", "fp32")


@click.command()
@click.argument("base", type=click.Path())
@click.option("--to", "to", type=click.Choice(("nf4", "fp8")), default="nf4", show_default=True, help="Target format.")
@click.option("--double-quant/--no-double-quant", default=None,
              help="NF4: quantize the block scales too (4.127 instead of 4.5 bits per weight at blocksize 64; "
                   "default: on).")
@click.option("--blocksize", type=click.Choice([str(b) for b in BLOCKSIZES]),
              help="NF4: weights per absmax block (default 64).")
@click.option("--compute-dtype", type=click.Choice(COMPUTE_DTYPES),
              help="NF4: bnb_4bit_compute_dtype, the dtype bitsandbytes computes in when the model runs "
                   "(default bf16).")
@fp8_options
@click.option("--skip", multiple=True, metavar="PATTERN",
              help="Also keep these modules unquantized (repeatable): a regex matched from the start of the module "
                   "name up to a '.', or a suffix of it (e.g. down_proj, 'model.layers.0'); transformers' "
                   "llm_int8_skip_modules rule. Embeddings and lm_head are always kept.")
@click.option("--device", default="auto", show_default=True, help="Where to quantize: auto, cpu or cuda.")
@click.option("--max-shard-size", help="Re-shard the output, e.g. 5GB or 200MB (default: the base's own shards).")
@output_options
@provenance("quantize", kind="model")
def quantize(base: str, to: str, double_quant: bool | None, blocksize: str | None, compute_dtype: str | None,
             fp8_scheme: str | None, fp8_format: str | None, skip: tuple[str, ...], device: str,
             max_shard_size: str | None, output: str, overwrite: bool) -> None:
    """Quantize the checkpoint folder BASE to NF4 (bit-exact with bitsandbytes) or FP8 (bit-exact with
    compressed-tensors), streaming shard by shard.

    Linear weights become NF4 / FP8; embeddings, norms and lm_head keep their dtype. config.json gets the
    quantization_config with which transformers (and vLLM, for FP8) loads the output. An NF4 base may be
    brought to FP8. To quantize a merge, use `adaptools merge BASE ADAPTER --dtype nf4|fp8` instead (one pass).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = _warn
        report = adaptools.quantize(base, output, to=to, blocksize=None if blocksize is None else int(blocksize),
                                    double_quant=double_quant, compute_dtype=compute_dtype, fp8_scheme=fp8_scheme,
                                    fp8_format=fp8_format, skip=skip, device=device, overwrite=overwrite,
                                    max_shard_size=max_shard_size, progress=True, hash_inputs=True)
    echo_report(report, verb=f"quantized {{quantized}} weights to {to.upper()} into")
