"""What the quantizing codecs (NF4, FP8) share: which weights of a base they quantize, and how much of a merge's
change a requantized weight keeps.

Which weights: every 2-D floating `X.weight` except the modules a skip pattern matches. The default patterns keep
embeddings and the LM head unquantized (norms are 1-D). A pattern follows transformers' `llm_int8_skip_modules`
rule: it matches module name M when `re.match(pattern, M)` ends at a module boundary ("layers.1" matches
"layers.1.mlp", not "layers.11.mlp"; "layers\\.1.*\\.mlp" is a regex) or when M ends with it ("down_proj").
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import BaseMismatchError, InvalidArgumentError
from ..names import listed
from .safetensors_io import DTYPE_NAMES
from .stored import TensorSpec

DEFAULT_SKIP = ("lm_head", r".*embed[^.]*", "wte", "wpe")
"""Modules left unquantized by default: the LM head and embeddings (embed_tokens, embed_in/out, word_embeddings,
GPT-2's wte/wpe). Norms and biases are 1-D and never quantized."""
QUANTIZABLE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
"""Dtypes of the weights the quantizers take (bitsandbytes' quant state and compressed-tensors' scales name one)."""
_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"
RETAINED_CHUNK = 2**16
"""Elements per pass of retained_fraction (its float32 temporaries stay in the cache)."""


def skipped(module: str, patterns: Sequence[str]) -> bool:
    """transformers' `llm_int8_skip_modules` rule: a pattern matching from the start up to a module boundary
    (as a regex), or a suffix of the module name."""
    return any(re.match(rf"(?:{p}){_BOUNDARY}", module) or module.endswith(p) for p in patterns)


def _check_patterns(patterns: Sequence[str]) -> None:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise InvalidArgumentError(f"skip pattern {pattern!r} is not a valid regular expression ({exc})") from None


def chosen_weights(specs: dict[str, TensorSpec], skip: Sequence[str], target: str) -> list[str]:
    """The keys of the base's weights to quantize to `target` ("NF4", "FP8"): 2-D floating `*.weight` tensors whose
    module no pattern of DEFAULT_SKIP + `skip` matches. A `skip` pattern that matches none of these weights'
    modules is an error, and so is a chosen weight in a dtype the quantizers do not take."""
    _check_patterns(skip)
    linear = [k for k, s in specs.items() if k.endswith(".weight") and len(s.shape) == 2 and s.dtype.is_floating_point]
    modules = [k.removesuffix(".weight") for k in linear]
    unused = [p for p in skip if not any(skipped(m, [p]) for m in modules)]
    if unused:
        raise InvalidArgumentError(
            f"skip pattern(s) {', '.join(map(repr, unused))} match no 2-D weight of the base (a pattern is a regex "
            "matched from the start of a module name up to a '.', or a suffix of it, e.g. 'down_proj')"
        )
    patterns = [*DEFAULT_SKIP, *skip]
    chosen = [k for k, m in zip(linear, modules) if not skipped(m, patterns)]
    refused = [f"{k} ({DTYPE_NAMES[specs[k].dtype]})" for k in chosen if specs[k].dtype not in QUANTIZABLE_DTYPES]
    if refused:
        raise BaseMismatchError(
            f"{len(refused)} weight(s) to quantize are stored in a dtype {target} cannot take (fp16, bf16 or fp32): "
            f"{listed(refused)}; leave them as stored with a skip pattern"
        )
    return chosen


def retained_sums(base: Tensor, after: Tensor, merged: Tensor) -> Tensor:
    """(⟨after − base, ΔW⟩, ‖ΔW‖²) in float64 with ΔW = merged − base: differences in float32, in cache-sized
    chunks."""
    base, after, merged = base.reshape(-1), after.reshape(-1), merged.reshape(-1)
    sums = []
    for start in range(0, base.numel(), RETAINED_CHUNK):
        part = slice(start, start + RETAINED_CHUNK)
        low = base[part].float()  # base itself when it is float32: not changed here (other outputs read it)
        delta = torch.sub(merged[part], low)
        sums.append(torch.stack((torch.vdot(torch.sub(after[part], low), delta), torch.vdot(delta, delta))))
    return torch.stack(sums).double().sum(dim=0) if sums else torch.zeros(2, dtype=torch.float64)


def retained_fraction(base: Tensor, after: Tensor, merged: Tensor) -> float | None:
    """⟨after − base, ΔW⟩ / ‖ΔW‖² with ΔW = merged − base: the part of the change that `after` (the stored
    result) keeps (1: all, 0: erased); None when ΔW = 0."""
    return ratio(retained_sums(base, after, merged))


def ratio(sums: Tensor) -> float | None:
    """kept / energy of `retained_sums` (None when ΔW = 0)."""
    kept, energy = sums.tolist()
    return None if energy == 0 else kept / energy
