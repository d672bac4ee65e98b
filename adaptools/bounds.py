"""What a small file may make adaptools allocate or write, computed from shapes before anything is allocated.

- Expanding factors (LoHa's face-split, LoKr's Kronecker factors, Tucker cores contracted into A): a module of
  exact rank R and shape (out, in) is kept as exact factors when R ≤ min(out, in), i.e. when R·(out + in) numbers cost
  no more than a dense ΔW with an identity factor (out·in + min(out, in)²); otherwise it is represented densely.
  Either way the numbers allocated for a whole file must stay within `expansion_limit(stored)`: EXPANSION_FACTOR
  times the numbers the file stores, and never less than EXPANSION_FLOOR.
- Archives (.npz): the members' declared sizes must agree with their array headers, and the total they decompress to
  must stay within ARCHIVE_RATIO times the archive's size (at least ARCHIVE_FLOOR bytes).
- Dense intermediates (merge methods such as TIES or DARE build each module's dense task matrices): the largest one
  module needs must stay within the same expansion_limit of what the adapters store.
- Padded layouts: padding every module to one rank may grow an adapter by PADDING_GROWTH at most (or add less than
  PADDING_FLOOR bytes); beyond that the writer falls back to the compact layout (adaptools.formats.layout).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import AdapterFormatError

EXPANSION_FACTOR = 4096
"""Numbers allocated to expand a file's factors, per number it stores (a LyCORIS LoKr with both factors full on a
4096-wide layer needs 2,048)."""
EXPANSION_FLOOR = 2**27
"""Numbers any file may expand to (512 MiB as float32), whatever it stores."""
ARCHIVE_RATIO = 100
"""Bytes an .npz archive may decompress to, per byte of the archive (numpy's savez stores members uncompressed,
savez_compressed of trained float weights compresses about 1.1:1)."""
ARCHIVE_FLOOR = 64 * 2**20
"""Bytes any .npz archive may decompress to, whatever its size."""
PADDING_GROWTH = 16.0
"""The most that padding every module to one rank may grow an adapter's parameters (portable layout) ..."""
PADDING_FLOOR = 64 * 2**20
"""... unless the padding adds less than this many bytes (small adapters are always padded)."""


def expansion_limit(stored: int) -> int:
    """The numbers a file storing `stored` numbers may expand to."""
    return max(EXPANSION_FLOOR, EXPANSION_FACTOR * stored)


def archive_limit(size: int) -> int:
    """The bytes an archive of `size` bytes may decompress to."""
    return max(ARCHIVE_FLOOR, ARCHIVE_RATIO * size)


def exact_fits(rank: int, out_features: int, in_features: int) -> bool:
    """True when exact factors of `rank` cost no more than a dense ΔW with an identity factor: rank ≤ min(out, in)."""
    return rank <= min(out_features, in_features)


def expanded_numbers(rank: int, out_features: int, in_features: int) -> int:
    """Numbers allocated for one module: rank·(out + in) as exact factors, else the dense ΔW, its identity factor and
    one product of the same size while it is built (2·out·in + min(out, in)²)."""
    if exact_fits(rank, out_features, in_features):
        return rank * (out_features + in_features)
    return 2 * out_features * in_features + min(out_features, in_features) ** 2


def stored_numbers(grouped: Mapping[str, Mapping[str, Any]]) -> int:
    """Numbers a file's modules store ({module: {role: tensor}})."""
    return sum(t.numel() for parts in grouped.values() for t in parts.values())


def check_expansion(costs: Mapping[str, int], stored: int, what: str) -> None:
    """AdapterFormatError, before anything is allocated, when expanding modules (`costs`: name → numbers) would
    allocate more than expansion_limit(stored); the error names the largest module."""
    total = sum(costs.values())
    limit = expansion_limit(stored)
    if total > limit:
        worst = max(costs, key=costs.__getitem__)
        raise AdapterFormatError(
            f"expanding the {what} factors would allocate {total:,} numbers ({worst!r} alone {costs[worst]:,}) from a "
            f"file that stores {stored:,}: more than {EXPANSION_FACTOR:,} per stored number (at least "
            f"{EXPANSION_FLOOR:,} are always allowed; adaptools.bounds): the shapes claim far more than the file holds"
        )


def check_peak(costs: Mapping[str, int], stored: int, what: str) -> None:
    """AdapterFormatError, before anything is allocated, when the largest single module's dense intermediates
    (`costs`: name → numbers, worked on one module group at a time) exceed expansion_limit(stored)."""
    if not costs:
        return
    worst = max(costs, key=costs.__getitem__)
    if costs[worst] > expansion_limit(stored):
        raise AdapterFormatError(
            f"{what} would hold {costs[worst]:,} numbers at once for module {worst!r} alone, from adapters that store "
            f"{stored:,}: more than {EXPANSION_FACTOR:,} per stored number (at least {EXPANSION_FLOOR:,} are always "
            "allowed; adaptools.bounds): the shapes claim far more than the files hold"
        )
