"""LoRA ↔ DoRA with the base checkpoint, and the DoRA merge math (DESIGN §6, PEFT 0.21 semantics).

Canonical orientation throughout: W is (..., out, in) (embeddings and fan_in_fan_out weights transposed,
conv weights flattened, by `LoraModule.from_base_layout`), V = W + s·B·A, n = ‖V‖ per output row,
and the merged DoRA weight is W' = (m / n) ⊙ V (`adaptools.merge.kernels.dora_merge_rows`, the one implementation).
Leading dimensions are batches of same-shape modules.

Which base weight W enters n is chosen by `base_weights` (the row norms depend on it):
  "stored" (default)  the checkpoint's own weights; an NF4 checkpoint is dequantized with its own statistics
                      (what PEFT sees when the adapter runs on that checkpoint).
  "nf4" / "nf4-dq"    an unquantized base rounded through NF4 (blocksize 64, without / with double quant),
                      i.e. the weights of a QLoRA model loaded from it with bitsandbytes `load_in_4bit`;
                      use it for a DoRA trained or served on the 4-bit model when you hold the fp16 base.
                      An NF4 checkpoint is used as stored.
Norms are computed in float32 (float64 for float64 inputs); PEFT computes them in the base's dtype, so an
fp16 base agrees to fp16 rounding.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Literal, get_args

import torch
from torch import Tensor

from .adapter import Adapter, LoraModule
from .device import resolve_device
from .errors import BaseMismatchError, DoraError, InvalidArgumentError, NonFiniteError, UnknownModuleError
from .checkpoints import Container
from .checkpoints.names import target_rows, target_shape
from .formats.kohya import PREFIXES, remap_to_base
from .checkpoints.nf4_quant import dequantize_nf4, quantize_nf4
from .linalg import (
    AUTO_EXACT_MAX_DIM,
    SVD,
    LinearOperator,
    RankPolicy,
    SvdMethod,
    balanced_factors,
    choose_svd,
    exact_svd_dense,
    map_by_shape,
    randomized_svd,
    truncation_error,
)
from .merge.kernels import dora_merge_rows
from .checkpoints.stored import StoredDecoder
from .names import listed
from .report import ErrorSummary, ModuleFitError, relative
from .sources import open_base

__all__ = [
    "BaseWeights",
    "SvdMethod",
    "AUTO_EXACT_MAX_DIM",
    "row_norm_terms",
    "dora_row_norms",
    "dora_delta_operator",
    "delta_energy",
    "choose_svd",
    "ModuleFit",
    "LoraFitReport",
    "to_dora",
    "to_lora",
]

BaseWeights = Literal["stored", "nf4", "nf4-dq"]
CHUNK_BYTES = 512 * 2**20
"""Base weights (float32, canonical) held at once; shards are read in order, so memory stays near this."""
NF4_BLOCKSIZE = 64
RESIDUAL_BLOCK = 2**22
"""Elements of one column block of the stacked ΔW when the randomized path measures its residual."""


def _check_choice(value: str, choices: object, what: str) -> None:
    if value not in get_args(choices):
        raise InvalidArgumentError(f"unknown {what} {value!r} (choose from {', '.join(get_args(choices))})")


# --------------------------------------------------------------------------- pure math, batched


def _per_matrix(scale: float | Tensor, like: Tensor) -> Tensor:
    """scale as a (..., 1) tensor on `like`'s device and dtype (a float, or one value per stacked module)."""
    return torch.as_tensor(scale, dtype=like.dtype, device=like.device)[..., None]


