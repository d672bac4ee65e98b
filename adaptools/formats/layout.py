"""Tensor layouts that every consumer reads alike: one rank for every module, scale 1 (DESIGN §13).

`portable` (the default for PEFT outputs): every module zero-padded to one tensor rank R, written with
`r = lora_alpha = R` and no patterns, so llama.cpp (alpha / tensor rank), TGI/LoRAX/vLLM ≤ 0.31 (lora_alpha / r),
vLLM ≥ 0.32 and PEFT (patterns), diffusers and mlx-lm (one rank, one scale) all compute scale 1.
`compact`: each module at its own rank, with rank_pattern/alpha_pattern (read right by PEFT and vLLM ≥ 0.32 only).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch

from ..adapter import Adapter, LoraModule
from ..bounds import PADDING_FLOOR, PADDING_GROWTH
from ..errors import InvalidArgumentError

Layout = Literal["portable", "compact"]
LAYOUTS: tuple[str, ...] = get_args(Layout)

SERVING_RANKS: dict[str, tuple[int, ...]] = {"vllm": (1, 8, 16, 32, 64, 128, 256, 320, 512)}
"""Ranks each server accepts for its largest adapter rank (vLLM: the choices of `--max-lora-rank`)."""
SERVING_FLAGS: dict[str, str] = {"vllm": "--max-lora-rank"}
"""The server option that takes that rank."""

NOTABLE_PADDING = 0.05
"""Padding that costs more than this fraction of the parameters is worth telling the user about."""


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


def check_rank(adapter: Adapter, rank: int, limit: str) -> None:
    """InvalidArgumentError naming the largest module when a module's rank is above `rank` (`limit` says whose rank)."""
    top = max(adapter.ranks.values(), default=0)
    if top > rank:
        worst = max(adapter.ranks, key=adapter.ranks.get)
        raise InvalidArgumentError(
            f"module {worst!r} has rank {top}, above {limit} {rank}: bring it down with `adaptools rerank --rank {rank}` first"
        )


class PaddingTooLarge(InvalidArgumentError):
    """Padding every module to one rank would grow the adapter beyond adaptools.bounds.PADDING_GROWTH."""


def growth_refusal(adapter: Adapter, rank: int | None, requested: bool = False) -> str | None:
    """Why padding to `rank` (None: the largest) would grow the adapter too much (more than PADDING_GROWTH times its
    parameters and by PADDING_FLOOR bytes or more; a requested rank up to the largest a server serves, 512, is always
    allowed), from shapes alone; None when it would not."""
    cost = padding_cost(adapter, rank)
    grown = (cost.params_before + cost.params_added) / max(1, cost.params_before)
    small = grown <= PADDING_GROWTH or cost.bytes_added < PADDING_FLOOR
    if small or (requested and cost.rank <= max(SERVING_RANKS["vllm"])):
        return None
    worst = max(adapter.ranks, key=adapter.ranks.get)
    return (f"padding every module to rank {cost.rank:,}{'' if requested else f' (the rank of {worst!r})'} would grow "
            f"the adapter from {cost.params_before:,} to {cost.params_before + cost.params_added:,} parameters "
            f"({grown:,.1f}x, more than {PADDING_GROWTH:g}x; +{cost.bytes_added / 1e6:,.0f} MB)")


def uniform_rank(adapter: Adapter, rank: int | None = None) -> Adapter:
    """`adapter` with every module at one tensor rank R (default: the largest) and scale 1; ΔW unchanged.

    InvalidArgumentError when `rank` is below a module's rank (rerank it first); PaddingTooLarge, before anything is
    allocated, when the padding would grow the adapter more than adaptools.bounds.PADDING_GROWTH times.
    """
    if rank is not None and rank < 1:
        raise InvalidArgumentError(f"the rank to pad to must be at least 1, got {rank}")
    target = max(adapter.ranks.values(), default=0) if rank is None else rank
    check_rank(adapter, target, "the requested rank")
    refusal = growth_refusal(adapter, target, rank is not None)
    if refusal:
        raise PaddingTooLarge(refusal)
    return adapter.with_modules({name: pad_module(m, target) for name, m in adapter.items()})


