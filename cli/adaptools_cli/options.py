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
