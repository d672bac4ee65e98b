"""LyCORIS files (kohya names, `ss_network_module: lycoris.kohya`): LoHa, LoKr and LoCon with Tucker cores, read into
exact LoRA factors (DESIGN §11), with LyCORIS's own scales (lycoris-lora 4.x modules/loha.py, lokr.py, locon.py).

Also the tensor math of PEFT's own LOHA and LOKR types (formats/peft_lycoris.py), which store the same factors.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..adapter import Adapter, LoraModule
from ..bounds import check_expansion, exact_fits, expanded_numbers, stored_numbers
from ..errors import AdapterFormatError, ShapeMismatchError, UnsupportedAdapterError
from ..linalg import group_by, map_by_shape
from ..lycoris_math import dense_factors, face_split, kron, kron_factors, svd_factors, tucker_down
from .kohya import ROLES as KOHYA_ROLES
from .folders import group_by_role
from .kohya import contract_tucker, kohya_module, row_magnitude
from .tensors import check_stored, read_tensor_file, safetensors_header

NAME = "lycoris"

LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
ROLES = {**KOHYA_ROLES, **{f".{role}": role for role in (*LOHA_ROLES, *LOKR_ROLES)}}
OTHER_ALGOS = {
    ".oft_blocks": "OFT/BOFT (an orthogonal rotation of the weight)",
    ".oft_diag": "Diag-OFT (an orthogonal rotation of the weight)",
    ".diff": "full (a dense ΔW)",
    ".diff_b": "full (a dense ΔW)",
    ".on_input": "(IA)³ (a learned scaling vector)",
    ".a1.weight": "GLoRA",
    ".w_norm": "norm (trained normalisation weights)",
    ".lokr_t1": "LoKr with a Tucker core on its first factor",
}
"""Keys of LyCORIS algorithms that are not a low-rank weight update, with the name the error gives."""


def detect(path: Path) -> bool:
    """A safetensors file with LoHa/LoKr/Tucker keys, or LyCORIS in its `ss_network_module` metadata (header only)."""
    header = safetensors_header(Path(path))
    if header is None:
        return False
    keys, metadata = header
    lycoris_keys = tuple(f".{role}" for role in (*LOHA_ROLES, *LOKR_ROLES)) + (".lora_mid.weight", *OTHER_ALGOS)
    return metadata.get("ss_network_module", "").startswith("lycoris") or any(k.endswith(lycoris_keys) for k in keys)


def read(path: Path, *, allow_pickle: bool = False, scale: float | None = None, alpha: float | None = None) -> Adapter:
    """Read a LyCORIS file; module names stay kohya names until `remap_to_base` maps them to module paths."""
    tensors, metadata = read_tensor_file(path, allow_pickle=allow_pickle)
    grouped = group_modules(path, tensors)
    contract_tucker(grouped)
    kinds = {name: module_algo(name, parts) for name, parts in grouped.items()}
    modules = {name: kohya_module(name, parts) for name, parts in grouped.items() if kinds[name] == "locon"}
    modules.update(loha_modules({n: p for n, p in grouped.items() if kinds[n] == "loha"}, lycoris_scale))
    modules.update(lokr_modules({n: p for n, p in grouped.items() if kinds[n] == "lokr"}, lycoris_scale))
    adapter = Adapter(
        modules={name: modules[name] for name in grouped},
        base_model=metadata.get("ss_sd_model_name") or metadata.get("base_model"),
        config={"metadata": metadata, "algorithms": kinds},
        source_format=NAME,
        name=Path(path).stem,
    )
    adapter.check_finite()
    return adapter


def group_modules(path: str | os.PathLike, tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{module name: {role: tensor}}; keys of other LyCORIS algorithms or of no LyCORIS role raise with what they are."""
    for key in tensors:
        for suffix, what in OTHER_ALGOS.items():
            if key.endswith(suffix):
                raise UnsupportedAdapterError(
                    f"{str(path)!r}: {key!r} belongs to a LyCORIS {what} module, which is not a low-rank weight update; "
                    "adaptools reads LoCon, LoHa and LoKr"
                )
    return group_by_role(path, dict(tensors), ROLES, "a LyCORIS file")


def module_algo(name: str, parts: Mapping[str, Tensor]) -> str:
    """"loha", "lokr" or "locon" (lora_down/lora_up) from the roles present; a mixture raises."""
    found = {"loha" if r in LOHA_ROLES else "lokr" if r in LOKR_ROLES else "locon"
             for r in parts if r not in ("alpha", "dora_scale")}
    if len(found) != 1:
        raise AdapterFormatError(f"module {name!r} holds {' and '.join(sorted(found)) or 'no'} tensors")
    return found.pop()


