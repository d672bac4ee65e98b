"""Figures of `adaptools.spectrum` results: energy curves per module type and a layers × module-type heatmap
(effective rank, or subspace overlap per pair of adapters). matplotlib is the optional `plot` extra and is only
imported when a figure is made; no pyplot state is used.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .atomic import atomic_output
from .errors import InvalidArgumentError
from .spectrum import ENERGY_LEVELS, OTHER_COLUMN, ModuleGrid, module_grid

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["require_matplotlib", "spectrum_figure", "save_spectrum_plot"]

PANEL_COLUMNS = 4
PANEL_SIZE = (3.6, 2.9)
"""Width and height in inches of one energy-curve panel."""
ANNOTATE_MAX_CELLS = 160
"""Heatmaps with at most this many cells print their values."""
MISSING_COLOR = "#e6e6e6"
MIN_WIDTH = 8.5
"""Inches; room for the heatmap titles."""


def require_matplotlib() -> type[Figure]:
    """matplotlib's Figure class, or InvalidArgumentError naming the `plot` extra when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise InvalidArgumentError(
            "plots need matplotlib, which is not installed: pip install 'adaptools[plot]'") from exc
    return Figure


def _documents(result: Mapping) -> tuple[list[Mapping], list[Mapping]]:
    """(adapter documents, pairs) of a `spectrum` or a `compare_spectra` result."""
    if "comparison" in result:
        return list(result["adapters"]), list(result["comparison"]["pairs"])
    return [result], []


def _energy_curve(singular_values: Sequence[float]) -> np.ndarray | None:
    """[0, e_1, ..., e_r] with e_k = Σ_{i<k} s_i² / Σ s_i²; None for ΔW = 0."""
    sq = np.square(np.asarray(singular_values, dtype=np.float64))
    total = sq.sum()
    return None if total <= 0 else np.concatenate([[0.0], np.cumsum(sq) / total])


def _energy_panel(ax: Axes, column: int, grid: ModuleGrid, docs: Sequence[Mapping], colormap) -> None:
    """Energy kept against rank, one line per module of this grid column (colour: layer, or adapter)."""
    from matplotlib.ticker import MaxNLocator

    comparing = len(docs) > 1
    count = 0
    for a, doc in enumerate(docs):
        for path, record in doc["modules"].items():
            row, col = grid.cells[path]
            if col != column:
                continue
            count += 1
            curve = _energy_curve(record["singular_values"])
            if curve is None:  # ΔW = 0
                continue
            color = f"C{a % 10}" if comparing else colormap(row / max(1, len(grid.rows) - 1))
            ax.plot(np.arange(len(curve)), curve, color=color, lw=1.1, alpha=0.7 if comparing else 0.85)
    for tau in ENERGY_LEVELS:
        ax.axhline(tau, color="0.4", ls="--", lw=0.8)
        ax.annotate(f"{tau:g}", (0.02, tau), xycoords=("axes fraction", "data"), ha="left", va="bottom",
                    fontsize=7, color="0.3")
    ax.set_title(f"{grid.columns[column]} ({count} module{'' if count == 1 else 's'})", fontsize=10)
    ax.set_xlabel("rank k", fontsize=8)
    ax.set_ylabel("energy kept", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_xlim(left=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def _heatmap(fig: Figure, ax: Axes, grid: ModuleGrid, values: Mapping[str, float | None], title: str,
             label: str, vmax: float) -> None:
    """Layers × module types coloured by `values` (missing cells grey), with a colorbar and, when small, numbers."""
    import matplotlib

    data = np.full((len(grid.rows), len(grid.columns)), np.nan)
    for path, value in values.items():
        if value is not None:
            data[grid.cells[path]] = value
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=MISSING_COLOR)
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto",
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, label=label, fraction=0.05, pad=0.02)
    ax.set_title(title, fontsize=10)
    tilt = max(map(len, grid.columns)) > 12
    ax.set_xticks(range(len(grid.columns)), grid.columns, fontsize=8, rotation=30 if tilt else 0,
                  ha="right" if tilt else "center")
    step = max(1, math.ceil(len(grid.rows) / 40))
    ax.set_yticks(range(0, len(grid.rows), step), grid.rows[::step], fontsize=7)
    ax.set_ylabel("layer or module" if OTHER_COLUMN in grid.columns else "layer", fontsize=8)
    if data.size <= ANNOTATE_MAX_CELLS:
        for (i, j), value in np.ndenumerate(data):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 * vmax else "black")


