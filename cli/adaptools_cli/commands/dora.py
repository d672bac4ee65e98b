"""`adaptools dora to-dora | to-lora`: LoRA ↔ DoRA with the base checkpoint (DESIGN §6)."""
from __future__ import annotations

import json
import typing

import click

import adaptools
from adaptools.atomic import atomic_output, check_output
from adaptools.dora import BaseWeights, SvdMethod
from adaptools.formats import FORMATS, default_format

from ..options import layout_options, output_options, reading_options
from ..provenance import provenance
from ..render import echo_table
from .rerank import save

base_option = click.option(
    "--base", required=True, type=click.Path(), help="Base checkpoint folder (HF safetensors; NF4 and FP8 are dequantized)."
)
base_weights_option = click.option(
    "--base-weights",
    type=click.Choice(typing.get_args(BaseWeights)),
    default="stored",
    show_default=True,
    help="Base weight W in the row norms: as stored, or an unquantized base rounded through NF4 "
    "(nf4: no double quant, nf4-dq: with it) to match a QLoRA-trained DoRA.",
)
to_option = click.option(
    "--to", "to", type=click.Choice(FORMATS), help="Output format (default: the input's format)."
)
device_option = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")


def echo_summary(rows: list[dict]) -> None:
    """The per-module rows as an aligned table."""
    echo_table(list(rows[0]), [list(row.values()) for row in rows])


@click.group()
def dora() -> None:
    """Convert LoRA ↔ DoRA against the base checkpoint."""


@dora.command("to-dora")
@click.argument("adapter", type=click.Path())
@base_option
@output_options
@to_option
@layout_options
@base_weights_option
@device_option
@reading_options
@provenance("to-dora")
def to_dora(adapter: str, base: str, output: str, overwrite: bool, to: str | None, layout: str | None, pad_rank: int | None,
            serve: str | None, base_weights: str, device: str, allow_pickle: bool,
            scale: float | None, alpha: float | None) -> dict:
    """LoRA ADAPTER → DoRA with the same outputs: magnitude m = ‖W + s·B·A‖ per output row."""
    check_output(output, overwrite)
    lora = adaptools.load(adapter, allow_pickle=allow_pickle, base=base, scale=scale, alpha=alpha)
    converted = adaptools.to_dora(lora, base, base_weights=base_weights, device=device)
    save(converted, output, to or default_format(lora), overwrite, layout, pad_rank, serve)
    rows = [
        {"module": name, "kind": m.kind, "shape": f"{m.out_features}x{m.in_features}", "rank": m.rank,
         "min m": float(m.magnitude.min()), "max m": float(m.magnitude.max())}
        for name, m in converted.items()
    ]
    echo_summary(rows)
    return {"summary": rows}


@dora.command("to-lora")
@click.argument("adapter", type=click.Path())
@base_option
@click.option("--rank", type=click.IntRange(min=1), help="Keep k singular values per module.")
@click.option("--energy", type=float, help="Keep the fewest values holding this fraction τ of ‖ΔW‖² (0 < τ <= 1).")
@output_options
@to_option
@layout_options
@click.option("--report", "report_path", type=click.Path(), help="Write the per-module fit report as JSON here.")
@click.option(
    "--svd", type=click.Choice(typing.get_args(SvdMethod)), default="auto", show_default=True,
    help="Exact dense SVD, randomized SVD on the implicit ΔW, or chosen by size.",
)
@base_weights_option
@device_option
@reading_options
@provenance("to-lora")
def to_lora(adapter: str, base: str, rank: int | None, energy: float | None, output: str, overwrite: bool,
            to: str | None, layout: str | None, pad_rank: int | None, serve: str | None, report_path: str | None, svd: str,
            base_weights: str, device: str, allow_pickle: bool,
            scale: float | None, alpha: float | None) -> dict:
    """DoRA ADAPTER → LoRA: ΔW = W' − W fitted by a truncated SVD (--rank K or --energy T)."""
    check_output(output, overwrite)
    if report_path is not None:
        check_output(report_path, overwrite)
    loaded = adaptools.load(adapter, allow_pickle=allow_pickle, base=base, scale=scale, alpha=alpha)
    lora, report = adaptools.to_lora(
        loaded, base, rank=rank, energy=energy, svd=svd, base_weights=base_weights, device=device
    )
    save(lora, output, to or default_format(loaded), overwrite, layout, pad_rank, serve)
    if report_path is not None:
        with atomic_output(report_path, overwrite=overwrite, is_file=True) as tmp:
            tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    rows = [
        {"module": name, "shape": f"{f.out_features}x{f.in_features}", "rank": f.rank, "svd": f.method,
         "retained": f.retained_energy, "rel. error": f.rel_error}
        for name, f in report.modules.items()
    ]
    echo_summary(rows)
    click.echo(f"overall relative error {report.rel_error:.4g}, worst {report.worst_rel_error:.4g}")
    return {"summary": rows}
