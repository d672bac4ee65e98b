"""`adaptools extract`: a LoRA adapter from a fine-tuned checkpoint and its base (ΔW = W_tuned − W_base)."""
from __future__ import annotations

import typing

import click

import adaptools
from adaptools.atomic import check_output
from adaptools.checkpoints import is_diffusion_checkpoint
from adaptools.sources import resolve
from adaptools.extract import ExtractReport
from adaptools.formats import FORMATS
from adaptools.linalg import RankPolicy, SvdMethod

from ..options import layout_options, output_options
from ..provenance import provenance
from .rerank import DTYPES, echo_summary, policy_options, save, write_report


def echo_report(report: ExtractReport) -> None:
    """A table per module shape (ΔW's full rank → kept rank, worst relative error), then the totals."""
    entries = [(m.out_features, m.in_features, m.full_rank, m.new_rank, m.rel_error) for m in report.modules.values()]
    full = f", {len(report.full_tensors)} full tensors" if report.full_tensors else ""
    echo_summary(entries, f"{len(entries)} LoRA modules ({report.policy}, svd {'/'.join(report.to_dict()['methods'])})"
                          f"{full}, {report.unchanged} unchanged tensors left out: {report.params:,} LoRA parameters, "
                          f"relative error {report.rel_error:.4g} overall, worst {report.worst_rel_error:.4g}")


@click.command()
@click.argument("base", type=click.Path())
@click.argument("tuned", type=click.Path())
@policy_options
@click.option("--include", multiple=True, metavar="REGEX", help="Only modules whose path matches (re.search; repeatable).")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Leave out modules whose path matches (repeatable).")
@click.option("--svd", type=click.Choice(typing.get_args(SvdMethod)), default="auto", show_default=True,
              help="Dense SVD, randomized range finder (exact error reported either way), or chosen by size.")
@click.option("--device", default="auto", show_default=True, help="Where the SVDs run: auto, cpu or cuda.")
@click.option("--to", "fmt", type=click.Choice((*FORMATS, "gguf")),
              help="Output format (default: kohya for a diffusion checkpoint, a single file or pipeline; else peft; "
                   "gguf: a llama.cpp adapter named after BASE).")
@click.option("--dtype", type=click.Choice(list(DTYPES)), help="dtype of the factors (default: the tuned weights').")
@click.option("--full-tensors", is_flag=True,
              help="Keep changed embeddings and the LM head as full tensors (modules_to_save) instead of LoRA.")
@click.option("--report", "report_path", type=click.Path(), help="Write the per-module report as JSON.")
@output_options
@layout_options
@provenance("extract")
def extract(base: str, tuned: str, rank: int | None, energy: float | None, ratio: float | None,
            threshold: float | None, budget: float | None, include: tuple[str, ...], exclude: tuple[str, ...],
            svd: str, device: str, fmt: str | None, dtype: str | None, full_tensors: bool, report_path: str | None,
            output: str, overwrite: bool, layout: str | None, pad_rank: int | None, serve: str | None) -> dict:
    """LoRA of TUNED − BASE (checkpoint folders, single-file diffusion checkpoints, pipeline folders, GGUF files or
    Hub repo ids; NF4, FP8 and GGUF types decoded): best rank-k fit of each changed weight.

    k by exactly one of --rank/--energy/--ratio/--threshold/--budget; changed norms and biases are kept whole.
    """
    policy = RankPolicy.from_options(rank=rank, energy=energy, ratio=ratio, threshold=threshold, budget=budget)
    check_output(output, overwrite)
    if report_path:
        check_output(report_path, overwrite)
    adapter, report = adaptools.extract(base, tuned, policy=policy, include=include or None, exclude=exclude or None,
                                        svd=svd, device=device, full_tensors=full_tensors,
                                        dtype=DTYPES.get(dtype or ""), progress=True)
    fmt = fmt or ("kohya" if is_diffusion_checkpoint(resolve(base, "model")) else "peft")
    save(adapter, output, fmt, overwrite, layout, pad_rank, serve, base=base)
    write_report(report_path, report.to_dict(), overwrite)
    echo_report(report)
    return {"summary": report.modules}
