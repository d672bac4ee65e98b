"""LoRA extraction (DESIGN §12): the best rank-k factors of ΔW = W_tuned − W_base for every changed weight.

The two checkpoints are read tensor by tensor (memory-mapped; NF4 weights dequantized), pairs matched by name.
Changed 2-D weights become LoRA modules: same-shape ΔW (float32) are stacked a bounded number at a time and
decomposed by one batched call (`adaptools.linalg.adaptive_svd`: a randomized range finder, or a dense SVD where
the matrix is small or `svd="exact"`). Embeddings are LoRA embedding modules (their stored weight is ΔWᵀ), or with
`full_tensors` full tensors like the LM head; changed norms, biases and other tensors are full tensors
(`modules_to_save`). Unchanged tensors are left out. Memory: one chunk of ΔW plus the adapter.

The error reported per module is the true ‖ΔW − ΔW_k‖_F of the float32 factors: ‖ΔW‖²_F − Σ_{i<k} s_i² with the
exact ‖ΔW‖²_F (the factors are a projection of ΔW), or the residual summed directly where that difference cancels.
"""
from __future__ import annotations

import math
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from .adapter import Adapter, LayerKind, LoraModule
from .device import resolve_device
from .errors import BaseMismatchError, InvalidArgumentError, NonFiniteError, ShapeMismatchError
from .checkpoints import Container
from .linalg import (
    OVERSAMPLE,
    RankPolicy,
    SvdMethod,
    adaptive_svd,
    balanced_factors,
    choose_svd,
    group_by,
    select_ranks,
    truncation_error,
)
from .checkpoints.stored import StoredDecoder, TensorSpec, is_conv1d
from .names import listed
from .report import ErrorSummary, ModuleFitError, relative
from .rerank import policy_text, resolve_policy
from .sources import hub_ref, open_base

__all__ = ["CHUNK_ELEMENTS", "ExtractReport", "ModuleExtract", "extract"]

CHUNK_ELEMENTS = 2**25
"""Most ΔW elements stacked for one batched decomposition (128 MiB of float32); a larger matrix goes alone."""
CANCELLATION = 1e-3
"""Below this fraction of ‖ΔW‖², ‖ΔW‖² − Σ s_i² loses digits to cancellation: the residual is summed directly."""
EMBEDDINGS = re.compile(r"(embed_tokens|embed_in|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|"
                        r"embed_positions|shared|token_embd)")
"""Last name of an embedding module (nn.Embedding: weight (num_embeddings, dim), i.e. ΔWᵀ of the LoRA)."""
OUTPUT_EMBEDDINGS = ("lm_head", "embed_out", "output")
"""Last name of an LM head (a Linear layer), kept as a full tensor with `full_tensors` like the embeddings."""


# --------------------------------------------------------------------------- report


@dataclass(frozen=True, kw_only=True)
class ModuleExtract(ModuleFitError):
    """One extracted module: the kept rank, ΔW's full rank min(out, in), the SVD that ran, ‖ΔW‖, the error."""

    new_rank: int
    full_rank: int
    kind: str
    method: str

    @property
    def params(self) -> int:
        return self.new_rank * (self.out_features + self.in_features)


@dataclass(frozen=True)
class ExtractReport(ErrorSummary):
    """Per-module results of an extraction (`to_dict()` gives JSON-ready data, `rerank`'s schema plus extras)."""

    policy: str
    svd: str
    modules: dict[str, ModuleExtract] = field(default_factory=dict)
    full_tensors: list[str] = field(default_factory=list)
    unchanged: int = 0

    @property
    def params(self) -> int:
        """LoRA parameters of all modules."""
        return sum(m.params for m in self.modules.values())

    def to_dict(self) -> dict:
        """{"policy", "svd", "methods", "rel_error", "worst_rel_error", "params", "full_tensors", "unchanged",
        "modules": {name: {new_rank, full_rank, kind, method, out_features, in_features, norm, error, rel_error,
        retained_energy}}}."""
        return {
            "policy": self.policy,
            "svd": self.svd,
            "methods": sorted({m.method for m in self.modules.values()}),
            "rel_error": self.rel_error,
            "worst_rel_error": self.worst_rel_error,
            "params": self.params,
            "full_tensors": list(self.full_tensors),
            "unchanged": self.unchanged,
            "modules": {name: asdict(m) for name, m in self.modules.items()},
        }


