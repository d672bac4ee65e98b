"""Options shared by several commands, declared once."""
from __future__ import annotations

from collections.abc import Callable

import click

from adaptools.formats.layout import LAYOUTS, SERVING_RANKS

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


layout = click.option(
    "--layout", type=click.Choice(LAYOUTS),
    help="PEFT outputs (default portable): portable pads every module to one rank with r = lora_alpha, read alike "
    "by PEFT, vLLM, TGI, LoRAX, llama.cpp, diffusers and mlx-lm; compact keeps per-module ranks in "
    "rank_pattern/alpha_pattern, for PEFT and vLLM >= 0.32 only: llama.cpp (alpha / tensor rank), diffusers < 0.40 "
    "and mlx-lm misread or reject mixed ranks, and TGI, LoRAX and vLLM <= 0.31 ignore the patterns. mlx and "
    "diffusers outputs always hold one rank; kohya outputs keep one alpha per module and take no layout.",
)
pad_rank = click.option(
    "--pad-rank", type=click.IntRange(min=1), metavar="N",
    help="PEFT, mlx and diffusers outputs: pad every module to rank N (a rank your server accepts); an adapter above N is an error.",
)
serve = click.option(
    "--serve", type=click.Choice(list(SERVING_RANKS)),
    help="PEFT, mlx and diffusers outputs: pad to the smallest rank this server accepts (vllm: a --max-lora-rank value, "
    f"{', '.join(map(str, SERVING_RANKS['vllm']))}).",
)


def layout_options(func: Callable) -> Callable:
    """--layout portable|compact, --pad-rank N and --serve vllm (how a PEFT output is laid out)."""
    return layout(pad_rank(serve(func)))
