"""`adaptools spectrum`: rank-spectrum diagnostics of one adapter, or a comparison of several."""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import click

import adaptools
from adaptools.atomic import atomic_output, check_output, check_output_paths
from adaptools.spectrum import ENERGY_LEVELS, energy_key, module_grid

from ..options import allow_pickle, overwrite
from ..render import table

Cell = Callable[[Mapping], object]


def _mean(values: Sequence[float | None]) -> float | str:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else "-"


def _value(value: object) -> object:
    return "-" if value is None else value


def _grid_table(modules: Mapping[str, Mapping], cell: Cell, spec: str) -> str:
    """Layers × module types (or one row per module for paths without a layer index) of `cell(record)`."""
    grid = module_grid(list(modules))
    rows = [[label] + [""] * len(grid.columns) for label in grid.rows]
    for path, record in modules.items():
        row, col = grid.cells[path]
        value = cell(record)
        rows[row][col + 1] = "-" if value is None else format(value, spec)
    return table(["layer", *grid.columns], rows, right=[False] + [True] * len(grid.columns))


def _by_type(modules: Mapping[str, Mapping], columns: Mapping[str, Cell]) -> str:
    """Mean of each column over the modules of each grid column (module type)."""
    grid = module_grid(list(modules))
    groups: dict[str, list[Mapping]] = {c: [] for c in grid.columns}
    for path, record in modules.items():
        groups[grid.columns[grid.cells[path][1]]].append(record)
    rows = [[name, len(records), *(_mean([cell(r) for r in records]) for cell in columns.values())]
            for name, records in groups.items()]
    return table(["type", "modules", *columns], rows, right=[False] + [True] * (len(columns) + 1))


def _top(items: Mapping[str, Mapping], key: Cell, n: int, columns: Mapping[str, Cell]) -> str:
    """The n items with the largest key, one row each."""
    chosen = sorted(items.items(), key=lambda kv: -(key(kv[1]) or 0.0))[:n]
    rows = [[path, *(_value(cell(r)) for cell in columns.values())] for path, r in chosen]
    return table(["module", *columns], rows, right=[False] + [True] * len(columns))


def _metric_columns(modules: Mapping[str, Mapping]) -> dict[str, Cell]:
    columns: dict[str, Cell] = {
        "rank": lambda r: r["rank"],
        "eff.rank": lambda r: r["effective_rank"],
        "stable": lambda r: r["stable_rank"],
        **{f"r@{tau:g}": (lambda r, k=energy_key(tau): r[k]) for tau in ENERGY_LEVELS},
        "num.rank": lambda r: r["numerical_rank"],
    }
    records = list(modules.values())
    if any(r["relative_norm"] is not None for r in records):
        columns["|ΔW|/|W|"] = lambda r: r["relative_norm"]
        columns["σ1 ratio"] = lambda r: r["relative_spectral_norm"]
    if any(r["nf4_survival"] is not None for r in records):
        columns["NF4 kept"] = lambda r: r["nf4_survival"]
    return columns


def _render_adapter(doc: Mapping, top: int, grid: bool) -> None:
    modules = doc["modules"]
    ranks = sorted({r["rank"] for r in modules.values()})
    rank_text = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
    click.echo(f"{doc['name'] or 'adapter'}: {doc['format']}, {len(modules)} modules, {rank_text}, "
               f"{doc['num_params']:,} parameters" + (f"; base {doc['base']}" if doc["base"] else ""))
    if any(r["dora"] for r in modules.values()):
        click.echo("DoRA: the metrics describe the low-rank part scale·B@A; the magnitude rescaling is not included")
    columns = _metric_columns(modules)
    if grid:
        click.echo("\neffective rank exp(H(p)), p_i = s_i/Σs_j")
        click.echo(_grid_table(modules, lambda r: r["effective_rank"], ".2f"))
    click.echo("\nper module type (mean over modules)")
    click.echo(_by_type(modules, columns))
    if top:
        click.echo(f"\ntop {min(top, len(modules))} modules by |ΔW|_F")
        detail = {"rank": columns["rank"], "|ΔW|_F": lambda r: r["frobenius_norm"],
                  "s1, s2, s3": lambda r: ", ".join(f"{s:.3g}" for s in r["singular_values"][:3]),
                  **{k: v for k, v in columns.items() if k != "rank"}}
        click.echo(_top(modules, lambda r: r["frobenius_norm"], top, detail))
    click.echo(f"\nsuggestion: {doc['suggestion']['text']}")