def spectrum_figure(result: Mapping, dpi: int = 100) -> Figure:
    """The figure of a `spectrum` / `compare_spectra` result: one energy-curve panel per grid column (module type),
    then one heatmap: effective rank for one adapter, or one subspace-overlap heatmap per pair of adapters."""
    Figure = require_matplotlib()
    import matplotlib
    from matplotlib.lines import Line2D

    docs, pairs = _documents(result)
    grid = module_grid(list(dict.fromkeys(p for doc in docs for p in doc["modules"])))
    n_panels = len(grid.columns)
    ncols = min(PANEL_COLUMNS, n_panels)
    energy_rows = math.ceil(n_panels / ncols)
    n_heat = max(1, len(pairs))
    heat_height = min(12.0, max(3.0, 0.28 * len(grid.rows) + 1.6))
    width = max(PANEL_SIZE[0] * ncols, MIN_WIDTH)
    height = PANEL_SIZE[1] * energy_rows + heat_height * n_heat + 0.5
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    spec = fig.add_gridspec(energy_rows + n_heat, ncols,
                            height_ratios=[PANEL_SIZE[1]] * energy_rows + [heat_height] * n_heat)
    colormap = matplotlib.colormaps["viridis"]
    for column in range(n_panels):
        _energy_panel(fig.add_subplot(spec[column // ncols, column % ncols]), column, grid, docs, colormap)
    if pairs:
        names = [doc["name"] for doc in docs]
        fig.legend(handles=[Line2D([], [], color=f"C{a % 10}", label=n) for a, n in enumerate(names)],
                   loc="outside upper right", fontsize=8, ncols=min(4, len(names)))
        fig.suptitle("energy kept by the top k singular values, per module type", fontsize=10)
        for p, pair in enumerate(pairs):
            overlap = {path: None if r["column_overlap"] is None else (r["column_overlap"] + r["row_overlap"]) / 2
                       for path, r in pair["modules"].items()}
            title = (f"subspace overlap, {pair['names'][0]} vs {pair['names'][1]} (mean of column and row spaces; "
                     "1 = same, 0 = orthogonal; grey = not shared)")
            _heatmap(fig, fig.add_subplot(spec[energy_rows + p, :]), grid, overlap, title, "overlap", 1.0)
    else:
        doc = docs[0]
        fig.suptitle(f"{doc['name'] or 'adapter'}\nenergy kept by the top k singular values "
                     "(line colour: layer, dark = first)", fontsize=10)
        ranks = {path: r["effective_rank"] for path, r in doc["modules"].items()}
        top = max(r["rank"] for r in doc["modules"].values())
        _heatmap(fig, fig.add_subplot(spec[energy_rows, :]), grid, ranks,
                 "effective rank exp(H(s/Σs)) per module (colour scale up to the largest stored rank)",
                 "effective rank", float(top))
    return fig


def save_spectrum_plot(result: Mapping, path: str | os.PathLike, *, overwrite: bool = False,
                       dpi: int = 100) -> Figure:
    """Write `spectrum_figure(result)` atomically (format from the suffix: .png, .pdf, .svg, ...; none means PNG);
    an existing file is refused unless `overwrite`. Returns the figure."""
    fig = spectrum_figure(result, dpi=dpi)
    suffix = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    if suffix not in fig.canvas.get_supported_filetypes():
        raise InvalidArgumentError(f"cannot write a plot as .{suffix}: use .png, .pdf or .svg")
    with atomic_output(path, overwrite=overwrite, is_file=True) as tmp:
        fig.savefig(tmp, format=suffix, dpi=dpi)
    return fig