# --------------------------------------------------------------------------- reading the pair


@dataclass
class Checkpoint:
    """A checkpoint with its decoder: every tensor as the model uses it (quantized weights decoded)."""

    ckpt: Container
    decoder: StoredDecoder
    specs: dict[str, TensorSpec]

    @classmethod
    def open(cls, path: str | os.PathLike | Container) -> Checkpoint:
        ckpt = open_base(path)
        decoder = ckpt.decoder()
        return cls(ckpt, decoder, decoder.specs(ckpt))

    @property
    def config(self) -> dict:
        return self.ckpt.config

    def read(self, key: str) -> Tensor:
        """One tensor, memory-mapped (or dequantized), released with the last reference to it."""
        return self.decoder.read(self.ckpt, key)


def _vocab_hint(base: int, tuned: int) -> str:
    return (f"the vocabulary size changed ({base} tokens in the base, {tuned} in the tuned model): the fine-tune added "
            f"tokens, so its embeddings have no base to subtract; resize the base's embeddings to {tuned} "
            "(transformers' resize_token_embeddings, then save_pretrained) and extract against that")


def check_pair(base: Checkpoint, tuned: Checkpoint) -> None:
    """BaseMismatchError / ShapeMismatchError unless both checkpoints have one architecture, vocabulary, key set and
    shape per key."""
    types = (base.config.get("model_type"), tuned.config.get("model_type"))
    if all(types) and types[0] != types[1]:
        raise BaseMismatchError(f"the checkpoints are different architectures: base model_type {types[0]!r}, "
                                f"tuned {types[1]!r}")
    vocab = (base.config.get("vocab_size"), tuned.config.get("vocab_size"))
    if all(isinstance(v, int) for v in vocab) and vocab[0] != vocab[1]:
        raise BaseMismatchError(_vocab_hint(*vocab))
    only_base = [k for k in base.specs if k not in tuned.specs]
    only_tuned = [k for k in tuned.specs if k not in base.specs]
    if only_base or only_tuned:
        parts = [f"{len(keys)} only in the {what} ({listed(keys)})"
                 for keys, what in ((only_base, "base"), (only_tuned, "tuned model")) if keys]
        raise BaseMismatchError(f"the checkpoints hold different tensors: {'; '.join(parts)}")
    differ = [k for k, s in base.specs.items() if tuned.specs[k].shape != s.shape]
    for key in differ:
        b, t = base.specs[key].shape, tuned.specs[key].shape
        if _last_name(key) in ("embed_tokens", "wte", "word_embeddings", "embed_in", *OUTPUT_EMBEDDINGS) \
                and b[1:] == t[1:]:
            raise BaseMismatchError(_vocab_hint(b[0], t[0]))
    if differ:
        shown = [f"{k} {tuple(base.specs[k].shape)} vs {tuple(tuned.specs[k].shape)}" for k in differ]
        raise ShapeMismatchError(f"{len(differ)} tensors have other shapes in the base and the tuned model: "
                                 f"{listed(shown)}")


def _module(key: str) -> str:
    """Module path of a checkpoint key (`model.norm.weight` → `model.norm`)."""
    return key.rsplit(".", 1)[0] if "." in key else key


