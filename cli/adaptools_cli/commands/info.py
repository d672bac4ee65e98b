"""`adaptools info`: what an adapter holds, per module."""
from __future__ import annotations

import json

import click

import adaptools
from adaptools.checkpoints import gguf, is_diffusion_checkpoint, open_container
from adaptools.sources import locate_headers, resolve
from adaptools.summary import adapter_summary, checkpoint_summary, gguf_summary, ia3_summary

from ..options import reading_options
from ..render import echo_table


@click.command()
@click.argument("adapter", type=click.Path())
@click.option("--base", type=click.Path(), help="Base checkpoint, to map kohya names to module paths.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (modules keyed by module path).")
@reading_options
def info(adapter: str, base: str | None, as_json: bool, allow_pickle: bool, scale: float | None,
         alpha: float | None) -> None:
    """Show the format (the adapter family detected), base model, DoRA or not, and per module rank, scale, shape
    and parameters. For a diffusion checkpoint (a single .safetensors file in the SD1.x/SD2/SDXL/Flux original
    layout, or a diffusers pipeline folder): the family and per component the parameters and dtypes. For a GGUF
    file (a model or a llama.cpp adapter): architecture, tensor types with counts, size. A checkpoint or GGUF file
    on the Hub costs its small files and its weights' headers (HTTP Range requests), never its weights."""
    place, files = locate_headers(adapter)  # a Hub checkpoint or GGUF file: its headers, never its weights
    if gguf.detect(place, files):
        echo_gguf(gguf_summary(place, files), as_json)
        return
    if is_diffusion_checkpoint(place, files):
        echo_checkpoint(checkpoint_summary(open_container(place, files)), as_json)
        return
    local = resolve(adapter, "adapter", allow_pickle=allow_pickle)
    if adaptools.detect_format(local) == "peft-ia3":
        summary = ia3_summary(adaptools.load_ia3(local, allow_pickle=allow_pickle))
    else:
        summary = adapter_summary(adaptools.load(local, allow_pickle=allow_pickle, base=base, scale=scale, alpha=alpha))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    if "dora" not in summary:  # IA3: vectors, not a weight update
        click.echo(f"format: {summary['format']} (IA3 scales weights by learned vectors: merge only)")
        click.echo(f"modules: {len(summary['modules'])}, parameters: {summary['num_params']:,}")
        rows = [(name, m["kind"], m["scales"], m["features"]) for name, m in summary["modules"].items()]
        echo_table(["module", "kind", "scales", "size"], rows)
        return
    click.echo(f"format: {summary['format']}")
    click.echo(f"base model: {summary['base_model'] or '(not recorded)'}")
    click.echo(f"dora: {'yes' if summary['dora'] else 'no'}")
    click.echo(f"modules: {len(summary['modules'])}, parameters: {summary['num_params']:,}")
    if summary["extra"]:
        click.echo(f"full tensors: {', '.join(summary['extra'])}")
    rows = [
        (name, m["kind"], m["rank"], m["scale"], m["out_features"], m["in_features"], m["params"])
        for name, m in summary["modules"].items()
    ]
    echo_table(["module", "kind", "rank", "scale", "out", "in", "params"], rows)


def echo_summary(summary: dict, as_json: bool, lines: list[str], header: list[str], rows: list[tuple]) -> None:
    """A file's summary: one JSON object, or its lines and a table."""
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for line in lines:
        click.echo(line)
    echo_table(header, rows)


def echo_checkpoint(summary: dict, as_json: bool) -> None:
    """A diffusion checkpoint's summary: JSON, or a table of its components."""
    rows = [(name, c["tensors"], f"{c['parameters']:,}", ", ".join(f"{d} {n:,}" for d, n in c["dtypes"].items()))
            for name, c in summary["components"].items()]
    echo_summary(summary, as_json, [f"checkpoint: {summary['container']}", f"family: {summary['family']}",
                                    f"parameters: {summary['parameters']:,}"],
                 ["component", "tensors", "parameters", "dtypes (parameters)"], rows)


def echo_gguf(summary: dict, as_json: bool) -> None:
    """A GGUF file's summary: JSON, or a few lines and a table of its tensor types."""
    echo_summary(summary, as_json, [
        f"format: gguf v{summary['version']} ({summary['type'] or 'model'})",
        f"architecture: {summary['architecture'] or '(not recorded)'}, name: {summary['name'] or '(none)'}",
        f"file type: {summary['file_type']}",
        f"tensors: {summary['tensors']}, parameters: {summary['parameters']:,}, size: {summary['size']:,} bytes",
    ], ["type", "tensors", "bytes"], [(name, t["tensors"], t["bytes"]) for name, t in summary["types"].items()])