def row_norm_terms(W: Tensor, B: Tensor, A: Tensor, scale: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per output row: (‖w_i‖², s·B_i·(A w_iᵀ), s²·‖B_i A‖²); ‖W + s·B·A‖²_row = t0 + 2·t1 + t2, one GEMM A·Wᵀ.

    W (..., out, in), B (..., out, r), A (..., r, in), scale a float or (...,). Returns three (..., out) tensors.
    """
    s = _per_matrix(scale, W)
    P = A @ W.mT                                             # (..., r, out)
    cross = s * (B * P.mT).sum(-1)
    low = s.square() * ((B @ (A @ A.mT)) * B).sum(-1)
    return W.square().sum(-1), cross, low


def _norms(terms: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    w2, cross, low = terms
    return (w2 + 2 * cross + low).clamp_min(0).sqrt()


def dora_row_norms(W: Tensor, B: Tensor, A: Tensor, scale: float | Tensor) -> Tensor:
    """n = ‖W + s·B·A‖ per output row (..., out), without forming W + s·B·A."""
    return _norms(row_norm_terms(W, B, A, scale))


def _gain(magnitude: Tensor, norms: Tensor) -> Tensor:
    """g = m / n, 0 on rows with n = 0 (there V is 0, so W' is 0 whatever g is)."""
    return torch.where(norms > 0, magnitude / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)


def dora_delta_operator(W: Tensor, B: Tensor, A: Tensor, scale: float | Tensor, gain: Tensor) -> LinearOperator:
    """ΔW = diag(g−1)·W + diag(g)·s·B·A as an implicit (batched) operator: products by W and by the factors only."""
    g = gain[..., None]
    gs = g * _per_matrix(scale, gain)[..., None]

    def matmul(X: Tensor) -> Tensor:
        return (g - 1) * (W @ X) + gs * (B @ (A @ X))

    def rmatmul(Y: Tensor) -> Tensor:
        return W.mT @ ((g - 1) * Y) + A.mT @ (B.mT @ (gs * Y))

    return LinearOperator(tuple(W.shape[-2:]), matmul, rmatmul, W.device, W.dtype, tuple(W.shape[:-2]))


def delta_energy(terms: tuple[Tensor, Tensor, Tensor], gain: Tensor) -> Tensor:
    """‖ΔW‖_F² (float64, (...,)) from the row-norm terms: Σ_i (g_i−1)²·t0 + 2(g_i−1)g_i·t1 + g_i²·t2."""
    w2, cross, low = (t.double() for t in terms)
    g = gain.double()
    return ((g - 1).square() * w2 + 2 * (g - 1) * g * cross + g.square() * low).sum(-1).clamp_min(0)


# --------------------------------------------------------------------------- reading the base


def _open_base(base: Container | str | os.PathLike | None, what: str) -> Container:
    if base is None:
        raise InvalidArgumentError(f"{what} needs the base checkpoint the adapter was trained on (base=...)")
    return open_base(base)


def _on_base(adapter: Adapter, base: Container) -> Adapter:
    """The adapter with kohya module names mapped to the base's module paths (PEFT paths are kept)."""
    if any(name.startswith(PREFIXES) and base.names.target(name) is None for name in adapter.modules):
        return remap_to_base(adapter, base.names.kohya_names())
    return adapter


def _check_modules(adapter: Adapter, names: Sequence[str], base: Container, base_weights: str) -> None:
    """UnknownModuleError for modules the base lacks, BaseMismatchError for other shapes (NF4 ones: when read);
    DoraError for LoRA biases (PEFT's DoRA has none); InvalidArgumentError for an unknown `base_weights`."""
    _check_choice(base_weights, BaseWeights, "base_weights")
    missing = [n for n in names if base.names.target(n) is None and f"{n}.weight" not in adapter.extra]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UnknownModuleError(f"{len(missing)} adapter module(s) have no weight in the base: {shown}")
    specs = base.decoder().specs(base)
    for name in names:
        key = f"{name}.weight"
        found = (adapter.extra[key].shape if key in adapter.extra
                 else target_shape(specs[(target := base.names.target(name)).key].shape, target))
        _check_shape(name, adapter[name], tuple(found))
        if adapter[name].bias is not None:
            raise DoraError(f"module {name!r} has a LoRA bias; PEFT's DoRA does not support lora_bias")


def _check_shape(name: str, module: LoraModule, found: tuple[int, ...]) -> None:
    if tuple(found) != module.weight_shape:
        raise BaseMismatchError(
            f"module {name!r}: the adapter needs a base weight of shape {module.weight_shape}, "
            f"the base has {tuple(found)}"
        )


def _base_weight(base: Container, key: str, base_weights: BaseWeights, decoder: StoredDecoder) -> Tensor:
    """The base weight `key` in its float layout: a quantized one decoded, an unquantized one as stored or rounded
    through NF4 when asked."""
    if decoder.specs(base)[key].encoded:
        return decoder.read(base, key)
    W = base.get(key)
    if base_weights == "stored":
        return W
    return dequantize_nf4(*quantize_nf4(W, NF4_BLOCKSIZE, double_quant=base_weights == "nf4-dq"))


def _weight_chunks(adapter: Adapter, names: Sequence[str], base: Container, base_weights: BaseWeights,
                   device: torch.device, dtype: torch.dtype,
                   max_bytes: int = CHUNK_BYTES) -> Iterator[dict[str, Tensor]]:
    """Canonical base weights {name: W (out, in)} on `device`, read shard by shard, about `max_bytes` at a time.

    A full weight stored in the adapter (`extra`, e.g. a saved embedding) replaces the base's, as in PEFT.
    """
    decoder = base.decoder()
    shard_rank = {shard: i for i, shard in enumerate(base.shards)}
    targets = {n: base.names.target(n) for n in names if f"{n}.weight" not in adapter.extra}
    order = sorted(names, key=lambda n: shard_rank.get(base.weight_map.get(targets[n].key) if n in targets else None, -1))
    chunk: dict[str, Tensor] = {}
    size = 0
    for name in order:
        key, module = f"{name}.weight", adapter[name]
        stored = (adapter.extra[key] if key in adapter.extra
                  else target_rows(_base_weight(base, targets[name].key, base_weights, decoder), targets[name]))
        _check_shape(name, module, tuple(stored.shape))
        chunk[name] = module.from_base_layout(stored).to(device, dtype)
        size += chunk[name].numel() * chunk[name].element_size()
        if size >= max_bytes:
            yield chunk
            chunk, size = {}, 0
    if chunk:
        yield chunk


def _work_dtype(adapter: Adapter) -> torch.dtype:
    return torch.float64 if any(m.dtype == torch.float64 for m in adapter.modules.values()) else torch.float32


def _factors(module: LoraModule, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(B, A, scale as a 0-d tensor) on `device` in `dtype`, ready to stack."""
    scale = torch.tensor(module.scale, dtype=dtype, device=device)
    return module.B.to(device, dtype), module.A.to(device, dtype), scale


# --------------------------------------------------------------------------- LoRA → DoRA


def to_dora(adapter: Adapter, base: Container | str | os.PathLike | None, *, base_weights: BaseWeights = "stored",
            device: str | torch.device = "auto") -> Adapter:
    """Exact LoRA → DoRA: keep A, B and set m = ‖W + s·B·A‖ per output row, so outputs are unchanged.

    Reads the base weight by weight (shard order); one batched GEMM A·Wᵀ per group of same-shape modules.
    Kohya module names are mapped to the base's paths. Magnitudes take the dtype of the module's factors.

    Raises:
        DoraError: the adapter is already DoRA, or has LoRA biases. UnknownModuleError / BaseMismatchError:
        the base lacks a module or holds another shape. InvalidArgumentError: no base, bad `base_weights`.
    """
    base = _open_base(base, "LoRA → DoRA")
    adapter = _on_base(adapter, base)
    if adapter.is_dora:
        dora = [n for n, m in adapter.items() if m.is_dora]
        raise DoraError(f"the adapter is already DoRA ({len(dora)} module(s) have magnitudes, e.g. {dora[0]!r})")
    names = list(adapter.modules)
    _check_modules(adapter, names, base, base_weights)
    dev, work = resolve_device(device), _work_dtype(adapter)
    modules = dict(adapter.modules)
    for chunk in _weight_chunks(adapter, names, base, base_weights, dev, work):
        items = {n: (W, *_factors(adapter[n], dev, work)) for n, W in chunk.items()}
        for name, (norms,) in map_by_shape(items, dora_row_norms).items():
            modules[name] = replace(adapter[name], magnitude=norms.to("cpu", adapter[name].dtype))
    result = adapter.with_modules(modules)
    result.check_finite("LoRA → DoRA")
    zero = [repr(n) for n, m in result.items() if not bool((m.magnitude > 0).all())]
    if zero:
        raise DoraError(f"module(s) {listed(zero)} have a row where W + s·B·A is zero: its DoRA magnitude would be 0, "
                        "and DoRA divides by that norm")
    return result


# --------------------------------------------------------------------------- DoRA → LoRA


@dataclass(frozen=True, kw_only=True)
class ModuleFit(ModuleFitError):
    """How a rank-`rank` LoRA fits one module's DoRA update ΔW = W' − W: ‖ΔW‖_F, ‖ΔW − ΔW_k‖_F, relative error;
    `method` is the SVD that ran ("exact" or "randomized")."""

    rank: int
    method: str


@dataclass
class LoraFitReport(ErrorSummary):
    """Per-module fit of a DoRA → LoRA conversion: retained energy Σ_{i<k} s_i²/‖ΔW‖², relative error ‖ΔW−ΔW_k‖/‖ΔW‖."""

    policy: str
    svd: str
    base_weights: str
    modules: dict[str, ModuleFit] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready data: settings, SVD methods that ran, overall and worst relative error, one entry per module."""
        return {
            "policy": self.policy,
            "svd": self.svd,
            "base_weights": self.base_weights,
            "methods": sorted({f.method for f in self.modules.values()}),
            "rel_error": self.rel_error,
            "worst_rel_error": self.worst_rel_error,
            "modules": {name: asdict(f) for name, f in self.modules.items()},
        }


def _pad(svd: SVD, width: int) -> SVD:
    """Zero-pad a rank-k SVD to `width` (zero singular values keep it valid and descending)."""
    extra = width - svd.S.shape[-1]
    pad = torch.nn.functional.pad
    return SVD(pad(svd.U, (0, extra)), pad(svd.S, (0, extra)), pad(svd.Vh, (0, 0, 0, extra)))


def _captured(S: Tensor, total: Tensor, tau: float) -> Tensor:
    """True where the leading values of S hold at least τ of the energy `total` (tail test, float64)."""
    return total - S.double().square().sum(-1) <= (1.0 - tau) * total


def _ranks(S: Tensor, total: Tensor, policy: RankPolicy) -> Tensor:
    """k per module (...,) in [1, width]: a fixed rank, or the smallest k with ‖ΔW‖² − Σ_{i<k} s_i² <= (1−τ)·‖ΔW‖²
    (float64; `total` = ‖ΔW‖² may exceed Σ s_i² when S is the leading part of the spectrum)."""
    if policy.kind == "rank":
        k = torch.full(S.shape[:-1], int(policy.value), dtype=torch.long, device=S.device)
    else:
        head = torch.nn.functional.pad(S.double().square().cumsum(-1), (1, 0))
        k = (total[..., None] - head > (1.0 - policy.value) * total[..., None]).sum(-1)
    return k.clamp(1, S.shape[-1])


def _residual_energy(W: Tensor, B: Tensor, A: Tensor, scale: Tensor, gain: Tensor, svd: SVD, k: Tensor) -> Tensor:
    """‖ΔW − U_k S_k Vh_k‖_F² per module (float64), summed over column blocks of ΔW = diag(g−1)·W + diag(g)·s·B·A.

    Summing the residual itself (not ‖ΔW‖² − Σ_{i<k} s_i², which cancels to ~sqrt(eps) relative) keeps small
    errors accurate; memory stays at one block.
    """
    U, S, Vh = svd
    keep = torch.arange(S.shape[-1], device=S.device) < k[..., None]
    US = U * torch.where(keep, S, 0.0)[..., None, :]
    g = gain[..., None]
    Bg = (g * _per_matrix(scale, gain)[..., None]) * B
    step = max(1, RESIDUAL_BLOCK // max(1, W[..., 0].numel()))
    energy = torch.zeros(W.shape[:-2], dtype=torch.float64, device=W.device)
    for j in range(0, W.shape[-1], step):
        cols = slice(j, j + step)
        R = (g - 1) * W[..., cols] + Bg @ A[..., cols] - US @ Vh[..., cols]
        energy += R.double().square().sum((-2, -1))
    return energy


def _fit_group(W: Tensor, B: Tensor, A: Tensor, scale: Tensor, magnitude: Tensor, *, policy: RankPolicy,
               method: str, oversample: int, power_iters: int, seed: int) -> tuple[Tensor, ...]:
    """Truncated SVD of ΔW = W' − W for a stack of same-shape modules: (U, S, Vh, k, ‖ΔW‖_F, ‖ΔW − ΔW_k‖_F).

    exact: dense ΔW, its full SVD, errors from the spectrum. randomized: the implicit operator; a fixed rank is
    sketched once, an energy τ from width max(2r, 8), doubling per module until the sketch holds τ of ‖ΔW‖²
    (known exactly from the row-norm terms); errors from the residual. S is zero-padded to the widest module.
    """
    full = min(W.shape[-2:])
    if method == "exact":
        merged = dora_merge_rows(W, B * _per_matrix(scale, B)[..., None], A, magnitude)
        svd = exact_svd_dense(merged.sub_(W), full, device=W.device)
        total = svd.S.double().square().sum(-1)
        k = _ranks(svd.S, total, policy)
        return (*svd, k, total.sqrt(), truncation_error(svd.S, k)[0].double())
    terms = row_norm_terms(W, B, A, scale)
    gain = _gain(magnitude, _norms(terms))
    total = delta_energy(terms, gain)
    width = min(int(policy.value), full) if policy.kind == "rank" else min(full, max(2 * A.shape[-2], 8))
    parts: dict[int, SVD] = {}
    todo = torch.arange(W.shape[0], device=W.device)
    while len(todo):
        op = dora_delta_operator(W[todo], B[todo], A[todo], scale[todo], gain[todo])
        svd = randomized_svd(op, width, oversample=oversample, power_iters=power_iters, seed=seed)
        done = torch.ones(len(todo), dtype=torch.bool, device=W.device)
        if policy.kind == "energy" and width < full:
            done = _captured(svd.S, total[todo], policy.value)
        for j in done.nonzero().flatten().tolist():
            parts[int(todo[j])] = SVD(svd.U[j], svd.S[j], svd.Vh[j])
        todo, width = todo[~done], min(full, 2 * width)
    widest = max(p.S.shape[-1] for p in parts.values())
    svd = SVD(*(torch.stack(t) for t in zip(*(_pad(parts[i], widest) for i in range(W.shape[0])))))
    k = _ranks(svd.S, total, policy)
    return (*svd, k, total.sqrt(), _residual_energy(W, B, A, scale, gain, svd, k).sqrt())


def to_lora(adapter: Adapter, base: Container | str | os.PathLike | None, *, rank: int | None = None,
            energy: float | None = None, svd: SvdMethod = "auto", base_weights: BaseWeights = "stored",
            device: str | torch.device = "auto", oversample: int = 10, power_iters: int = 2,
            seed: int = 0) -> tuple[Adapter, LoraFitReport]:
    """DoRA → LoRA: fit ΔW = W' − W = diag(g−1)·W + diag(g)·s·B·A (g = m/n) by a truncated SVD per module.

    Give exactly one of `rank` (k) or `energy` (τ: smallest k with Σ_{i<k} s_i² >= τ·‖ΔW‖²). `svd` picks the
    exact dense SVD, the randomized one on the implicit operator (`oversample`, `power_iters`, `seed`), or
    "auto" by size (`choose_svd`); the report says which ran. A rank >= min(out, in) with the exact SVD
    reproduces PEFT's DoRA merge. Modules without a magnitude are plain LoRA and pass unchanged; the new
    modules are written at scale 1 with balanced factors in the dtype of the old ones.

    Returns:
        (the LoRA adapter, a LoraFitReport with one ModuleFit per converted module).

    Raises:
        DoraError: the adapter has no DoRA module, or has LoRA biases. UnknownModuleError / BaseMismatchError:
        the base does not fit. InvalidArgumentError: no base, not exactly one of rank/energy, bad options.
    """
    policy = RankPolicy.from_options(rank=rank, energy=energy)
    base = _open_base(base, "DoRA → LoRA")
    adapter = _on_base(adapter, base)
    names = [n for n, m in adapter.items() if m.is_dora]
    if not names:
        raise DoraError("the adapter is plain LoRA (no DoRA magnitudes); to_lora converts DoRA adapters")
    _check_modules(adapter, names, base, base_weights)
    dev, work = resolve_device(device), _work_dtype(adapter)
    _check_choice(svd, SvdMethod, "SVD method")
    fixed = int(policy.value) if policy.kind == "rank" else None
    modules = dict(adapter.modules)
    fits: dict[str, ModuleFit] = {}
    for chunk in _weight_chunks(adapter, names, base, base_weights, dev, work):
        by_method: dict[str, dict[str, tuple[Tensor, ...]]] = {}
        for name, W in chunk.items():
            m = adapter[name]
            method = choose_svd(svd, (m.out_features, m.in_features), fixed)
            by_method.setdefault(method, {})[name] = (W, *_factors(m, dev, work), m.magnitude.to(dev, work))
        for method, items in by_method.items():
            fit = partial(_fit_group, policy=policy, method=method, oversample=oversample,
                          power_iters=power_iters, seed=seed)
            try:
                fitted = map_by_shape(items, fit)
            except NonFiniteError as exc:  # W' − W overflowed (magnitudes or scales too large for the dtype)
                raise NonFiniteError(f"DoRA → LoRA of module(s) {listed([repr(n) for n in items])}: {exc}") from None
            for name, (U, S, Vh, k, norm, err) in fitted.items():
                m, k, norm, err = adapter[name], int(k), float(norm), float(err)
                B, A = balanced_factors(U, S, Vh, k)
                modules[name] = replace(m, B=B.to("cpu", m.dtype), A=A.to("cpu", m.dtype), scale=1.0, magnitude=None)
                rel = relative(err, norm)
                fits[name] = ModuleFit(rank=k, method=method, out_features=m.out_features, in_features=m.in_features,
                                       norm=norm, error=err, rel_error=rel, retained_energy=1.0 - rel**2)
    report = LoraFitReport(f"{policy.kind}={policy.value:g}", svd, base_weights, {n: fits[n] for n in names})
    result = adapter.with_modules(modules)
    result.check_finite("DoRA → LoRA")
    return result, report
