"""`adaptools combine`, `interpolate`, `negate`: exact adapter arithmetic (optionally re-ranked)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import click

import adaptools
from adaptools.adapter import Adapter
from adaptools.atomic import check_output
from adaptools.combine import ALL_METHODS, FULL_TENSOR_MODES, check_method
from adaptools.errors import InvalidArgumentError
from adaptools.methods import MAJORITY_SIGNS
from adaptools.pico import CALIBRATIONS

from ..provenance import provenance
from .rerank import DTYPES, common_options, echo_report, echo_summary, optional_policy, policy_options, progress_bar, save, span


def parse_weights(text: str | None) -> list[float] | None:
    """"0.7,-0.3" → [0.7, -0.3]."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise InvalidArgumentError(f"--weights must be comma-separated numbers, got {text!r}") from None


def full_tensors_option(func: Callable) -> Callable:
    return click.option(
        "--full-tensors", type=click.Choice(FULL_TENSOR_MODES), default="average", show_default=True,
        help="Full tensors (modules_to_save): weighted average (needs them in every input, weights >= 0), or drop.",
    )(func)


def run(paths: Sequence[str], weights: list[float] | None, policy_values: dict, *, full_tensors: str, fmt: str | None,
        base: str | None, dtype: str | None, device: str, output: str, overwrite: bool, allow_pickle: bool,
        layout_values: dict, scale: float | None = None, alpha: float | None = None,
        merge_method: dict | None = None) -> None:
    """Load, combine (re-rank when a policy is given, merge by `merge_method`'s options), save and print the summary."""
    policy = optional_policy(**policy_values)
    if merge_method is not None:
        check_method(**merge_method, policy=policy)
    check_output(output, overwrite)
    adapters = [adaptools.load(p, allow_pickle=allow_pickle, base=base, scale=scale, alpha=alpha) for p in paths]
    options = dict(dtype=DTYPES.get(dtype or ""), full_tensors=full_tensors, **(merge_method or {}))
    if policy is None and options.get("method", "sum") == "sum":
        result, report = adaptools.combine(adapters, weights, device=device, **options), None
    else:
        names = {name for a in adapters for name in a.modules}
        with progress_bar(len(names), "combine") as update:
            result, report = adaptools.combine(adapters, weights, policy=policy, device=device, progress=update, **options)
    for path, adapter, weight in zip(paths, adapters, weights or [1.0] * len(paths)):
        click.echo(f"{weight:g} x {path} ({len(adapter)} modules, rank {span(adapter.ranks.values())})")
    save(result, output, fmt, overwrite, **layout_values)
    if report is None:
        echo_exact(result, "pico-calibrated sum" if options.get("calibrate") else "exact")
    else:
        echo_report(report)


def echo_exact(result: Adapter, label: str = "exact") -> None:
    """The summary of a result without truncation: ranks as computed, zero error."""
    entries = [(m.out_features, m.in_features, m.rank, m.rank, 0.0) for _, m in result.items()]
    echo_summary(entries, f"{len(entries)} modules ({label}): parameters {result.num_params:,}, relative error 0")


METHOD_HELP = (
    "sum: exact. ties, dare_linear, dare_ties, magnitude_prune: per-entry rules on each dense ΔW, refit by SVD. "
    "knots_ties/knots_dare: TIES/DARE in KnOTS' shared SVD basis. Core-space methods (never a dense ΔW; rank <= Σr): "
    "tsv (TSV-M: top singular vectors per task, orthogonalised; at most a task's own rank per task, where the "
    "full-space code takes int(D/T) even beyond it), iso_c (flattened spectrum of the sum; the mean is over its "
    "non-zero singular values, the full-space code averages min(m,n) mostly-zero ones), iso_cts (common + task "
    "subspaces, flattened), core_ties / core_dare (TIES / DARE on the entries of the small task cores, not of ΔW: "
    "a different method from ties/dare; core_dare at density 1 is the exact sum), ctm (Compress-then-Merge: "
    "shared rank-R subspace by HOOI, then TIES; needs --rank and --density)."
)



@click.command()
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option("--weights", help="Comma-separated weights, one per adapter (default 1 each), e.g. 0.7,0.3.")
@click.option("--method", type=click.Choice(ALL_METHODS), default="sum", show_default=True, help=METHOD_HELP)
@click.option("--density", type=float,
              help="Fraction of entries kept by the trim / DARE (0 < D <= 1); core_ties, core_dare and ctm keep "
                   "entries of the task cores (required there).")
