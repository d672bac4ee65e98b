"""`adaptools convert`: any adapter family adaptools reads to PEFT, kohya, mlx-lm or diffusers."""
from __future__ import annotations

import click

import adaptools
from adaptools.formats import FORMATS

from ..options import output_options, reading_options
from ..provenance import provenance


@click.command()
@click.argument("adapter", type=click.Path())
@click.option("--to", "to", type=click.Choice(FORMATS), required=True, help="Output format.")
@click.option("--base", type=click.Path(), help="Base checkpoint folder; needed to map kohya names to module paths.")
@output_options
@reading_options
@provenance("convert")
def convert(adapter: str, to: str, base: str | None, output: str, overwrite: bool, allow_pickle: bool,
            scale: float | None, alpha: float | None) -> None:
    """Convert ADAPTER to a PEFT folder, a kohya or diffusers .safetensors file, or an mlx-lm folder
    (scale written as 1 for PEFT, one rank and scale 1 for mlx-lm and diffusers; ΔW unchanged)."""
    loaded = adaptools.load(adapter, allow_pickle=allow_pickle, base=base, scale=scale, alpha=alpha)
    loaded.save(output, format=to, overwrite=overwrite)
    click.echo(f"wrote {to} adapter with {len(loaded)} modules to {output}")
