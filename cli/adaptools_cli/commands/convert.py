"""`adaptools convert`: any adapter family adaptools reads to PEFT, kohya, mlx-lm, diffusers or llama.cpp (gguf)."""
from __future__ import annotations

import click

import adaptools
from adaptools.formats import FORMATS

from ..options import layout_options, output_options, reading_options
from ..provenance import provenance
from .rerank import require_gguf_base, save


@click.command()
@click.argument("adapter", type=click.Path())
@click.option("--to", "to", type=click.Choice((*FORMATS, "gguf")), required=True,
              help="Output format (gguf: a llama.cpp LoRA adapter, which needs --base).")
@click.option("--base", type=click.Path(),
              help="Base checkpoint (folder, .gguf or repo id): maps kohya names to module paths; for --to gguf, "
                   "llama.cpp's tensor names (only its config or header is read).")
@output_options
@layout_options
@reading_options
@provenance("convert")
def convert(adapter: str, to: str, base: str | None, output: str, overwrite: bool, layout: str | None, pad_rank: int | None,
            serve: str | None, allow_pickle: bool, scale: float | None, alpha: float | None) -> None:
    """Convert ADAPTER to a PEFT folder, a kohya or diffusers .safetensors file, an mlx-lm folder or a llama.cpp
    .gguf adapter (scale written as 1 for PEFT, one rank and scale 1 for mlx-lm and diffusers, llama.cpp's
    alpha / rank rule for gguf; ΔW unchanged)."""
    require_gguf_base(to, base)  # before loading anything
    loaded = adaptools.load(adapter, allow_pickle=allow_pickle, base=base, scale=scale, alpha=alpha)
    save(loaded, output, to, overwrite, layout, pad_rank, serve, base=base)