@click.option("--majority-sign", type=click.Choice(MAJORITY_SIGNS), default="total", show_default=True,
              help="Sign election of ties/dare_ties/knots_*: sign of the sum, or the most frequent sign.")
@click.option("--seed", type=int, default=0, show_default=True, help="DARE's seed (one generator per module).")
@click.option("--beta", type=float,
              help="ctm only: blend of each task's own norm (1) and the mean norm (0, the default) before HOOI.")
@click.option("--calibrate", type=click.Choice(CALIBRATIONS),
              help="pico: damp the B directions the tasks share before the method, restore the norm after "
                   "(with any method).")
@policy_options
@full_tensors_option
@common_options
@provenance("combine")
def combine(adapters: tuple[str, ...], weights: str | None, method: str, density: float | None, majority_sign: str,
            seed: int, beta: float | None, calibrate: str | None, rank, energy, ratio, threshold, budget, full_tensors: str, fmt: str | None, base: str | None,
            dtype: str | None, device: str, output: str, overwrite: bool, layout: str | None, pad_rank: int | None,
            serve: str | None, allow_pickle: bool,
            scale: float | None, alpha: float | None) -> None:
    """Weighted sum of ADAPTERS, exact (rank Σ r_i); with a rank option, re-ranked by SVD; or merged by --method.

    With a core-space method, --rank/--energy/--ratio/--threshold/--budget choose the rank of the result last
    (default: its non-zero singular values); ctm's --rank is its shared subspace's rank.
    """
    policy_values = dict(rank=rank, energy=energy, ratio=ratio, threshold=threshold, budget=budget)
    merge_method = dict(method=method, density=density, majority_sign=majority_sign, seed=seed, beta=beta,
                        calibrate=calibrate)
    run(adapters, parse_weights(weights), policy_values, full_tensors=full_tensors, fmt=fmt, base=base, dtype=dtype,
        device=device, output=output, overwrite=overwrite, allow_pickle=allow_pickle, scale=scale, alpha=alpha,
        layout_values=dict(layout=layout, pad_rank=pad_rank, serve=serve), merge_method=merge_method)


@click.command()
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("-t", "--t", "t", type=float, required=True, help="Position t: the result is (1 − t)·A + t·B.")
@policy_options
@full_tensors_option
@common_options
@provenance("interpolate")
def interpolate(a: str, b: str, t: float, rank, energy, ratio, threshold, budget, full_tensors: str, fmt: str | None,
                base: str | None, dtype: str | None, device: str, output: str, overwrite: bool, layout: str | None,
                pad_rank: int | None, serve: str | None, allow_pickle: bool,
                scale: float | None, alpha: float | None) -> None:
    """(1 − t)·A + t·B, exact (rank r_A + r_B); with a rank option, re-ranked by SVD."""
    policy_values = dict(rank=rank, energy=energy, ratio=ratio, threshold=threshold, budget=budget)
    run((a, b), [1.0 - t, t], policy_values, full_tensors=full_tensors, fmt=fmt, base=base, dtype=dtype,
        device=device, output=output, overwrite=overwrite, allow_pickle=allow_pickle, scale=scale, alpha=alpha,
        layout_values=dict(layout=layout, pad_rank=pad_rank, serve=serve))


@click.command()
@click.argument("adapter", type=click.Path())
@full_tensors_option
@common_options
@provenance("negate")
def negate(adapter: str, full_tensors: str, fmt: str | None, base: str | None, dtype: str | None, device: str, output: str,
           overwrite: bool, layout: str | None, pad_rank: int | None, serve: str | None, allow_pickle: bool,
           scale: float | None, alpha: float | None) -> None:
    """−ADAPTER, exact at the same rank (undoes ADAPTER when both are applied)."""
    run((adapter,), [-1.0], {}, full_tensors=full_tensors, fmt=fmt, base=base, dtype=dtype, device=device,
        output=output, overwrite=overwrite, allow_pickle=allow_pickle, scale=scale, alpha=alpha,
        layout_values=dict(layout=layout, pad_rank=pad_rank, serve=serve))
