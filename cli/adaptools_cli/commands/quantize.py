"""`adaptools quantize`: a checkpoint folder to bitsandbytes NF4, shard by shard."""
from __future__ import annotations

import warnings

import click

import adaptools
from adaptools.checkpoints.nf4_quant import BLOCKSIZES

from ..options import output_options
from ..provenance import provenance
from .merge import _warn, echo_report

COMPUTE_DTYPES = ("bf16", "fp16", "fp32")


@click.command()
@click.argument("base", type=click.Path())
@click.option("--to", "to", type=click.Choice(("nf4",)), default="nf4", show_default=True, help="Target format.")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True,
              help="Quantize the block scales too (4.127 instead of 4.5 bits per weight at blocksize 64).")
@click.option("--blocksize", type=click.Choice([str(b) for b in BLOCKSIZES]), default="64", show_default=True,
              help="Weights per absmax block.")
@click.option("--compute-dtype", type=click.Choice(COMPUTE_DTYPES), default="bf16", show_default=True,
              help="bnb_4bit_compute_dtype: the dtype bitsandbytes computes in when the model runs.")
@click.option("--skip", multiple=True, metavar="PATTERN",
              help="Also keep these modules unquantized (repeatable): a regex matched from the start of the module "
                   "name up to a '.', or a suffix of it (e.g. down_proj, 'model.layers.0'); transformers' "
                   "llm_int8_skip_modules rule. Embeddings and lm_head are always kept.")
@click.option("--device", default="auto", show_default=True, help="Where to quantize: auto, cpu or cuda.")
@click.option("--max-shard-size", help="Re-shard the output, e.g. 5GB or 200MB (default: the base's own shards).")
@output_options
@provenance("quantize", kind="model")
def quantize(base: str, to: str, double_quant: bool, blocksize: str, compute_dtype: str, skip: tuple[str, ...],
             device: str, max_shard_size: str | None, output: str, overwrite: bool) -> None:
    """Quantize the checkpoint folder BASE to NF4 (bit-exact with bitsandbytes), streaming shard by shard.

    Linear weights become NF4; embeddings, norms and lm_head keep their dtype. config.json gets the
    quantization_config with which transformers loads the output as 4-bit (Linear4bit). To quantize a merge,
    use `adaptools merge BASE ADAPTER --dtype nf4` instead (one pass).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = _warn
        report = adaptools.quantize(base, output, blocksize=int(blocksize), double_quant=double_quant,
                                    compute_dtype=compute_dtype, skip=skip, device=device, overwrite=overwrite,
                                    max_shard_size=max_shard_size, progress=True, hash_inputs=True)
    echo_report(report, verb=f"quantized {{quantized}} weights to {to.upper()} into")
