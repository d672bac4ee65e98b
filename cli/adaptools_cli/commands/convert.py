"""`adaptools convert`: PEFT ↔ kohya."""
from __future__ import annotations

import click

import adaptools
from adaptools.formats import FORMATS

from ..options import allow_pickle, output_options
from ..provenance import provenance


@click.command()
@click.argument("adapter", type=click.Path())
@click.option("--to", "to", type=click.Choice(FORMATS), required=True, help="Output format.")
@click.option("--base", type=click.Path(), help="Base checkpoint folder; needed to map kohya names to module paths.")
@output_options
@allow_pickle
@provenance("convert")
def convert(adapter: str, to: str, base: str | None, output: str, overwrite: bool, allow_pickle: bool) -> None:
    """Convert ADAPTER to a PEFT folder or a kohya .safetensors file (scale written as 1 for PEFT)."""
    loaded = adaptools.load(adapter, allow_pickle=allow_pickle, base=base)
    loaded.save(output, format=to, overwrite=overwrite)
    click.echo(f"wrote {to} adapter with {len(loaded)} modules to {output}")
