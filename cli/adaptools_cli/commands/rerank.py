"""`adaptools rerank`: best rank-k approximation of every module by factored SVD; also the options and summary shared with `combine`."""
from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator

import click
import torch
from tqdm import tqdm

import adaptools
from adaptools.adapter import Adapter
from adaptools.atomic import atomic_output, check_output
from adaptools.errors import InvalidArgumentError
from adaptools.formats import FORMATS, default_format
from adaptools.formats.gguf_lora import write_gguf_adapter
from adaptools.formats.layout import SERVING_FLAGS, growth_refusal, padding_cost, target_rank
from adaptools.linalg import RankPolicy
from adaptools.rerank import RerankReport

from ..options import layout_options, output_options, reading_options
from ..provenance import provenance
from ..render import table

PROGRESS_MIN_MODULES = 64
"""Show a progress bar from this many modules on (below that the work takes a blink)."""

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

POLICY_OPTIONS = ("rank", "energy", "ratio", "threshold", "budget")


def policy_options(func: Callable) -> Callable:
    """--rank K | --energy T | --ratio R | --threshold S | --budget N (at most one)."""
    options = [
        click.option("--rank", type=int, help="Keep k singular values per module."),
        click.option("--energy", type=float, help="Smallest k keeping this fraction τ of Σ s² (0 < τ <= 1)."),
        click.option("--ratio", type=float, help="Keep s_i >= s_0 / R (R >= 1)."),
        click.option("--threshold", type=float, help="Keep s_i >= S (S > 0; at least one per module)."),
        click.option("--budget", type=float, help="Total LoRA parameters N over all modules (largest s² per parameter kept)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def optional_policy(**options: float | None) -> RankPolicy | None:
    """The policy of the rank options, None when none is given (two or more: InvalidArgumentError)."""
    return RankPolicy.from_options(**options) if any(v is not None for v in options.values()) else None


def common_options(func: Callable) -> Callable:
    """--format, --base, --dtype, --device, -o/--overwrite, the layout options, --allow-pickle, --scale and --alpha."""
    for option in (
        click.option("--format", "fmt", type=click.Choice(FORMATS),
                     help="Output format (default: the inputs' format; peft for a mix)."),
        click.option("--base", type=click.Path(), help="Base checkpoint folder, to map kohya module names to module paths."),
        click.option("--dtype", type=click.Choice(list(DTYPES)), help="dtype of the result (default: the inputs')."),
        click.option("--device", default="auto", show_default=True, help="Where SVDs run: auto, cpu or cuda."),
        output_options,
        layout_options,
        reading_options,
    ):
        func = option(func)
    return func


@contextlib.contextmanager
def progress_bar(total: int, desc: str) -> Iterator[Callable[[int], None]]:
    """A tqdm bar on stderr (only for many modules), yielded as its update(n)."""
    with tqdm(total=total, desc=desc, unit="module", file=sys.stderr, leave=False,
              disable=total < PROGRESS_MIN_MODULES) as bar:
        yield bar.update


def require_gguf_base(fmt: str | None, base: str | None) -> None:
    """A llama.cpp adapter is named after its base: `--to gguf` needs one."""
    if fmt == "gguf" and base is None:
        raise InvalidArgumentError("--to gguf writes llama.cpp's tensor names: pass the base (--base: a .gguf, a "
                                   "Hugging Face folder or a repo id)")


def save(adapter: Adapter, output: str, fmt: str | None, overwrite: bool, layout: str | None = None,
         pad_rank: int | None = None, serve: str | None = None, base: str | None = None) -> None:
    """Write `adapter` in `fmt` (by default the format it was read from: kohya stays kohya; see default_format) and `layout` (default
    portable), padded to `pad_rank` or to the rank `serve` accepts; say what the padding cost when it is notable.
    "gguf" writes a llama.cpp adapter named after `base` (its tensor names; each module keeps its rank)."""
    if fmt == "gguf":
        require_gguf_base(fmt, base)
        if layout or pad_rank or serve:
            raise InvalidArgumentError("--layout, --pad-rank and --serve apply to PEFT, mlx and diffusers outputs; a "
                                       "llama.cpp adapter keeps each module's rank")
        write_gguf_adapter(adapter, base, output, overwrite)
        click.echo(f"wrote llama.cpp (gguf) adapter with {len(adapter)} modules to {output}")
        return
    fmt = fmt or default_format(adapter)
    layout = layout or "portable"
    rank = target_rank(adapter, pad_rank, serve)
    adapter.save(output, format=fmt, overwrite=overwrite, layout=layout, pad_rank=rank)
    padded_layout = fmt == "peft" and layout == "portable" and growth_refusal(adapter, rank, rank is not None) is None
    cost = padding_cost(adapter, rank) if padded_layout else None
    padded = f"; {cost} for portability (--layout compact keeps each module's rank)" if cost is not None and cost.notable else ""
    served = f"; serve it with {serve} {SERVING_FLAGS[serve]} {rank}" if serve is not None else ""
    click.echo(f"wrote {fmt} adapter with {len(adapter)} modules to {output}{padded}{served}")


def write_report(path: str | None, data: dict, overwrite: bool) -> None:
    """Write a command's JSON report atomically to `path` (nothing when None)."""
    if path:
        with atomic_output(path, overwrite=overwrite, is_file=True) as tmp:
            tmp.write_text(json.dumps(data, indent=2) + "\n")
        click.echo(f"wrote report to {path}")


def span(values: Iterable[int]) -> str:
    """"4" or "4-8": the range of some ranks."""
    values = list(values)
    return f"{min(values)}" if min(values) == max(values) else f"{min(values)}-{max(values)}"


Entry = tuple[int, int, int, int, float]
"""(out_features, in_features, rank before, rank after, relative error) of one module."""


def echo_summary(entries: list[Entry], footer: str) -> None:
    """A table per module shape: modules, rank before → after, worst relative error; then `footer`."""
    groups: dict[tuple[int, int], list[Entry]] = {}
    for entry in entries:
        groups.setdefault(entry[:2], []).append(entry)

    rows = [
        (f"{out}x{inp}", len(es), span([e[2] for e in es]), span([e[3] for e in es]), max(e[4] for e in es))
        for (out, inp), es in groups.items()
    ]
    headers = ["shape (out x in)", "modules", "rank before", "rank after", "worst rel. error"]
    click.echo(table(headers, rows, right=[False, True, True, True, True]))
    click.echo(footer)


def echo_report(report: RerankReport) -> None:
    """The summary of a re-rank."""
    entries = [(m.out_features, m.in_features, m.old_rank, m.new_rank, m.rel_error) for m in report.modules.values()]
    echo_summary(entries, f"{len(entries)} modules ({report.policy}): parameters {report.params_before:,} -> "
                          f"{report.params_after:,}, worst relative error {report.worst_rel_error:.4g}")


@click.command()
@click.argument("adapter", type=click.Path())
@policy_options
@click.option("--report", "report_path", type=click.Path(), help="Write the per-module report as JSON.")
@common_options
@provenance("rerank")
def rerank(adapter: str, rank: int | None, energy: float | None, ratio: float | None, threshold: float | None,
           budget: float | None, report_path: str | None, fmt: str | None, base: str | None, dtype: str | None, device: str,
           output: str, overwrite: bool, layout: str | None, pad_rank: int | None, serve: str | None, allow_pickle: bool,
           scale: float | None, alpha: float | None) -> dict:
    """Re-rank ADAPTER: best rank-k approximation of each ΔW (factored SVD), k chosen by exactly one option."""
    policy = RankPolicy.from_options(rank=rank, energy=energy, ratio=ratio, threshold=threshold, budget=budget)
    check_output(output, overwrite)
    if report_path:
        check_output(report_path, overwrite)
    loaded = adaptools.load(adapter, allow_pickle=allow_pickle, base=base, scale=scale, alpha=alpha)
    with progress_bar(len(loaded), "rerank") as update:
        result, report = adaptools.rerank(loaded, policy=policy, device=device,
                                          dtype=DTYPES.get(dtype or ""), progress=update)
    save(result, output, fmt, overwrite, layout, pad_rank, serve)
    write_report(report_path, report.to_dict(), overwrite)
    echo_report(report)
    return {"summary": report.modules}