def serving_rank(adapter: Adapter, server: str) -> int:
    """The smallest rank `server` accepts that is ≥ every module's rank (vLLM: 1, 8, 16, ..., 512)."""
    if server not in SERVING_RANKS:
        raise InvalidArgumentError(f"unknown server {server!r} (choose {', '.join(SERVING_RANKS)})")
    allowed = SERVING_RANKS[server]
    check_rank(adapter, allowed[-1], f"the largest rank {server} serves,")
    top = max(adapter.ranks.values(), default=1)
    return next(r for r in allowed if r >= top)


LAYOUT_FORMATS = ("peft",)
"""Formats written in either layout."""
ONE_RANK_FORMATS = ("mlx", "diffusers")
"""Formats that always hold one rank for every module (mlx-lm: one `rank` and `scale`; diffusers: alpha = rank)."""


def written_layout(adapter: Adapter, format: str, layout: str = "portable", pad_rank: int | None = None) -> Adapter:
    """The adapter as it is written in `format`. PEFT: `portable` pads every module to one rank (`pad_rank`, default
    the largest) at scale 1; `compact` keeps each module's rank (the writer adds rank/alpha patterns). mlx and
    diffusers: always one rank (`pad_rank` or the largest). kohya (one alpha per module) is written as it is, and
    asking it for a layout is an error."""
    if layout not in LAYOUTS:
        raise InvalidArgumentError(f"unknown layout {layout!r} (choose {' or '.join(LAYOUTS)})")
    if format in ONE_RANK_FORMATS:
        if layout == "compact":
            raise InvalidArgumentError(f"{format} files hold one rank for every module: --layout compact applies to "
                                       "PEFT outputs only")
        return uniform_rank(adapter, pad_rank)
    if format not in LAYOUT_FORMATS:
        if layout != "portable" or pad_rank is not None:
            raise InvalidArgumentError(
                f"{format} files keep each module's rank and alpha, which every consumer reads alike: "
                "--layout compact and --pad-rank/--serve apply to PEFT, mlx and diffusers outputs only"
            )
        return adapter
    if layout == "compact":
        if pad_rank is not None:
            raise InvalidArgumentError("padding to one rank is the portable layout: drop --layout compact or --pad-rank/--serve")
        return adapter
    try:
        return uniform_rank(adapter, pad_rank)
    except PaddingTooLarge as exc:
        if pad_rank is not None:
            raise
        warnings.warn(f"{exc}: writing the compact layout instead (per-module ranks with rank_pattern/alpha_pattern, "
                      "read right by PEFT and vLLM >= 0.32)", stacklevel=3)
        return adapter


@dataclass(frozen=True)
class PaddingCost:
    """What padding every module to `rank` adds: stored parameters and bytes, against the unpadded adapter."""

    rank: int
    params_before: int
    params_added: int
    bytes_added: int

    @property
    def fraction(self) -> float:
        """Added parameters over the unpadded ones."""
        return self.params_added / self.params_before if self.params_before else 0.0

    @property
    def notable(self) -> bool:
        """True when the padding costs more than NOTABLE_PADDING of the parameters."""
        return self.fraction > NOTABLE_PADDING

    def __str__(self) -> str:
        return (f"padded to rank {self.rank}: +{self.params_added:,} parameters, +{self.bytes_added / 1e6:.2f} MB "
                f"(+{100 * self.fraction:.0f}%)")


def padding_cost(adapter: Adapter, rank: int | None = None) -> PaddingCost:
    """Cost of uniform_rank(adapter, rank): (R − r_m)·(in_m + out_m) parameters per module, at its dtype's size."""
    target = max(adapter.ranks.values(), default=0) if rank is None else rank
    added = {name: (target - m.rank) * (m.in_features + m.out_features) for name, m in adapter.items()}
    return PaddingCost(
        rank=target,
        params_before=adapter.num_params,
        params_added=sum(added.values()),
        bytes_added=sum(n * adapter[name].A.element_size() for name, n in added.items()),
    )


def target_rank(adapter: Adapter, pad_rank: int | None = None, serve: str | None = None) -> int | None:
    """The rank to pad to: `pad_rank`, else the smallest rank `serve` accepts (None: the adapter's largest).

    With both, `pad_rank` must be one of the server's ranks.
    """
    if serve is None:
        return pad_rank
    rank = serving_rank(adapter, serve)
    if pad_rank is None:
        return rank
    if pad_rank not in SERVING_RANKS[serve]:
        raise InvalidArgumentError(
            f"{serve} serves adapters of rank {', '.join(map(str, SERVING_RANKS[serve]))}: --pad-rank {pad_rank} is none of them"
        )
    return pad_rank