def _last_name(key: str) -> str:
    return _module(key).rsplit(".", 1)[-1]


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Target:
    """A 2-D weight to extract as LoRA: its stored (rows, cols) layout, the layer kind and orientation."""

    key: str
    shape: tuple[int, int]
    kind: LayerKind
    fan_in_fan_out: bool
    dtype: torch.dtype
    kernel: tuple[int, ...] = ()
    """A convolution's kernel: ΔW (out, in, *kernel) is fitted as its (out, in·prod(kernel)) view (LoCon factors)."""

    @property
    def name(self) -> str:
        return self.key.removesuffix(".weight")

    @property
    def transposed(self) -> bool:
        """True where the stored weight is ΔWᵀ of the LoRA's canonical (out, in) update."""
        return self.kind == "embedding" or self.fan_in_fan_out


def _compile(patterns: str | Sequence[str] | None, what: str) -> list[re.Pattern]:
    items = [patterns] if isinstance(patterns, str) else list(patterns or ())
    compiled = []
    for p in items:
        try:
            compiled.append(re.compile(p))
        except re.error as exc:
            raise InvalidArgumentError(f"{what} pattern {p!r} is not a valid regular expression ({exc})") from None
    return compiled


def plan(base: Checkpoint, tuned: Checkpoint, *, include: str | Sequence[str] | None = None,
         exclude: str | Sequence[str] | None = None, full_tensors: bool = False,
         dtype: torch.dtype | None = None) -> tuple[list[Target], list[str]]:
    """(LoRA targets, keys of full tensors) among the tensors whose module `include` matches (re.search; all when
    None) and `exclude` does not. Targets: 2-D floating `*.weight` (embeddings as kind "embedding"; with
    `full_tensors` embeddings and the LM head are full tensors instead). Everything else is a full tensor when it
    changed. `dtype`: the factors' dtype (None: the tuned weight's)."""
    keep, drop = _compile(include, "--include"), _compile(exclude, "--exclude")
    model_type = tuned.config.get("model_type") or base.config.get("model_type")
    targets, full = [], []
    for key, spec in tuned.specs.items():
        module = _module(key)
        if (keep and not any(p.search(module) for p in keep)) or any(p.search(module) for p in drop):
            continue
        odd = [f"{name} {str(c.specs[key].dtype).removeprefix('torch.')}"
               for name, c in (("base", base), ("tuned", tuned))
               if c.specs[key].dtype.is_floating_point and c.specs[key].dtype.itemsize < 2]
        if odd:
            raise InvalidArgumentError(f"{key!r} is stored as {' and '.join(odd)}: extract reads float16, bfloat16, "
                                       "float32 and float64 weights (dequantize the checkpoint first)")
        last = _last_name(key)
        embedding = EMBEDDINGS.fullmatch(last) is not None
        weight = key.endswith((".weight", ".in_proj_weight"))  # OpenCLIP's fused attention input projection
        conv = weight and len(spec.shape) > 2 and math.prod(spec.shape[1:]) > 1
        lora = (weight and (len(spec.shape) == 2 or conv) and spec.dtype.is_floating_point
                and base.specs[key].dtype.is_floating_point
                and not (full_tensors and (embedding or last in OUTPUT_EMBEDDINGS)))
        if not lora:
            full.append(key)
            continue
        if conv:
            targets.append(Target(key, (spec.shape[0], math.prod(spec.shape[1:])), "conv", False, dtype or spec.dtype,
                                  tuple(spec.shape[2:])))
            continue
        targets.append(Target(key, tuple(spec.shape), "embedding" if embedding else "linear", is_conv1d(model_type, key),
                              dtype or spec.dtype))
    if not targets and not full:
        raise InvalidArgumentError("--include / --exclude leave no tensor of the checkpoints to extract")
    return targets, full


def changed_tensors(base: Checkpoint, tuned: Checkpoint, keys: Sequence[str]) -> dict[str, Tensor]:
    """The tuned model's copy of every tensor in `keys` that differs from the base's (compared in float32)."""
    changed = {}
    for key in keys:
        b, t = base.read(key), tuned.read(key)
        same = torch.equal(b, t) if b.dtype == t.dtype else torch.equal(b.float(), t.float())
        if not same:
            changed[key] = t.clone()
    return changed