def require(name: str, parts: Mapping[str, Tensor], *roles: str) -> list[Tensor]:
    """The tensors of `roles` in float32, or an error naming a missing, empty or non-floating one."""
    missing = [r for r in roles if r not in parts]
    if missing:
        raise AdapterFormatError(f"module {name!r} lacks {', '.join(missing)}")
    for role in roles:
        check_stored(name, role, parts[role])
    return [parts[r].float() for r in roles]


def stored_alpha(name: str, parts: Mapping[str, Tensor], rank: int) -> float:
    """The module's alpha; missing or 0 means alpha = rank (LyCORIS's rule)."""
    alpha = parts.get("alpha")
    if alpha is not None and alpha.numel() != 1:
        raise ShapeMismatchError(f"module {name!r}: alpha must be one number, got shape {tuple(alpha.shape)}")
    value = 0.0 if alpha is None else float(alpha.item())
    return value or float(rank)


def lycoris_scale(name: str, parts: Mapping[str, Tensor], rank: int | None) -> float:
    """LyCORIS's scale alpha / rank (the stored alpha already holds rs_LoRA's √r); rank None (a LoKr with both
    factors full, where LyCORIS forces alpha = r) means 1."""
    return 1.0 if rank is None else stored_alpha(name, parts, rank) / rank


ScaleRule = Callable[[str, Mapping[str, Tensor], "int | None"], float]
"""(module name, its tensors, the rank that divides alpha, None when no factor is decomposed) → the module's scale."""


@dataclass
class Halves:
    """A LoHa module's checked tensors (4, or 6 with Tucker cores), layer kind and kernel, and the rank alpha divides."""

    parts: tuple[Tensor, ...]
    kind: str
    kernel: tuple[int, ...]
    rank: int | None
    shape: tuple[int, int]
    exact_rank: int

    @property
    def numbers(self) -> int:
        """What expanding this module allocates (adaptools.bounds)."""
        return expanded_numbers(self.exact_rank, *self.shape)


def lora_module(name: str, B: Tensor, A: Tensor, halves: Halves | KronHalves, parts: Mapping[str, Tensor],
                scale: float) -> LoraModule:
    """The LoraModule of exact factors B (out, R), A (R, in·prod(kernel)), with its DoRA magnitude if any."""
    return LoraModule(A=A.contiguous(), B=B.contiguous(), scale=scale, kind=halves.kind, kernel=halves.kernel,
                      magnitude=row_magnitude(name, parts.get("dora_scale"), B.shape[0]))


