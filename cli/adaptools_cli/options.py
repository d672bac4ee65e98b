"""Options shared by several commands, declared once."""
from __future__ import annotations

from collections.abc import Callable

import click

allow_pickle = click.option(
    "--allow-pickle", is_flag=True, help="Allow loading pickle (.bin) adapters, with torch.load(weights_only=True)."
)
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
