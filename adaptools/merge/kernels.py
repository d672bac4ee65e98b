"""Merge kernels: the batched math that changes base weights, one kind of update per class.

A kind of update (`Update` subclass) describes one output's change to one base weight on the weight's 2-D view
(first dimension by the rest flattened). The executor groups a step's updates by `group_key`, calls the kind's
`stack` once per group and its `apply` once per tile of rows of a float32 stack W (b, rows, cols), in place.
Adding a kind is one subclass with those three members (and `tiled` when it needs whole columns).
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..linalg import group_by
from ..checkpoints.stored import check_range


def lora_merge(W: Tensor, B: Tensor, A: Tensor, *, inplace: bool = False) -> Tensor:
    """W + B @ A for one matrix (addmm) or a stack (b, out, in) (one baddbmm); scales are folded into B."""
    if W.ndim == 2:
        return W.addmm_(B, A) if inplace else torch.addmm(W, B, A)
    return W.baddbmm_(B, A) if inplace else torch.baddbmm(W, B, A)


def dora_merge_rows(W: Tensor, B: Tensor, A: Tensor, magnitude: Tensor, *, inplace: bool = False,
                    columns: bool = False) -> Tensor:
    """PEFT's DoRA merge W' = (m / ‖V‖_row) ⊙ V with V = W + B @ A, canonical (out, in) or (b, out, in), scale in B.

    `magnitude` is (out,) or (b, out); a row with ‖V‖ = 0 stays 0. With `columns`, W holds Vᵀ's layout (the
    base stores ΔWᵀ): norms and scaling run over columns. With `inplace`, W is overwritten by W'.
    """
    V = lora_merge(W, B, A, inplace=inplace)
    norms = torch.linalg.vector_norm(V, dim=-2 if columns else -1)
    gain = torch.where(norms > 0, magnitude / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)
    return V.mul_(gain.unsqueeze(-2 if columns else -1))


def stack_padded(matrices: Sequence[Tensor], dim: int) -> Tensor:
    """The matrices stacked (b, ...), zero-padded along `dim` to the largest of them."""
    size = max(m.shape[dim] for m in matrices)
    if all(m.shape[dim] == size for m in matrices):
        return torch.stack(list(matrices))
    shape = list(matrices[0].shape)
    shape[dim] = size
    stacked = matrices[0].new_zeros(len(matrices), *shape)
    for j, m in enumerate(matrices):
        stacked[j].narrow(dim, 0, m.shape[dim]).copy_(m)
    return stacked


class Update:
    """One output's change to one base weight's 2-D view (float32 factors on the merge device).

    Subclasses implement `stack` (the group's tensors batched once) and `apply` (the change to rows first..last
    of every weight of the group, in place), and `tiled` where `apply` needs all rows at once.
    """

    @property
    def tiled(self) -> bool:
        """True when `apply` works on any tile of rows (False: all rows at once)."""
        return True

    def group_key(self) -> Hashable:
        """Updates with equal keys (and weights of equal shape) are stacked and applied together."""
        return type(self)

    @classmethod
    def stack(cls, updates: Sequence[Update]) -> Any:
        """What `apply` needs for a group of updates, batched along a new first dimension."""
        raise NotImplementedError

    @classmethod
    def apply(cls, W: Tensor, stacked: Any, first: int, last: int) -> None:
        """Change W (b, last − first, cols), rows first..last of the group's weights, in place."""
        raise NotImplementedError


@dataclass
class LoraUpdate(Update):
    """W' = W + L @ R: (L, R) = (B, A), or (Aᵀ, Bᵀ) where the base stores ΔWᵀ; scale and weight folded into L
    (several adapters: factors concatenated; ranks zero-padded to the largest of a group)."""

    L: Tensor
    R: Tensor

    @classmethod
    def stack(cls, updates: Sequence[LoraUpdate]) -> tuple[Tensor, Tensor]:
        return stack_padded([u.L for u in updates], dim=1), stack_padded([u.R for u in updates], dim=0)

    @classmethod
    def apply(cls, W: Tensor, stacked: tuple[Tensor, Tensor], first: int, last: int) -> None:
        L, R = stacked
        lora_merge(W, L[:, first:last], R, inplace=True)


