"""The row-block update kind: W[rows] += L·R per block of a fused weight, batched, tiled, never whole-height."""
from __future__ import annotations

import pytest
import torch

from adaptools.merge.kernels import Block, Buffers, RowBlockUpdate, merge_weights, row_blocks


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
    (start, stop, L, R, magnitude), = RowBlockUpdate.stack([a, b])
    assert (start, stop, tuple(L.shape), tuple(R.shape)) == (0, 2, (2, 2, 4), (2, 4, 3))  # ranks padded, not rows
    assert magnitude is None
    dora = row_blocks([Block((0, 2), torch.ones(2, 1), torch.ones(1, 3), torch.ones(2))])
    assert dora.group_key() != a.group_key()  # a DoRA block is another layout


def test_wrong_block_height_is_refused():
    with pytest.raises(ValueError, match="needs 3 rows"):
        row_blocks([((0, 3), torch.ones(2, 1), torch.ones(1, 3))])


@pytest.mark.parametrize("tile", [None, 3 * 6, 10_000])
def test_dora_blocks_scale_their_rows_like_peft_on_the_slice(tile):
    """A DoRA block: the rows it covers become (m / ‖W[rows] + L·R‖_row) ⊙ (W[rows] + L·R), PEFT's merge of the
    unfused module (checked with PEFT's own DoRA layer); a plain block beside it adds; other rows stay."""
    from peft.tuners.lora.dora import DoraLinearLayer

    g = torch.Generator().manual_seed(1)
    cols, bases, updates, slices = 6, {}, {}, {}
    for n in range(2):  # two weights of one layout: stacked, one call per block and tile
        W = torch.randn(20, cols, generator=g)
        L, R = torch.randn(8, 3, generator=g), torch.randn(3, cols, generator=g)
        P, Q = torch.randn(4, 2, generator=g), torch.randn(2, cols, generator=g)
        m = torch.rand(8, generator=g) + 0.5
        bases[f"w{n}"], slices[f"w{n}"] = W, (W[4:12], L, R, m, P, Q)
        updates[f"w{n}"] = row_blocks([Block((4, 12), L, R, m), Block((16, 20), P, Q)])
    got = {k: torch.empty(20, cols) for k in bases}
    for key, first, value in merge_weights(updates, bases, torch.float32, torch.device("cpu"), Buffers(), tile):
        got[key][first:first + value.shape[0]] = value
    for key, (W_rows, L, R, m, P, Q) in slices.items():
        norm = DoraLinearLayer(fan_in_fan_out=False).get_weight_norm(W_rows, L @ R, scaling=1.0)
        expected = (m / norm).unsqueeze(1) * (W_rows + L @ R)
        torch.testing.assert_close(got[key][4:12], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[key][16:20], bases[key][16:20] + P @ Q, rtol=1e-5, atol=1e-5)
        assert torch.equal(got[key][:4], bases[key][:4]) and torch.equal(got[key][12:16], bases[key][12:16])
