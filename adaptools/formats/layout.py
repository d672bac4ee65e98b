"""Tensor layouts that every consumer reads alike: one rank for every module, scale 1 (DESIGN §13)."""
from __future__ import annotations

from dataclasses import replace

import torch

from ..adapter import Adapter, LoraModule
from ..errors import InvalidArgumentError


def pad_module(module: LoraModule, rank: int) -> LoraModule:
    """The same ΔW at tensor rank `rank` and scale 1: B' = [s·B | 0], A' = [A ; 0] (zero rows and columns change nothing)."""
    extra = rank - module.rank
    if extra < 0:
        raise InvalidArgumentError(f"cannot pad a rank-{module.rank} module to rank {rank}")
    B = module.B * module.scale
    A = module.A
    if extra:
        B = torch.cat([B, B.new_zeros(B.shape[0], extra)], dim=1)
        A = torch.cat([A, A.new_zeros(extra, A.shape[1])], dim=0)
    bias = None if module.bias is None else module.bias * module.scale
    return replace(module, A=A, B=B, scale=1.0, bias=bias)


def uniform_rank(adapter: Adapter, rank: int | None = None) -> Adapter:
    """`adapter` with every module at one tensor rank R (default: the largest) and scale 1; ΔW unchanged.

    InvalidArgumentError when `rank` is below a module's rank (rerank it first).
    """
    top = max(adapter.ranks.values(), default=0)
    target = top if rank is None else rank
    if target < top:
        worst = max(adapter.ranks, key=adapter.ranks.get)
        raise InvalidArgumentError(
            f"module {worst!r} has rank {top}, above the requested rank {target}: bring it down with `adaptools rerank --rank {target}` first"
        )
    return adapter.with_modules({name: pad_module(m, target) for name, m in adapter.items()})
