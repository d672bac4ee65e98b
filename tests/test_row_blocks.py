"""The row-block update kind: W[rows] += L·R per block of a fused weight, batched, tiled, never whole-height."""
from __future__ import annotations

import pytest
import torch

from adaptools.merge.kernels import Buffers, RowBlockUpdate, merge_weights, row_blocks


def dense(W: torch.Tensor, parts) -> torch.Tensor:
    out = W.clone().double()
    for (start, stop), L, R in parts:
        out[start:stop] += L.double() @ R.double()
    return out


@pytest.mark.parametrize("tile", [None, 7 * 5, 10_000])
def test_row_blocks_equal_dense_per_block(tile):
    g = torch.Generator().manual_seed(0)
    rows, cols = [(0, 4), (4, 8), (8, 12), (12, 28)], 5  # Flux linear1: q, k, v (I each) and the MLP (4I)
    bases, updates, expected = {}, {}, {}
    for n in range(3):
        parts = [(r, torch.randn(r[1] - r[0], 2 + (i + n) % 3, generator=g), None) for i, r in enumerate(rows)]
        parts = [(r, L, torch.randn(L.shape[1], cols, generator=g)) for r, L, _ in parts[::-1]][:3 + n % 2]
        key = f"w{n}"
        bases[key] = torch.randn(28, cols, generator=g)
        updates[key] = row_blocks(parts)
        expected[key] = dense(bases[key], parts)
    got = {k: torch.empty(28, cols) for k in bases}
    for key, first, value in merge_weights(updates, bases, torch.float32, torch.device("cpu"), Buffers(), tile):
        got[key][first:first + value.shape[0]] = value
    for key in bases:
        torch.testing.assert_close(got[key].double(), expected[key], rtol=0, atol=1e-5)
        covered = torch.zeros(28, dtype=torch.bool)
        for start, stop in updates[key].blocks:
            covered[start:stop] = True
        assert (~covered).any() == (key != "w1")
        assert torch.equal(got[key][~covered], bases[key][~covered])  # rows no block names stay as stored


def test_same_layout_stacks_once():
    a = row_blocks([((0, 2), torch.ones(2, 1), torch.ones(1, 3))])
    b = row_blocks([((0, 2), torch.ones(2, 4), torch.ones(4, 3))])
    assert a.group_key() == b.group_key()
    (start, stop, L, R), = RowBlockUpdate.stack([a, b])
    assert (start, stop, tuple(L.shape), tuple(R.shape)) == (0, 2, (2, 2, 4), (2, 4, 3))  # ranks padded, not rows


def test_wrong_block_height_is_refused():
    with pytest.raises(ValueError, match="needs 3 rows"):
        row_blocks([((0, 3), torch.ones(2, 1), torch.ones(1, 3))])
