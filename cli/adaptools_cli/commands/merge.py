"""`adaptools merge`: adapters into a base checkpoint, shard by shard."""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import click

import adaptools
from adaptools.merge import MergeReport

from ..options import allow_pickle, output_options
from ..provenance import provenance
from .combine import parse_weights

DTYPE_CHOICES = ("fp16", "bf16", "fp32", "nf4", "fp8")
FP8_SCHEMES = ("block", "channel", "tensor")
FP8_FORMATS = ("compressed-tensors", "fine-grained")


def fp8_options(command):
    """--fp8-scheme and --fp8-format (FP8 outputs of another base)."""
    command = click.option("--fp8-format", type=click.Choice(FP8_FORMATS),
                           help="FP8 output layout: compressed-tensors (default; vLLM and transformers load it) or "
                                "fine-grained (DeepSeek's 128x128 blocks with weight_scale_inv).")(command)
    return click.option("--fp8-scheme", type=click.Choice(FP8_SCHEMES),
                        help="FP8 output scales: one per 128x128 block (default), per output channel, or per "
                             "tensor.")(command)


def _size(nbytes: float) -> str:
    """"1.2 GiB"-style size."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while nbytes >= 1024 and i < len(units) - 1:
        nbytes, i = nbytes / 1024, i + 1
    return f"{nbytes:.1f} {units[i]}"


def _warn(message: Warning | str, *_details: object) -> None:
    """warnings.showwarning as one `warning: ...` line on stderr."""
    click.echo(f"warning: {message}", err=True)


def echo_report(report: MergeReport, verb: str = "merged {modules} modules into") -> None:
    """One line per output folder (with the NF4 survival of ΔW when measured), then time, sizes and peak memory."""
    for name, folder in report.outputs.items():
        click.echo(f"{verb.format(modules=report.modules[name], quantized=report.quantized)} {folder}")
        kept = report.survival.get(name)
        if kept:
            worst = min(kept, key=kept.get)
            quant = (report.dtype or "").upper() + " " if report.dtype in ("nf4", "fp8") else ""
            click.echo(f"  ΔW surviving {quant}requantization: mean {sum(kept.values()) / len(kept):.1%} over "
                       f"{len(kept)} modules, min {kept[worst]:.1%} ({worst})")
    memory = f"peak memory {_size(report.peak_rss)} (RSS)"
    if report.peak_device_memory is not None:
        memory += f", {_size(report.peak_device_memory)} on {report.device}"
    dtype = report.dtype or "dtype of the base"
    if report.quantized:
        dtype += f" ({report.quantized} weights quantized)"
    click.echo(f"{report.tensors} tensors ({report.base}), {dtype}; read {_size(report.bytes_read)}, "
               f"wrote {_size(report.bytes_written)} in {report.seconds:.1f} s on {report.device}; {memory}")


def survival_rows(report: MergeReport) -> list[dict]:
    """The card's per-module table: the fraction of ΔW surviving requantization (output column with --each)."""
    several = len(report.outputs) > 1
    return [{**({"output": name} if several else {}), "module": module, "survival": value}
            for name, kept in report.survival.items() for module, value in kept.items()]


def merge_group(contexts: Sequence[click.Context]) -> list[dict]:
    """Merges into one base with the same options (not --each), from one read of it (`adaptools batch`): each
    output and its result as the single merge makes them."""
    first = contexts[0].params
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = _warn
        report = adaptools.merge_many(
            first["base"], [(list(c.params["adapters"]), parse_weights(c.params["weights"]), c.params["output"])
                            for c in contexts],
            dtype=first["dtype"], double_quant=first["double_quant"], fp8_scheme=first["fp8_scheme"],
            fp8_format=first["fp8_format"], gguf_type=first["gguf_type"], device=first["device"],
            overwrite=first["overwrite"], max_shard_size=first["max_shard_size"], allow_pickle=first["allow_pickle"],
            hash_inputs=True)
    return [{"folders": [] if report.output_files else [folder], "summary": survival_rows(dataclasses.replace(
                report, outputs={name: folder}, survival={k: v for k, v in report.survival.items() if k == name}))}
            for name, folder in report.outputs.items()]


@click.command()
@click.argument("base", type=click.Path())
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option("--weights", help="One factor per adapter, comma-separated (e.g. 0.7,0.3); default 1 each.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES),
              help="dtype of the output's floating tensors (default: the base's; an NF4/FP8 base stays NF4/FP8); nf4 "
                   "or fp8 quantizes the merged linear weights (as `adaptools quantize`), fp16/bf16/fp32 write an "
                   "NF4/FP8 base dequantized.")
@click.option("--double-quant/--no-double-quant", default=None,
              help="NF4 output of an unquantized base: quantize the block scales too (default: on).")
@fp8_options
@click.option("--gguf-type", metavar="TYPE",
              help="GGUF base: the ggml type (q8_0, q6_k, q4_k, f16, ...) to write merged tensors stored in types "
                   "adaptools cannot encode (IQ*, ...); every other tensor keeps its own type.")
@click.option("--device", default="auto", show_default=True, help="Where the merge math runs: auto, cpu or cuda.")
@click.option("--max-shard-size", help="Re-shard the output, e.g. 5GB or 200MB (default: the base's own shards).")
@click.option("--each", is_flag=True,
              help="One merged model per adapter, OUTPUT/<adapter name>/, from one read of the base.")
@output_options
@allow_pickle
@provenance("merge", kind="model", group=merge_group, group_varies=("adapters", "weights"),
            group_when=lambda params: not params["each"])
def merge(base: str, adapters: tuple[str, ...], weights: str | None, dtype: str | None, double_quant: bool | None,
          fp8_scheme: str | None, fp8_format: str | None, gguf_type: str | None, device: str,
          max_shard_size: str | None, each: bool, output: str, overwrite: bool, allow_pickle: bool) -> dict:
    """Merge ADAPTERS (PEFT folders, kohya/LyCORIS/diffusers files, ...) into BASE, streaming: a checkpoint folder,
    a single-file diffusion checkpoint, a diffusers pipeline folder or a GGUF file.

    All adapters go into one model (W + Σ w·ΔW), or with --each into one model each. Config, tokenizer and
    generation files are copied; the shard layout is kept unless --max-shard-size is given. An NF4 base
    (bitsandbytes 4-bit) or an FP8 base (fine-grained or compressed-tensors) is dequantized, merged in float32
    and requantized with its own settings; the summary then shows how much of each ΔW survives requantization.
    A GGUF base (llama.cpp, ollama) gives a GGUF file: each merged tensor re-encoded in its own ggml type,
    everything else copied as stored.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = _warn
        report = adaptools.merge(base, list(adapters), parse_weights(weights), out=output, dtype=dtype,
                                 double_quant=double_quant, fp8_scheme=fp8_scheme, fp8_format=fp8_format,
                                 gguf_type=gguf_type, device=device, overwrite=overwrite, each=each,
                                 max_shard_size=max_shard_size, allow_pickle=allow_pickle, progress=True,
                                 hash_inputs=True)  # the recipe reuses these sha256
    echo_report(report)
    folders = [] if report.output_files else list(report.outputs.values())  # --each files: one card beside them
    return {"folders": folders, "summary": survival_rows(report)}
