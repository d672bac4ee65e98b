"""Terminal rendering: plain aligned tables and number formatting."""
from __future__ import annotations

from collections.abc import Sequence

import click


def fmt(value: object) -> str:
    """Compact text for a table cell (floats to 4 significant digits)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[bool] | None = None) -> str:
    """An aligned text table; `right[i]` right-aligns column i (default: numbers right, text left)."""
    cells = [[fmt(v) for v in row] for row in rows]
    if right is None:
        right = [bool(rows) and isinstance(rows[0][i], (int, float)) for i in range(len(headers))]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def echo_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    click.echo(table(headers, rows))