@dataclass
class DoraUpdate(LoraUpdate):
    """V = W + L @ R, then each canonical row of V scaled to its magnitude: W' = (m / ‖V‖) ⊙ V (a row of the
    view, or a column when `columns`: the base stores ΔWᵀ, and then all rows are needed at once)."""

    magnitude: Tensor
    columns: bool = False

    @property
    def tiled(self) -> bool:
        return not self.columns

    def group_key(self) -> Hashable:
        return type(self), self.columns

    @classmethod
    def stack(cls, updates: Sequence[DoraUpdate]) -> tuple[Tensor, Tensor, Tensor, bool]:
        L, R = LoraUpdate.stack(updates)
        return L, R, torch.stack([u.magnitude for u in updates]), updates[0].columns

    @classmethod
    def apply(cls, W: Tensor, stacked: tuple[Tensor, Tensor, Tensor, bool], first: int, last: int) -> None:
        L, R, magnitude, columns = stacked
        gains = magnitude if columns else magnitude[:, first:last]
        dora_merge_rows(W, L[:, first:last], R, gains, inplace=True, columns=columns)


class Block(NamedTuple):
    """One row block of a fused weight's update: rows [start, stop) get L @ R, L (stop − start, r), R (r, cols);
    with a DoRA `magnitude` (stop − start,) those rows are then scaled to it: W' = (m / ‖V‖_row) ⊙ V."""

    rows: tuple[int, int]
    L: Tensor
    R: Tensor
    magnitude: Tensor | None = None


@dataclass
class RowBlockUpdate(Update):
    """W[start:stop] += L @ R for each block of a fused weight (Flux qkv / linear1, OpenCLIP in_proj: one block per
    diffusers module it fuses); L holds the block's rows only, so no ΔW or factor spans the whole fused height.
    A DoRA block then scales its rows to its magnitude (PEFT's norm is per output row: the same math on the rows it
    covers). Plain blocks may repeat or overlap (their updates add); a DoRA block overlaps none (the plan refuses
    that). Same-layout weights stack: one batched call per block and tile."""

    blocks: tuple[tuple[int, int], ...]
    factors: tuple[tuple[Tensor, Tensor], ...]
    magnitudes: tuple[Tensor | None, ...]

    def group_key(self) -> Hashable:
        return type(self), self.blocks, tuple(m is not None for m in self.magnitudes)

    @classmethod
    def stack(cls, updates: Sequence[RowBlockUpdate]) -> list[tuple[int, int, Tensor, Tensor, Tensor | None]]:
        return [(start, stop, stack_padded([u.factors[b][0] for u in updates], dim=1),
                 stack_padded([u.factors[b][1] for u in updates], dim=0),
                 None if updates[0].magnitudes[b] is None else torch.stack([u.magnitudes[b] for u in updates]))
                for b, (start, stop) in enumerate(updates[0].blocks)]

    @classmethod
    def apply(cls, W: Tensor, stacked: list[tuple[int, int, Tensor, Tensor, Tensor | None]], first: int,
              last: int) -> None:
        for start, stop, L, R, magnitude in stacked:
            low, high = max(start, first), min(stop, last)
            if low >= high:
                continue
            rows, factor = W[:, low - first:high - first], L[:, low - start:high - start]
            if magnitude is None:
                lora_merge(rows, factor, R, inplace=True)
            else:
                dora_merge_rows(rows, factor, R, magnitude[:, low - start:high - start], inplace=True)


def row_blocks(parts: Sequence[Block | tuple]) -> RowBlockUpdate:
    """One weight's RowBlockUpdate from its blocks (`Block`s, or (rows, L, R) tuples), sorted by rows."""
    ordered = sorted((Block(*part) for part in parts), key=lambda block: block.rows)
    for (start, stop), L, _, magnitude in ordered:
        if L.shape[0] != stop - start or (magnitude is not None and magnitude.shape[0] != stop - start):
            raise ValueError(f"a row block [{start}, {stop}) needs {stop - start} rows of L and magnitude, got "
                             f"{L.shape[0]}" + ("" if magnitude is None else f" and {magnitude.shape[0]}"))
    return RowBlockUpdate(tuple(b.rows for b in ordered), tuple((b.L, b.R) for b in ordered),
                          tuple(b.magnitude for b in ordered))


