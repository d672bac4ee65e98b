"""`adaptools convert`: PEFT ↔ kohya."""
from __future__ import annotations

import click

import adaptools
from adaptools.formats import FORMATS

from ..options import allow_pickle, layout_options, output_options
from ..provenance import provenance
from .rerank import save


@click.command()
@click.argument("adapter", type=click.Path())
@click.option("--to", "to", type=click.Choice(FORMATS), required=True, help="Output format.")
@click.option("--base", type=click.Path(), help="Base checkpoint folder; needed to map kohya names to module paths.")
@output_options
@layout_options
@allow_pickle
@provenance("convert")
def convert(adapter: str, to: str, base: str | None, output: str, overwrite: bool, layout: str | None, pad_rank: int | None,
            serve: str | None, allow_pickle: bool) -> None:
    """Convert ADAPTER to a PEFT folder or a kohya .safetensors file (scale written as 1 for PEFT)."""
    loaded = adaptools.load(adapter, allow_pickle=allow_pickle, base=base)
    save(loaded, output, to, overwrite, layout, pad_rank, serve)