def loha_halves(name: str, parts: Mapping[str, Tensor]) -> Halves:
    """LoHa's two LoRA halves (w1a (out, r), w1b (r, in·k), w2a, w2b), or with Tucker cores the six tensors
    (t1, w1a (r, out), w1b (r, in), t2, w2a, w2b) that the batched step contracts."""
    if "hada_t1" in parts or "hada_t2" in parts:
        t1, w1a, w1b, t2, w2a, w2b = require(name, parts, "hada_t1", "hada_w1_a", "hada_w1_b",
                                             "hada_t2", "hada_w2_a", "hada_w2_b")
        if (t1.ndim < 3 or t1.shape != t2.shape or w1a.ndim != 2 or w1b.ndim != 2 or w1a.shape[0] != t1.shape[0]
                or w1b.shape[0] != t1.shape[1] or w2a.shape != w1a.shape or w2b.shape != w1b.shape):
            raise ShapeMismatchError(f"LoHa module {name!r}: its Tucker tensors do not fit together")
        kernel = tuple(t1.shape[2:])
        return Halves((t1, w1a, w1b, t2, w2a, w2b), "conv", kernel, w1b.shape[0],
                      (w1a.shape[1], w1b.shape[1] * math.prod(kernel)), t1.shape[0] * t2.shape[0])
    w1a, w1b, w2a, w2b = require(name, parts, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    kernel = tuple(w1b.shape[2:])
    w1b, w2b = w1b.reshape(w1b.shape[0], -1), w2b.reshape(w2b.shape[0], -1)
    if (w1a.ndim != 2 or w2a.ndim != 2 or w1a.shape[1] != w1b.shape[0] or w2a.shape[1] != w2b.shape[0]
            or w1a.shape[0] != w2a.shape[0] or w1b.shape[1] != w2b.shape[1]):
        raise ShapeMismatchError(
            f"LoHa module {name!r}: hada_w1_a {tuple(w1a.shape)}, hada_w1_b {tuple(w1b.shape)}, hada_w2_a "
            f"{tuple(w2a.shape)} and hada_w2_b {tuple(w2b.shape)} do not form two products of one shape"
        )
    return Halves((w1a, w1b, w2a, w2b), "conv" if kernel else "linear", kernel, w1b.shape[0],
                  (w1a.shape[0], w1b.shape[1]), w1a.shape[1] * w2a.shape[1])


def loha_tucker_factors(t1: Tensor, w1a: Tensor, w1b: Tensor, t2: Tensor, w2a: Tensor, w2b: Tensor) -> tuple[Tensor, Tensor]:
    """Batched LoHa with Tucker cores: each half is w·aᵀ · (t ×₂ w·b), then face-split."""
    return face_split(w1a.mT, tucker_down(t1, w1b), w2a.mT, tucker_down(t2, w2b))


def loha_dense(w1a: Tensor, w1b: Tensor, w2a: Tensor, w2b: Tensor) -> tuple[Tensor, Tensor]:
    """Batched LoHa as dense_factors((w1a·w1b) ⊙ (w2a·w2b)) (where r1·r2 > min(out, in))."""
    return dense_factors((w1a @ w1b) * (w2a @ w2b))


def loha_tucker_dense(t1: Tensor, w1a: Tensor, w1b: Tensor, t2: Tensor, w2a: Tensor,
                      w2b: Tensor) -> tuple[Tensor, Tensor]:
    """Batched LoHa with Tucker cores as dense factors of the product of its two halves."""
    return dense_factors((w1a.mT @ tucker_down(t1, w1b)) * (w2a.mT @ tucker_down(t2, w2b)))


def loha_modules(grouped: Mapping[str, Mapping[str, Tensor]], scale: ScaleRule) -> dict[str, LoraModule]:
    """LoHa modules ΔW = scale·(w1a·w1b) ⊙ (w2a·w2b) as exact factors of rank r1·r2 where r1·r2 ≤ min(out, in), else
    dense (adaptools.bounds); one batched call per shape, after the whole file's cost is checked."""
    halves = {name: loha_halves(name, parts) for name, parts in grouped.items()}
    check_expansion({n: h.numbers for n, h in halves.items()}, stored_numbers(grouped), "LoHa")
    factors: dict[str, tuple[Tensor, ...]] = {}
    for size, exact, dense in ((4, face_split, loha_dense), (6, loha_tucker_factors, loha_tucker_dense)):
        chosen = {n: h for n, h in halves.items() if len(h.parts) == size}
        factors.update(map_by_shape({n: h.parts for n, h in chosen.items() if exact_fits(h.exact_rank, *h.shape)},
                                    exact))
        factors.update(map_by_shape({n: h.parts for n, h in chosen.items()
                                     if not exact_fits(h.exact_rank, *h.shape)}, dense))
    return {name: lora_module(name, *factors[name], h, grouped[name], scale(name, grouped[name], h.rank))
            for name, h in halves.items()}


@dataclass
class KronHalves:
    """A LoKr module's two factors, each one full matrix (W,) or a product (U, V); w2 may be a Tucker triple
    (t2, w2a, w2b), contracted by `tucker_pair` once the cost is checked."""

    w1: tuple[Tensor, ...]
    w2: tuple[Tensor, ...]
    kind: str
    kernel: tuple[int, ...]
    rank: int | None

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of ΔW = kron(W1, W2)."""
        (a, c), (b, d) = factor_shape(self.w1), factor_shape(self.w2)
        return a * b, c * d

    @property
    def exact_rank(self) -> int:
        """k1·k2, with a full factor counted at min of its shape (its SVD rank is at most that)."""
        return factor_rank(self.w1) * factor_rank(self.w2)

    @property
    def numbers(self) -> int:
        """What expanding this module allocates (adaptools.bounds)."""
        return expanded_numbers(self.exact_rank, *self.shape)


def factor_shape(pair: tuple[Tensor, ...]) -> tuple[int, int]:
    """(rows, columns) of a LoKr factor: W, U·V, or the Tucker triple (t2, w2a, w2b)."""
    if len(pair) == 3:
        t2, w2a, w2b = pair
        return w2a.shape[1], w2b.shape[1] * math.prod(t2.shape[2:])
    return pair[0].shape[0], pair[-1].shape[1]


def factor_rank(pair: tuple[Tensor, ...]) -> int:
    """The most a LoKr factor's rank can be."""
    if len(pair) == 3:
        return pair[0].shape[0]
    return min(pair[0].shape) if len(pair) == 1 else pair[0].shape[1]


def tucker_pair(pair: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """A LoKr factor as (W,) or (U, V): a Tucker triple (t2, w2a, w2b) becomes (w2aᵀ, t2 ×₂ w2b)."""
    if len(pair) == 3:
        t2, w2a, w2b = pair
        return w2a.mT, tucker_down(t2, w2b)
    return pair


def full_matrix(pair: tuple[Tensor, ...]) -> Tensor:
    """A LoKr factor as one matrix."""
    pair = tucker_pair(pair)
    return pair[0] if len(pair) == 1 else pair[0] @ pair[1]


def lokr_dense(W1: Tensor, W2: Tensor) -> tuple[Tensor, Tensor]:
    """Batched LoKr as dense_factors(kron(W1, W2)) (where k1·k2 > min(out, in))."""
    return dense_factors(kron(W1, W2))


def lokr_halves(name: str, parts: Mapping[str, Tensor]) -> KronHalves:
    """LoKr's factors (W1 or (w1a, w1b), W2 or (w2a, w2b) or (t2, w2a, w2b)) and the rank its alpha divides."""
    if "lokr_w1" in parts:
        w1: tuple[Tensor, ...] = tuple(require(name, parts, "lokr_w1"))
    else:
        w1 = tuple(require(name, parts, "lokr_w1_a", "lokr_w1_b"))
    if "lokr_w2" in parts:
        (full,) = require(name, parts, "lokr_w2")
        kernel = tuple(full.shape[2:])
        w2: tuple[Tensor, ...] = (full.reshape(full.shape[0], -1),)
    elif "lokr_t2" in parts:
        t2, w2a, w2b = require(name, parts, "lokr_t2", "lokr_w2_a", "lokr_w2_b")
        if t2.ndim < 3 or w2a.ndim != 2 or w2b.ndim != 2 or w2a.shape[0] != t2.shape[0] or w2b.shape[0] != t2.shape[1]:
            raise ShapeMismatchError(f"LoKr module {name!r}: lokr_t2, lokr_w2_a and lokr_w2_b do not fit together")
        kernel = tuple(t2.shape[2:])
        w2 = (t2, w2a, w2b)
    else:
        w2a, w2b = require(name, parts, "lokr_w2_a", "lokr_w2_b")
        kernel = tuple(w2b.shape[2:])
        w2 = (w2a, w2b.reshape(w2b.shape[0], -1))
    for pair, label in ((w1, "lokr_w1"), (w2, "lokr_w2")):
        bad = any(t.ndim != 2 for t in pair) or (len(pair) == 2 and pair[0].shape[1] != pair[1].shape[0])
        if len(pair) != 3 and bad:
            raise ShapeMismatchError(f"LoKr module {name!r}: the factors of {label} do not form a product")
    # LyCORIS divides alpha by the rank of the decomposed factor: w1's when it is decomposed, else w2's.
    rank = factor_rank(w1) if len(w1) > 1 else (factor_rank(w2) if len(w2) > 1 else None)
    return KronHalves(w1, w2, "conv" if kernel else "linear", kernel, rank)


def lokr_modules(grouped: Mapping[str, Mapping[str, Tensor]], scale: ScaleRule) -> dict[str, LoraModule]:
    """LoKr modules ΔW = scale·kron(W1, W2) as kron(U1, U2)·kron(V1, V2), rank k1·k2, exact: full factors through one
    batched SVD per shape (they are small), then one batched Kronecker product per shape."""
    halves = {name: lokr_halves(name, parts) for name, parts in grouped.items()}
    check_expansion({n: h.numbers for n, h in halves.items()}, stored_numbers(grouped), "LoKr")
    dense = {n for n, h in halves.items() if not exact_fits(h.exact_rank, *h.shape)}
    factors = map_by_shape({n: (full_matrix(halves[n].w1), full_matrix(halves[n].w2)) for n in dense}, lokr_dense)
    pairs = {(name, side): tucker_pair(pair) for name, h in halves.items() if name not in dense
             for side, pair in (("w1", h.w1), ("w2", h.w2))}
    fulls = {key: pair[0] for key, pair in pairs.items() if len(pair) == 1}
    exact: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
    for keys in group_by({key: tuple(W.shape) for key, W in fulls.items()}).values():
        exact.update(zip(keys, svd_factors(torch.stack([fulls[key] for key in keys]))))
    quads = {name: (*exact.get((name, "w1"), pairs[name, "w1"]), *exact.get((name, "w2"), pairs[name, "w2"]))
             for name in halves if name not in dense}
    factors.update(map_by_shape(quads, kron_factors))
    return {name: lora_module(name, *factors[name], h, grouped[name], scale(name, grouped[name], h.rank))
            for name, h in halves.items()}