@dataclass
class ScaleUpdate(Update):
    """IA3: W' = W ⊙ l, `vector` l scaling the rows of the 2-D view (rows,) or, with `columns`, its columns (cols,)."""

    vector: Tensor
    columns: bool = False

    def group_key(self) -> Hashable:
        return type(self), self.columns

    @classmethod
    def stack(cls, updates: Sequence[ScaleUpdate]) -> tuple[Tensor, bool]:
        return torch.stack([u.vector for u in updates]), updates[0].columns

    @classmethod
    def apply(cls, W: Tensor, stacked: tuple[Tensor, bool], first: int, last: int) -> None:
        vector, columns = stacked
        W.mul_(vector.unsqueeze(1) if columns else vector[:, first:last].unsqueeze(2))


class Buffers:
    """One worker's scratch tensors by role, reused from tile to tile (a fresh large allocation faults in every
    page again)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device], Tensor] = {}
        self._views: dict[tuple, Tensor] = {}

    def take(self, role: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
        """An uninitialised tensor of `shape` and `dtype` in the buffer of `role` (valid until the next take)."""
        key = (role, tuple(shape), dtype, str(device))
        view = self._views.get(key)
        if view is not None:
            return view
        device = torch.device(device)
        nbytes = math.prod(shape) * dtype.itemsize
        buffer = self._buffers.get((role, device))
        if buffer is None or buffer.numel() < nbytes:
            buffer = self._buffers[(role, device)] = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self._views = {k: v for k, v in self._views.items() if k[0] != role or k[3] != str(device)}
        view = self._views[key] = buffer[:nbytes].view(dtype).view(tuple(shape))
        return view


def merge_weights(updates: dict[str, Update], bases: dict[str, Tensor], dtype: torch.dtype, device: torch.device,
                  buffers: Buffers, tile_elems: int | None) -> Iterator[tuple[str, int, Tensor]]:
    """(key, first row, merged rows in the stored layout, `dtype`, CPU): per group of same-kind updates of
    same-shape weights, one `apply` per tile of about `tile_elems` elements (None, or an untiled kind: all rows).

    The results live in `buffers`: consume each before asking for the next.
    """
    for keys in group_by({k: u.group_key() for k, u in updates.items()}).values():
        kind = type(updates[keys[0]])
        shape = bases[keys[0]].shape
        rows, cols = shape[0], math.prod(shape[1:])
        stacked = kind.stack([updates[k] for k in keys])
        tiled = tile_elems is not None and updates[keys[0]].tiled
        step = max(1, tile_elems // (len(keys) * cols)) if tiled else rows
        for first in range(0, rows, step):
            last = min(rows, first + step)
            W = buffers.take("merge", (len(keys), last - first, cols), torch.float32, device)
            for j, key in enumerate(keys):
                W[j].copy_(bases[key][first:last].reshape(last - first, cols))
            kind.apply(W, stacked, first, last)
            check_range(keys, W, dtype)
            cast = W if dtype == torch.float32 else buffers.take("cast", W.shape, dtype, device).copy_(W)
            if cast.device.type != "cpu":
                cast = buffers.take("host", cast.shape, dtype).copy_(cast)
            for j, key in enumerate(keys):
                yield key, first, cast[j].view(last - first, *shape[1:])


def changed_value(key: str, stored: Tensor, terms: Sequence[tuple[float, Tensor]] | None,
                  bias: Tensor | None) -> Tensor | None:
    """The tensor after full-tensor terms and a LoRA bias sum, float32: W + Σ w·(T − W) (T for one term of
    weight 1) plus b; None when neither is given (the tensor stays as stored)."""
    if not terms and bias is None:
        return None
    if terms and len(terms) == 1 and terms[0][0] == 1.0:
        value = terms[0][1].float()
    else:
        value = stored.float()
        for weight, tensor in terms or ():
            value = value + weight * (tensor.float() - stored.float())
    return value if bias is None else value + bias.to(value.device)