def _render_pair(pair: Mapping, top: int) -> None:
    first, second = pair["names"]
    modules = pair["modules"]
    click.echo(f"\n{first} vs {second}: {len(modules)} shared modules "
               f"(only in {first}: {len(pair['only_in_first'])}, only in {second}: {len(pair['only_in_second'])})")
    if not modules:
        return
    click.echo("\ncosine <ΔW1, ΔW2>_F / (|ΔW1|_F |ΔW2|_F)")
    click.echo(_grid_table(modules, lambda r: r["cosine"], ".3f"))
    columns: dict[str, Cell] = {
        "col.overlap": lambda r: r["column_overlap"],
        "row.overlap": lambda r: r["row_overlap"],
        "chance": lambda r: (r["column_overlap_chance"] + r["row_overlap_chance"]) / 2,
        "cosine": lambda r: r["cosine"],
    }
    click.echo("\nper module type (mean; chance = overlap of random subspaces of these sizes)")
    click.echo(_by_type(modules, columns))
    if top:
        click.echo(f"\ntop {min(top, len(modules))} modules by |cosine|")
        click.echo(_top(modules, lambda r: abs(r["cosine"] or 0.0), top, columns))
    click.echo(f"\nreading: {pair['reading']}")


def _labels(paths: Sequence[str]) -> list[str]:
    """Short labels (file or folder names) where they are unique, else the paths as given."""
    names = [Path(p).name or p for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


@click.command()
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option("--base", type=click.Path(),
              help="Base checkpoint (NF4 and FP8 dequantized): adds |ΔW|/|W|, σ1(ΔW)/σ1(W) and, for NF4 bases, the "
                   "part of ΔW that survives requantization (also maps kohya names to module paths).")
@click.option("--json", "json_path", type=click.Path(), metavar="FILE",
              help="Write the results as JSON to FILE ('-' prints the JSON instead of the tables).")
@click.option("--plot", "plot_path", type=click.Path(), metavar="FILE.png",
              help="Write energy curves per module type and a layers x module-type heatmap (needs matplotlib).")
@click.option("--top", type=click.IntRange(min=0), default=5, show_default=True, metavar="N",
              help="List the N modules with the largest |ΔW|_F (comparing: the largest |cosine|); 0 for none.")
@overwrite
@allow_pickle
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
def spectrum(adapters: tuple[str, ...], base: str | None, json_path: str | None, plot_path: str | None, top: int,
             overwrite: bool, allow_pickle: bool, device: str) -> None:
    """Singular values and rank metrics per module of ADAPTER; with several adapters, how their updates overlap.

    Metrics come from the exact factored SVD of each ΔW = scale·B@A (no dense ΔW): effective rank, stable rank,
    the ranks keeping 90% / 99% of the energy, numerical rank; it ends with a suggested --energy policy.
    """
    check_output_paths([p for p in (json_path, plot_path) if p and p != "-"], [*adapters, *([base] if base else [])])
    for path in (json_path, plot_path):
        if path and path != "-":
            check_output(path, overwrite)
    if plot_path:
        from adaptools.spectrum_plot import require_matplotlib, save_spectrum_plot

        require_matplotlib()
    if len(adapters) == 1:
        result = adaptools.spectrum(adapters[0], base=base, device=device, allow_pickle=allow_pickle)
        docs, pairs = [result], []
    else:
        result = adaptools.compare_spectra(adapters, base=base, names=_labels(adapters), device=device,
                                           allow_pickle=allow_pickle)
        docs, pairs = result["adapters"], result["comparison"]["pairs"]
    if plot_path:
        save_spectrum_plot(result, plot_path, overwrite=overwrite)
    text = json.dumps(result, indent=2)
    if json_path == "-":
        click.echo(text)
        return
    if json_path:
        with atomic_output(json_path, overwrite=overwrite, is_file=True) as tmp:
            tmp.write_text(text + "\n", encoding="utf-8")
    for i, doc in enumerate(docs):
        if i:
            click.echo("")
        _render_adapter(doc, top, grid=not pairs)
    for pair in pairs:
        _render_pair(pair, top)
    for path, what in ((plot_path, "plot"), (json_path, "JSON")):
        if path:
            click.echo(f"wrote {what} to {path}")
