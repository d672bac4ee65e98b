"""Options shared by several commands, declared once."""
from __future__ import annotations

from collections.abc import Callable

import click

allow_pickle = click.option(
    "--allow-pickle", is_flag=True, help="Allow loading pickle (.bin) adapters, with torch.load(weights_only=True)."
)
read_scale = click.option(
    "--scale", "scale", type=float, metavar="S",
    help="Scale of adapters whose files do not record it (mlx-examples .npz, PEFT weights without adapter_config.json).",
)
read_alpha = click.option(
    "--alpha", "alpha", type=float, metavar="ALPHA",
    help="lora_alpha of PEFT weights saved without adapter_config.json (scale = alpha / r; default alpha = r).",
)


def reading_options(func: Callable) -> Callable:
    """--allow-pickle, --scale and --alpha: how adapter files are read."""
    return allow_pickle(read_scale(read_alpha(func)))


output = click.option("-o", "--output", "output", required=True, type=click.Path(), help="Output path (written atomically).")
overwrite = click.option("--overwrite", is_flag=True, help="Replace an existing output.")


def output_options(func: Callable) -> Callable:
    """-o/--output and --overwrite."""
    return output(overwrite(func))


push_to = click.option(
    "--push-to", "push_to", metavar="ORG/NAME",
    help="Then push the output, with its model card and recipe, to this Hub repo (token: HF_TOKEN or `hf auth login`).",
)
private = click.option("--private", is_flag=True, help="Create the Hub repo private (an existing repo keeps its visibility).")
revision = click.option("--revision", metavar="BRANCH", help="Push to this branch of the Hub repo (created from main if missing).")


def hub_options(func: Callable) -> Callable:
    """--private and --revision (where a push goes)."""
    return private(revision(func))


def push_options(func: Callable) -> Callable:
    """--push-to ORG/NAME, --private and --revision."""
    return push_to(hub_options(func))