def chunks(targets: Sequence[Target], max_elements: int = CHUNK_ELEMENTS) -> Iterator[list[Target]]:
    """Targets grouped by stored shape, at most max_elements ΔW elements (and at least one target) per chunk."""
    by_key = {t.key: t for t in targets}
    for keys in group_by({t.key: t.shape for t in targets}).values():
        step = max(1, max_elements // math.prod(by_key[keys[0]].shape))
        for start in range(0, len(keys), step):
            yield [by_key[k] for k in keys[start:start + step]]


# --------------------------------------------------------------------------- decomposition


@dataclass
class Chunk:
    """Stacked ΔW (stored layout, float32) of the changed targets of one chunk and their exact ‖ΔW‖²_F (float64)."""

    targets: list[Target]
    delta: Tensor
    total: Tensor


def read_deltas(base: Checkpoint, tuned: Checkpoint, targets: Sequence[Target], device: torch.device) -> Chunk:
    """ΔW = W_tuned − W_base in float32 for `targets` (one shape), stacked; unchanged ones are left out."""
    rows, cols = targets[0].shape
    buffer = torch.empty(len(targets), rows, cols, dtype=torch.float32, device=device)
    kept: list[Target] = []
    totals: list[Tensor] = []
    for target in targets:
        slot = buffer[len(kept)]
        slot.copy_(tuned.read(target.key).reshape(rows, cols))
        slot.sub_(base.read(target.key).reshape(rows, cols).to(device))
        total = torch.linalg.vector_norm(slot, dim=-1).double().square().sum()  # float32 rows, float64 sum
        if total != 0:
            kept.append(target)
            totals.append(total)
    delta = buffer[:len(kept)]
    total = torch.stack(totals) if totals else torch.zeros(0, dtype=torch.float64, device=device)
    bad = [t.key for t, v in zip(kept, total.tolist()) if not math.isfinite(v)]
    if bad:
        raise NonFiniteError(f"ΔW of {listed(bad)} holds NaN or Inf (or overflows): check both checkpoints")
    return Chunk(kept, delta, total)


@dataclass(frozen=True)
class Fit:
    """The rank-k factors of one module in the LoRA's canonical layout (float32) and its report entry."""

    module: LoraModule
    entry: ModuleExtract


def fit_chunk(chunk: Chunk, policy: RankPolicy, *, svd: SvdMethod, ranks: Sequence[int] | None = None,
              oversample: int = OVERSAMPLE, power_iters: int | None = None, seed: int = 0) -> list[Fit]:
    """Best rank-k factors B = U_k√S_k, A = √S_k Vh_k of each ΔW of the chunk, k by `policy` (or the given
    `ranks`, e.g. from a global budget), with the exact error per module (module docstring)."""
    rows, cols = chunk.delta.shape[1:]
    fixed = RankPolicy("rank", max(ranks)) if ranks is not None else policy
    fits = []
    parts = adaptive_svd(chunk.delta, fixed, chunk.total, method=svd, oversample=oversample,
                         power_iters=power_iters, seed=seed)
    for j, (target, ((U, S, Vh), k, method)) in enumerate(zip(chunk.targets, parts)):
        k = min(k, ranks[j]) if ranks is not None else k
        total = chunk.total[j]
        L, R = balanced_factors(U, S, Vh, k)
        error, _, retained = (float(v) for v in truncation_error(S.double(), k, total))
        if error**2 < CANCELLATION * float(total):  # sum the residual itself (it overwrites this ΔW)
            error = float(torch.linalg.vector_norm(chunk.delta[j].addmm_(L, R, alpha=-1), dtype=torch.float64))
            retained = float(S[:k].double().square().sum() / total) if total > 0 else 1.0
        B, A = (R.T, L.T) if target.transposed else (L, R)
        module = LoraModule(A=A.to("cpu", target.dtype).contiguous(), B=B.to("cpu", target.dtype).contiguous(),
                            kind=target.kind, fan_in_fan_out=target.fan_in_fan_out, kernel=target.kernel)
        norm = math.sqrt(float(total))
        entry = ModuleExtract(new_rank=k, full_rank=min(rows, cols), kind=target.kind, method=method,
                              out_features=module.out_features, in_features=module.in_features, norm=norm,
                              error=error, rel_error=relative(error, norm), retained_energy=retained)
        fits.append(Fit(module, entry))
    return fits


def budget_ranks_for(base: Checkpoint, tuned: Checkpoint, targets: Sequence[Target], policy: RankPolicy, *,
                     svd: SvdMethod, device: torch.device, oversample: int, power_iters: int | None, seed: int,
                     bar: tqdm) -> dict[str, int]:
    """Ranks of the changed targets under a global parameter budget (`select_ranks` on their spectra).

    Each spectrum is sketched to a width twice the budget's mean rank; a module whose rank reaches the end of its
    trusted spectrum (and is not full) is read again and sketched twice as wide, until none does."""
    mean = policy.value / max(1, sum(sum(t.shape) for t in targets))
    width = {t.key: max(8, math.ceil(2 * mean)) for t in targets}
    spectra: dict[str, Tensor] = {}
    shapes: dict[str, tuple[int, int]] = {}
    todo = list(targets)
    while todo:
        for group in chunks(todo):
            chunk = read_deltas(base, tuned, group, device)
            bar.update(len(group))
            if not chunk.targets:
                continue
            for target in chunk.targets:
                shapes[target.key] = target.shape
            for target, (svd_j, k, _) in zip(chunk.targets, adaptive_svd(
                    chunk.delta, RankPolicy("rank", max(width[t.key] for t in chunk.targets)), chunk.total,
                    method=svd, oversample=oversample, power_iters=power_iters, seed=seed)):
                spectra[target.key] = svd_j.S[:k].double().cpu()
        ranks = select_ranks(spectra, shapes, policy)
        todo = [t for t in targets if t.key in spectra and ranks[t.key] >= len(spectra[t.key]) < min(t.shape)]
        for t in todo:
            width[t.key] = 2 * len(spectra[t.key])
        bar.total += len(todo)
    return ranks


# --------------------------------------------------------------------------- the operation


def extract(base: str | os.PathLike | Container, tuned: str | os.PathLike | Container, *,
            rank: int | None = None, energy: float | None = None, ratio: float | None = None,
            threshold: float | None = None, budget: int | None = None, policy: RankPolicy | str | None = None,
            include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None,
            svd: SvdMethod = "auto", device: str | torch.device = "auto", full_tensors: bool = False,
            dtype: torch.dtype | None = None, oversample: int = OVERSAMPLE, power_iters: int | None = None,
            seed: int = 0, progress: bool = False) -> tuple[Adapter, ExtractReport]:
    """A LoRA adapter whose update is the best rank-k approximation of ΔW = W_tuned − W_base, per changed weight.

    Give exactly one of rank=k, energy=τ, ratio=ρ, threshold=t, budget=N (or policy=RankPolicy / "kind=value"),
    with `adaptools.linalg.RankPolicy`'s rules (energy and budget use the exact ‖ΔW‖²). `base` and `tuned` are
    checkpoint folders (one file or shards, any layouts; NF4 checkpoints are dequantized). `include` / `exclude`
    are regular expressions searched in module paths. `svd`: "exact" (dense), "randomized" (HMT range finder with
    `oversample` extra columns and `power_iters` power iterations, None: `linalg.power_iterations`) or "auto" by
    size. The factors (scale 1, balanced) are stored in `dtype` (None: each tuned weight's dtype); changed 1-D
    tensors (norms, biases), other non-matrix tensors and, with `full_tensors`, embeddings and the LM head are
    carried whole in `Adapter.extra` and listed as PEFT `modules_to_save`. `progress`: a tqdm bar (tensors) on stderr.

    Returns:
        (the adapter, an ExtractReport with per module the rank, ‖ΔW‖ and the exact ‖ΔW − ΔW_k‖).

    Raises:
        BaseMismatchError / ShapeMismatchError: other architectures, vocabularies, key sets or shapes.
        InvalidArgumentError: no policy or several, a bad option or pattern. NonFiniteError: ΔW holds NaN or Inf.
    """
    chosen = resolve_policy(policy, rank=rank, energy=energy, ratio=ratio, threshold=threshold, budget=budget)
    choose_svd(svd, (1, 1))
    dev = resolve_device(device)
    pair = Checkpoint.open(base), Checkpoint.open(tuned)
    check_pair(*pair)
    targets, full_keys = plan(*pair, include=include, exclude=exclude, full_tensors=full_tensors, dtype=dtype)
    options = dict(svd=svd, oversample=oversample, power_iters=power_iters, seed=seed)
    considered = len(targets) + len(full_keys)
    fits: dict[str, Fit] = {}
    with tqdm(total=len(targets) + len(full_keys), desc="extracting", unit="tensor", disable=not progress,
              file=sys.stderr) as bar:  # as merge's: closed on its own line, before an `error:` line if one ends it
        extra = changed_tensors(*pair, full_keys)
        bar.update(len(full_keys))
        ranks = None
        if chosen.kind == "budget":
            ranks = budget_ranks_for(*pair, targets, chosen, device=dev, bar=bar, **options)
            targets = [t for t in targets if t.key in ranks]
            bar.total += len(targets)
        for group in chunks(targets):
            chunk = read_deltas(*pair, group, dev)
            if chunk.targets:
                given = None if ranks is None else [ranks[t.key] for t in chunk.targets]
                fits.update(zip((t.name for t in chunk.targets), fit_chunk(chunk, chosen, ranks=given, **options)))
            bar.update(len(group))
    order = [t.name for t in targets if t.name in fits]
    names = pair[0].ckpt.names
    modules = {}
    keys = {t.name: t.key for t in targets}
    for name in order:  # the module paths adapters of this base name (a fused weight: one module per row block)
        module = fits[name].module
        _, stored_order = names.source(keys[name])  # rows stored in another order (GGUF q/k): back to the model's
        if stored_order is not None:
            module = replace(module, B=module.B[stored_order])
        for path, rows in names.adapter_modules(keys[name]):
            modules[path] = module if rows is None else replace(  # own A per module: files hold no shared tensors
                module, A=module.A.clone(), B=module.B[rows[0]:rows[1]].contiguous())
    if not names.full_tensors and extra:  # a diffusion checkpoint: its LoRA files hold LoRA factors only
        warnings.warn(f"{len(extra)} changed tensor(s) that are not LoRA weights are left out (LoRA files for "
                      f"diffusion models hold none): {listed(sorted(extra))}", stacklevel=2)
        extra = {}
    extra = {source: tensor if order is None else tensor[order]
             for key, tensor in extra.items() for source, order in [names.source(key)]}
    saved = sorted({_module(key) for key in extra if _module(key) not in modules})
    architectures = pair[1].config.get("architectures") or []
    config = {"modules_to_save": saved or None,
              "task_type": "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in architectures) else None}
    if not modules:
        what = (f"only full tensors changed ({listed(sorted(extra))})" if extra
                else f"TUNED equals BASE in all {considered} tensors compared")
        raise InvalidArgumentError(f"nothing to extract as LoRA: {what}")
    root = pair[0].ckpt.root
    ref = hub_ref(base)
    base_model = ref.repo_id if ref is not None else str(root if isinstance(base, Container) else base)
    adapter = Adapter(modules=modules, extra=extra, base_model=base_model, config=config, source_format="peft",
                      name=Path(root).name)
    held = {name: names.adapter_modules(keys[name]) for name in order}  # a weight holding one module: its path
    report = ExtractReport(policy_text(chosen), svd,
                           {held[n][0][0] if len(held[n]) == 1 else n: fits[n].entry for n in order},
                           sorted(extra), unchanged=considered - len(order) - len(extra))
    return adapter, report
