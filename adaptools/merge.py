"""Streaming merge of LoRA/DoRA adapters into a base checkpoint (DESIGN §8): plan, validate, then one pass.

1. Validate before writing: every adapter module needs a base weight it fits (fan_in_fan_out resolved by shape),
   every LoRA bias a base bias, every full tensor a base tensor of its shape; all offenders are listed at once.
2. Steps: the base's tensors, shard by shard, grouped by (shape, dtype) into chunks of at most `batch_bytes`
   (as float32). Each step is read once (memory-mapped) and feeds every output (several adapters → several
   merged models). Steps run on worker threads; every output tensor has a byte range planned up front, so
   results are written where they belong in whatever order they are done.
3. Per output and step: the targeted weights, as 2-D views of their stored layout, float32, on `device`, are
   stacked and merged with one `baddbmm` per tile of rows: W' = W + L·R with (L, R) = (B, A), or (Aᵀ, Bᵀ) where
   the base stores ΔWᵀ, each module's scale and weight folded in (several adapters: factors concatenated, rank
   Σr; ranks zero-padded to the largest of the batch); DoRA rows are then scaled by m/‖W'‖. On the CPU a tile
   is a cache-sized slice of rows, so a weight is read, merged, cast and written without leaving the cache; on
   an accelerator a tile is the whole step. Results are cast to the output dtype, checked finite and written.

Hooks: a decoder turns stored base tensors into the tensors that are merged (`StoredDecoder`: as stored) and an
encoder turns results into stored output tensors (`CastEncoder`: a cast, row by row). An NF4 base or output
plugs in there (adaptools.nf4_checkpoint: dequantize → merge in float32 → requantize, whole tensors), and
`write_outputs` also serves `adaptools.quantize` (no adapters, an NF4 encoder).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import queue
import resource
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .adapter import Adapter, LoraModule
from .atomic import atomic_output, check_output
from .combine import check_weights, combined_bias, concat_factors, plan_terms
from .device import resolve_device, torch_threads
from .errors import (
    DoraError,
    InvalidArgumentError,
    NonFiniteError,
    ShapeMismatchError,
    UnknownModuleError,
)
from .formats import load_adapter
from .formats.checkpoint import BaseCheckpoint, TensorInfo
from .formats.checkpoint_writer import (
    Layout,
    OutputSink,
    config_with_dtype,
    copy_side_files,
    parse_size,
    plan_shards,
    shard_names,
)
from .formats.kohya import PREFIXES, remap_to_base
from .linalg import group_by

__all__ = [
    "CastEncoder",
    "MergeReport",
    "StoredDecoder",
    "TensorSpec",
    "dora_merge_rows",
    "lora_merge",
    "merge",
    "parse_dtype",
    "write_outputs",
]

DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
"""Architectures whose projections are transformers' Conv1D (weight stored (in, out)): a square weight is transposed."""
BATCH_BYTES = {"cpu": 2**25, "cuda": 2**28}
"""Default float32 bytes of base weights merged in one step, per device type."""
TILE_BYTES = {"cpu": 2**21}
"""Float32 bytes of rows merged at once on the CPU (cache-sized); other devices merge whole steps."""
MAX_WORKERS = 8
"""At most this many steps run at once on the CPU (each holds its step's tensors)."""


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """torch dtype of "fp16"/"bf16"/"fp32" (and their long names); None keeps each base tensor's dtype."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise InvalidArgumentError(f"unsupported output dtype {dtype!r} (choose fp16, bf16 or fp32)")


# --------------------------------------------------------------------------- batched math


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


# --------------------------------------------------------------------------- hooks: reading and writing tensors


@dataclass(frozen=True)
class TensorSpec:
    """A base tensor as the merge sees it: shape and dtype (after decoding), its shard and stored bytes."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    shard: str
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class StoredDecoder:
    """Base tensors as stored, one checkpoint key each (an NF4 decoder would group and dequantize keys here)."""

    def specs(self, ckpt: BaseCheckpoint) -> dict[str, TensorSpec]:
        """{key: spec} for every tensor, in shard order."""
        return {k: TensorSpec(ckpt.shape(k), ckpt.dtype(k), ckpt.weight_map[k], ckpt.nbytes(k)) for k in ckpt.keys()}

    def read(self, ckpt: BaseCheckpoint, key: str) -> Tensor:
        """The tensor to merge (memory-mapped: its pages are read as they are used and released with it)."""
        return ckpt.mapped(key)

    def sources(self, ckpt: BaseCheckpoint, key: str) -> dict[str, tuple[Path, TensorInfo]]:
        """Where the stored bytes of `key` lie, per output key, for outputs that keep it unchanged (copied file to
        file)."""
        return {key: (ckpt.path(key), ckpt.info(key))}


class CastEncoder:
    """Output tensors written as plain entries, floating ones in `dtype` (None keeps each base tensor's dtype)."""

    quantized = 0
    """Weights each output stores quantized."""
    row_wise = True
    """`encode` works on any rows of a tensor (so merged weights may arrive in tiles of rows)."""

    def __init__(self, dtype: torch.dtype | None = None):
        self.dtype = dtype

    @property
    def label(self) -> str | None:
        """The output's dtype for reports (None: each base tensor's own)."""
        return None if self.dtype is None else str(self.dtype).removeprefix("torch.")

    def dtype_for(self, spec: TensorSpec) -> torch.dtype:
        """The dtype the executor hands `encode` for a tensor of this spec (the same for equal shape and dtype)."""
        return self.dtype if self.dtype is not None and spec.dtype.is_floating_point else spec.dtype

    def keeps(self, key: str, spec: TensorSpec) -> bool:
        """True when an unchanged tensor is written exactly as stored (its bytes are then copied, never loaded)."""
        return self.dtype_for(spec) == spec.dtype

    def entries(self, key: str, spec: TensorSpec) -> dict[str, int]:
        """Output keys written for `key`, with their bytes (to plan shards)."""
        return {key: spec.numel * self.dtype_for(spec).itemsize}

    def encode(self, key: str, tensor: Tensor) -> dict[str, Tensor]:
        return {key: tensor}

    def survival(self, key: str, base: Tensor, merged: Tensor, encoded: dict[str, Tensor]) -> float | None:
        """The fraction of the change merged − base that the encoded tensors keep; None when not measured."""
        return None

    def update_config(self, config: dict) -> dict:
        return config if self.dtype is None else config_with_dtype(config, self.dtype)


# --------------------------------------------------------------------------- validation and planning


@dataclass
class Update:
    """One output's change to one base weight, on its 2-D view (first dimension by the rest flattened):
    W' = W + L @ R, then DoRA's scaling of each canonical row (a row of the view, or a column when `columns`)."""

    L: Tensor
    R: Tensor
    magnitude: Tensor | None = None
    columns: bool = False


@dataclass
class OutputPlan:
    """What one output folder changes in the base: merged weights, LoRA bias sums, full-tensor terms."""

    name: str
    updates: dict[str, Update]
    biases: dict[str, Tensor] = field(default_factory=dict)
    full: dict[str, list[tuple[float, Tensor]]] = field(default_factory=dict)

    def changes(self, key: str) -> bool:
        """True when this output writes `key` other than as stored."""
        return key in self.updates or key in self.biases or key in self.full


@dataclass(frozen=True)
class Step:
    """Base tensors of one shard with the same shape and dtype, read and merged together."""

    keys: tuple[str, ...]


def fit_module(module: LoraModule, shape: tuple[int, ...], square_transposed: bool) -> LoraModule | None:
    """The module laid out for a base weight of `shape`, or None when it cannot fit.

    A linear update fits a weight (out, in), a fan_in_fan_out weight (in, out) (GPT-2's Conv1D) or a 1x1
    convolution (out, in, 1, 1); a square weight is ambiguous and takes `square_transposed`.
    """
    if module.kind != "linear":
        return module if module.weight_shape == tuple(shape) else None
    out, inp = module.out_features, module.in_features
    if len(shape) > 2 and tuple(shape[:2]) == (out, inp) and math.prod(shape[2:]) == 1:
        return replace(module, kind="conv", kernel=tuple(shape[2:]), fan_in_fan_out=False)
    if tuple(shape) == (out, inp) == (inp, out):
        return replace(module, fan_in_fan_out=square_transposed)
    if tuple(shape) == (out, inp):
        return replace(module, fan_in_fan_out=False)
    if tuple(shape) == (inp, out):
        return replace(module, fan_in_fan_out=True)
    return None


def square_orientation(adapter: Adapter, specs: dict[str, TensorSpec], model_type: str | None) -> bool:
    """Whether the adapter's square linear weights are stored (in, out).

    True for Conv1D architectures; else what its non-square modules show by their shapes, when they agree;
    else the adapter's own fan_in_fan_out flag (PEFT forces it for Conv1D layers).
    """
    if model_type in CONV1D_MODEL_TYPES:
        return True
    seen = set()
    for name, module in adapter.items():
        spec = specs.get(f"{name}.weight")
        if module.kind == "linear" and module.out_features != module.in_features and spec is not None:
            fitted = fit_module(module, spec.shape, False)
            if fitted is not None and fitted.kind == "linear":
                seen.add(fitted.fan_in_fan_out)
    if len(seen) == 1:
        return seen.pop()
    return any(m.fan_in_fan_out for m in adapter.modules.values())


def _listed(items: Sequence[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def fit_adapters(adapters: Sequence[Adapter], specs: dict[str, TensorSpec], model_type: str | None) -> list[Adapter]:
    """The adapters with every module laid out for its base weight; all missing or misfit tensors raise at once."""
    missing: list[str] = []
    misfit: list[str] = []
    fitted_adapters = []
    for adapter in adapters:
        square = square_orientation(adapter, specs, model_type)
        fitted: dict[str, LoraModule] = {}
        for name, module in adapter.items():
            spec = specs.get(f"{name}.weight")
            if spec is None:
                missing.append(f"{name}.weight")
                continue
            if not spec.dtype.is_floating_point:
                misfit.append(f"{name}.weight is stored as {spec.dtype} (a quantized base is not supported here)")
                continue
            fit = fit_module(module, spec.shape, square)
            if fit is None:
                misfit.append(f"{name}: the adapter needs {module.weight_shape}, the base has {spec.shape}")
                continue
            fitted[name] = fit
            if module.bias is not None:
                bias = specs.get(f"{name}.bias")
                if bias is None:
                    missing.append(f"{name}.bias (for the LoRA bias)")
                elif bias.shape != (module.out_features,):
                    misfit.append(f"{name}.bias: the LoRA bias has {module.out_features} values, the base {bias.shape}")
        for key, tensor in adapter.extra.items():
            spec = specs.get(key)
            if spec is None:
                missing.append(f"{key} (a full tensor of the adapter)")
            elif tuple(tensor.shape) != spec.shape:
                misfit.append(f"{key}: the adapter's full tensor is {tuple(tensor.shape)}, the base's {spec.shape}")
        fitted_adapters.append(adapter.with_modules(fitted))
    if missing:
        raise UnknownModuleError(
            f"{len(missing)} tensor(s) the adapters change are not in the base: {_listed(missing)}"
        )
    if misfit:
        raise ShapeMismatchError(f"{len(misfit)} adapter tensor(s) do not fit the base: {_listed(misfit, 3)}")
    return fitted_adapters


def plan_output(name: str, adapters: Sequence[Adapter], weights: Sequence[float], device: torch.device) -> OutputPlan:
    """One output's updates: per module the weighted terms concatenated (rank Σr), laid out for the base weight's
    2-D view, factors on `device` in float32."""
    updates: dict[str, Update] = {}
    biases: dict[str, Tensor] = {}
    for module_name, terms in plan_terms(adapters, weights).items():
        first = terms[0].module
        if len(terms) > 1 and any(t.module.is_dora for t in terms):
            raise DoraError(
                f"module {module_name!r} gets a DoRA update and others in one output; merge them one after another "
                "or use --each"
            )
        L, R = first.base_factors(*concat_factors(terms))
        magnitude = None if first.magnitude is None else first.magnitude.float().to(device)
        updates[f"{module_name}.weight"] = Update(L.to(device), R.to(device), magnitude, first.transposed)
        bias = combined_bias(terms, torch.float32)
        if bias is not None:
            biases[f"{module_name}.bias"] = bias
    full: dict[str, list[tuple[float, Tensor]]] = {}
    for adapter, weight in zip(adapters, weights):
        for key, tensor in adapter.extra.items():
            full.setdefault(key, []).append((weight, tensor))
    return OutputPlan(name, updates, biases, full)


def plan_steps(specs: dict[str, TensorSpec], batch_bytes: int) -> list[Step]:
    """Steps in shard order: same-shape, same-dtype tensors of a shard in chunks of <= batch_bytes (float32)."""
    steps = []
    for keys in group_by({k: (s.shard, s.shape, s.dtype) for k, s in specs.items()}).values():
        per = max(1, batch_bytes // max(1, 4 * specs[keys[0]].numel))
        steps += [Step(tuple(keys[i:i + per])) for i in range(0, len(keys), per)]
    return steps


def interleave_shards(steps: Sequence[Step], specs: dict[str, TensorSpec]) -> list[Step]:
    """The steps taken from each shard in turn (each shard's in order), so that steps running at once mostly
    write different output files: a file takes one write at a time."""
    per_shard = group_by({step: specs[step.keys[0]].shard for step in steps})
    return [step for turn in itertools.zip_longest(*per_shard.values()) for step in turn if step is not None]


def plan_layout(ckpt: BaseCheckpoint, steps: Sequence[Step], specs: dict[str, TensorSpec], encoder: CastEncoder,
                max_shard_bytes: int | None) -> Layout:
    """The base's own shard files (default: an output key stays in its base shard, a new one goes to its tensor's),
    or new shards of at most `max_shard_bytes` in write order."""
    units = [(encoder.entries(key, specs[key]), specs[key].shard) for step in steps for key in step.keys]
    if max_shard_bytes is None:
        files: dict[str, dict[str, int]] = {shard: {} for shard in ckpt.shards}
        for entries, shard in units:
            for key, nbytes in entries.items():
                files[ckpt.weight_map.get(key, shard)][key] = nbytes
        files = {name: sizes for name, sizes in files.items() if sizes}
        return Layout(files, ckpt.indexed or len(files) > 1)
    groups = plan_shards([entries for entries, _ in units], max_shard_bytes)
    return Layout(dict(zip(shard_names(len(groups)), groups)), len(groups) > 1)


# --------------------------------------------------------------------------- execution


class Buffers:
    """One worker's scratch tensors by role, reused from tile to tile (a fresh large allocation faults in every
    page again)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.device], Tensor] = {}

    def take(self, role: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
        """An uninitialised tensor of `shape` and `dtype` in the buffer of `role` (valid until the next take)."""
        device = torch.device(device)
        nbytes = math.prod(shape) * dtype.itemsize
        buffer = self._buffers.get((role, device))
        if buffer is None or buffer.numel() < nbytes:
            buffer = self._buffers[(role, device)] = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return buffer[:nbytes].view(dtype).view(tuple(shape))


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


def check_range(names: Sequence[str], values: Tensor, dtype: torch.dtype) -> None:
    """NonFiniteError naming the stacked tensors (b, ...) that hold NaN/Inf or values beyond the range of `dtype`.

    Fast pass: ‖x‖_F of all of them, then per tensor; when it is finite and below the dtype's largest value, so
    is every |x_i|. Tensors failing it get the exact test: max |x| cast to `dtype` overflows exactly when some
    element does.
    """
    if values.numel() == 0 or not values.is_floating_point():
        return
    limit = torch.finfo(dtype).max
    if torch.linalg.vector_norm(values, dtype=torch.float32).item() < limit:
        return
    flat = values.reshape(len(names), -1)
    norms = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float32)
    suspects = (~(norms < limit)).nonzero().flatten().tolist()
    if not suspects:
        return
    low, high = torch.aminmax(flat[suspects].float(), dim=1)
    peak = torch.maximum(high, -low)
    fits, finite = torch.isfinite(peak.to(dtype)).tolist(), torch.isfinite(peak).tolist()
    bad = [j for j in range(len(suspects)) if not fits[j]]
    if not bad:
        return
    listed = _listed([names[suspects[j]] for j in bad])
    if all(finite[j] for j in bad):
        raise NonFiniteError(
            f"merged values exceed the {str(dtype).removeprefix('torch.')} range (|x| > {torch.finfo(dtype).max:g}) "
            f"in {len(bad)} tensor(s): {listed}; merge to bf16 or fp32 (--dtype)"
        )
    raise NonFiniteError(f"the merge gives NaN or Inf in {len(bad)} tensor(s): {listed}")


def merge_weights(updates: dict[str, Update], bases: dict[str, Tensor], dtype: torch.dtype, device: torch.device,
                  buffers: Buffers, tile_elems: int | None) -> Iterator[tuple[str, int, Tensor]]:
    """(key, first row, merged rows in the stored layout, `dtype`, CPU): per group of same-kind updates one
    baddbmm per tile of about `tile_elems` elements (None, or DoRA over columns: all rows at once).

    The results live in `buffers`: consume each before asking for the next.
    """
    groups = group_by({k: (u.magnitude is not None, u.magnitude is not None and u.columns) for k, u in updates.items()})
    for (dora, columns), keys in groups.items():
        shape = bases[keys[0]].shape
        rows, cols = shape[0], math.prod(shape[1:])
        L = stack_padded([updates[k].L for k in keys], dim=1)
        R = stack_padded([updates[k].R for k in keys], dim=0)
        magnitude = torch.stack([updates[k].magnitude for k in keys]) if dora else None
        step = rows if tile_elems is None or columns else max(1, tile_elems // (len(keys) * cols))
        for first in range(0, rows, step):
            last = min(rows, first + step)
            W = buffers.take("merge", (len(keys), last - first, cols), torch.float32, device)
            for j, key in enumerate(keys):
                W[j].copy_(bases[key][first:last].reshape(last - first, cols))
            if dora:
                gains = magnitude if columns else magnitude[:, first:last]
                dora_merge_rows(W, L[:, first:last], R, gains, inplace=True, columns=columns)
            else:
                lora_merge(W, L[:, first:last], R, inplace=True)
            check_range(keys, W, dtype)
            cast = W if dtype == torch.float32 else buffers.take("cast", W.shape, dtype, device).copy_(W)
            if cast.device.type != "cpu":
                cast = buffers.take("host", cast.shape, dtype).copy_(cast)
            for j, key in enumerate(keys):
                yield key, first, cast[j].view(last - first, *shape[1:])


def changed_value(key: str, stored: Tensor, plan: OutputPlan) -> Tensor | None:
    """The tensor after full-tensor terms and LoRA biases, float32: W + Σ w·(T − W) (T for one term of weight 1)
    plus Σ w·s·b; None when the output leaves `key` as stored."""
    terms, bias = plan.full.get(key), plan.biases.get(key)
    if not terms and bias is None:
        return None
    if terms and len(terms) == 1 and terms[0][0] == 1.0:
        value = terms[0][1].float()
    else:
        value = stored.float()
        for weight, tensor in terms or ():
            value = value + weight * (tensor.float() - stored.float())
    return value if bias is None else value + bias.to(value.device)


def merge_step(step: Step, stored: dict[str, Tensor], specs: dict[str, TensorSpec], plan: OutputPlan,
               encoder: CastEncoder, device: torch.device, buffers: Buffers,
               tile_elems: int | None) -> Iterator[tuple[str, int, Tensor]]:
    """(key, first row, rows in the encoder's dtype) for the step's tensors that this output changes or casts:
    merged weights in tiles of rows when the encoder is row-wise, other tensors whole.

    The others are kept as stored. Each yielded tensor must be written before the next is asked for.
    """
    dtype = encoder.dtype_for(specs[step.keys[0]])
    current = dict(stored)
    changed = {}
    for key in current:
        value = changed_value(key, stored[key], plan)
        if value is not None:
            current[key] = changed[key] = value
    updates = {k: plan.updates[k] for k in step.keys if k in plan.updates}
    yield from merge_weights(updates, current, dtype, device, buffers, tile_elems if encoder.row_wise else None)
    for key in step.keys:
        if key not in updates and (key in changed or not encoder.keeps(key, specs[key])):
            check_range([key], current[key].unsqueeze(0), dtype)
            yield key, 0, current[key].to(dtype)


def run_step(step: Step, ckpt: BaseCheckpoint, specs: dict[str, TensorSpec], plans: Sequence[OutputPlan],
             sinks: Sequence[OutputSink], decoder: StoredDecoder, encoder: CastEncoder, device: torch.device,
             buffers: Buffers, tile_elems: int | None, survival: Sequence[dict[str, float]]) -> int:
    """Read the step's tensors that some output changes or casts (once), merge them per output, write everything;
    the encoder's survival of each merged weight goes into `survival` (one dict per output). Returns the step's
    stored bytes."""
    needed = [k for k in step.keys if not encoder.keeps(k, specs[k]) or any(plan.changes(k) for plan in plans)]
    stored = {k: decoder.read(ckpt, k) for k in needed}
    for plan, sink, kept in zip(plans, sinks, survival):
        written = set()
        for key, row, tensor in merge_step(step, stored, specs, plan, encoder, device, buffers, tile_elems):
            whole = row == 0 and tuple(tensor.shape) == specs[key].shape
            encoded = encoder.encode(key, tensor)
            for out_key, value in encoded.items():
                sink.write(out_key, value, row, None if whole else specs[key].shape[0])
            written.add(key)
            fraction = encoder.survival(key, stored[key], tensor, encoded) if whole and key in plan.updates else None
            if fraction is not None:
                kept[key.removesuffix(".weight")] = fraction
        for key in step.keys:
            if key not in written:
                for out_key, (path, info) in decoder.sources(ckpt, key).items():
                    sink.copy(out_key, path, info)
    return sum(specs[k].nbytes for k in step.keys)


def worker_count(device: torch.device, encoder: CastEncoder) -> int:
    """Steps run at once: on the CPU one per torch thread (up to MAX_WORKERS), each running its torch ops
    single-threaded; on an accelerator two (one reads and writes while the other computes). An encoder of whole
    tensors (NF4) gets one, with every torch thread: its temporaries are several times a weight's size."""
    if not encoder.row_wise:
        return 1
    return max(1, min(torch.get_num_threads(), MAX_WORKERS)) if device.type == "cpu" else 2


def run_steps(steps: Sequence[Step], run: Callable[[Step, Buffers], int], workers: int, progress: tqdm) -> None:
    """`run(step, buffers)` for every step on `workers` threads (each with its own Buffers), advancing `progress`
    by what each returns; the first failure cancels the steps not yet started and is raised here."""
    free: queue.SimpleQueue[Buffers] = queue.SimpleQueue()
    for _ in range(workers):
        free.put(Buffers())

    def task(step: Step) -> int:
        buffers = free.get()
        try:
            return run(step, buffers)
        finally:
            free.put(buffers)

    with ThreadPoolExecutor(workers, thread_name_prefix="adaptools-merge") as pool:
        futures = [pool.submit(task, step) for step in steps]
        try:
            for future in as_completed(futures):
                progress.update(future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def open_output(folder: Path, ckpt: BaseCheckpoint, encoder: CastEncoder, layout: Layout) -> OutputSink:
    """An output folder with the base's side files and its config.json (dtype set by the encoder), ready for shards."""
    folder.mkdir(parents=True, exist_ok=True)
    copy_side_files(ckpt.root, folder, skip=("config.json",))
    if (ckpt.root / "config.json").exists():
        config = json.dumps(encoder.update_config(ckpt.config), indent=2, sort_keys=True)
        (folder / "config.json").write_text(config + "\n")
    return OutputSink(folder, layout)


def _peak_rss() -> int:
    """Peak resident memory of this process in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@dataclass
class MergeReport:
    """What a merge wrote: output folders, modules merged per output, sizes, time and peak memory; for NF4
    outputs the weights stored quantized and, from an NF4 base, per output and module the fraction of ΔW that
    survives requantization (⟨deq(Q(W + ΔW)) − W, ΔW⟩ / ‖ΔW‖², W the dequantized base)."""

    outputs: dict[str, Path]
    modules: dict[str, int]
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss: int
    peak_device_memory: int | None
    device: str
    dtype: str | None
    quantized: int = 0
    survival: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The report as JSON-able data (paths as strings)."""
        data = asdict(self)
        data["outputs"] = {name: str(path) for name, path in self.outputs.items()}
        return data


AdapterLike = Adapter | str | os.PathLike


def load_adapters(adapters: AdapterLike | Iterable[AdapterLike], ckpt: BaseCheckpoint,
                  allow_pickle: bool) -> list[Adapter]:
    """Adapters from paths (PEFT or kohya) or as given; kohya names mapped to the base's module paths."""
    items = [adapters] if isinstance(adapters, (Adapter, str, os.PathLike)) else list(adapters)
    if not items:
        raise InvalidArgumentError("merge needs at least one adapter")
    loaded = []
    for item in items:
        adapter = item if isinstance(item, Adapter) else load_adapter(item, allow_pickle=allow_pickle)
        if any(name.startswith(PREFIXES) and f"{name}.weight" not in ckpt for name in adapter.modules):
            adapter = remap_to_base(adapter, ckpt.keys())
        loaded.append(adapter)
    return loaded


def base_mismatch(adapter: Adapter, ckpt: BaseCheckpoint, config: dict) -> str | None:
    """A warning when the adapter names a base model other than this one (compared by last path component)."""
    wanted = adapter.base_model
    have = [config.get("_name_or_path"), str(ckpt.root), str(ckpt.root.resolve())]

    def tail(name: str) -> str:
        return str(name).rstrip("/").rsplit("/", 1)[-1]

    if not wanted or any(h and (h == wanted or tail(h) == tail(wanted)) for h in have):
        return None
    shown = config.get("_name_or_path") or str(ckpt.root)
    return f"adapter {adapter.name or ''!r} was trained on {wanted!r}, but the base is {shown!r}"


def output_names(adapters: Sequence[Adapter]) -> list[str]:
    """Folder names for --each: the adapters' names (adapter<i> when unnamed), which must differ."""
    names = [a.name or f"adapter{i}" for i, a in enumerate(adapters)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InvalidArgumentError(f"--each writes one folder per adapter name, and {_listed(twice)} occur twice")
    return names


def merge(base: str | os.PathLike | BaseCheckpoint, adapters: AdapterLike | Iterable[AdapterLike],
          weights: Sequence[float] | None = None, *, out: str | os.PathLike, dtype: str | torch.dtype | None = None,
          double_quant: bool | None = None, device: str | torch.device = "auto", overwrite: bool = False,
          each: bool = False, max_shard_size: str | int | None = None, allow_pickle: bool = False,
          batch_bytes: int | None = None, progress: bool = False) -> MergeReport:
    """Merge adapters into a base checkpoint folder, streaming shard by shard: W' = W + Σ_i w_i·s_i·B_i@A_i.

    Args:
        base: a Hugging Face folder (model.safetensors, or shards + index) of fp16/bf16/fp32 weights, or a
            bitsandbytes NF4 checkpoint (its weights are dequantized, merged in float32 and requantized).
        adapters: PEFT folders, kohya files or Adapter objects (LoRA, rsLoRA, DoRA; linear, Conv1D, embedding, conv).
        weights: one factor per adapter (default 1): w·s·B@A for LoRA, V = W + w·s·B@A for DoRA (magnitudes
            kept); a full tensor T (modules_to_save) becomes W + w·(T − W).
        out: the output folder; with `each`, a folder holding one `<adapter name>/` per adapter.
        dtype: "fp16", "bf16" or "fp32" for every floating tensor (an NF4 base is then written dequantized);
            "nf4" quantizes the merged linear weights (adaptools.quantize's defaults; an NF4 base stays NF4 with
            each weight's own settings); default: keep each tensor's dtype (and an NF4 base's quantization).
        double_quant: for NF4 outputs of an unquantized base, quantize the block scales too (default True);
            with an NF4 base it must agree with the base's own setting.
        device: where the merge math runs ("auto": CUDA when available); the math is float32.
        overwrite: replace an existing output.
        each: one merged model per adapter from a single read of the base, instead of one with all adapters.
        max_shard_size: re-shard the output ("5GB", "200MB"); default: the base's own shard files.
        allow_pickle: allow .bin adapters (torch.load with weights_only=True).
        batch_bytes: float32 bytes of base weights merged per step (default 32 MiB on CPU, 256 MiB on CUDA).
        progress: show a tqdm bar (bytes of the base) on stderr.

    Raises UnknownModuleError / ShapeMismatchError before writing anything when the adapters do not fit the base,
    NonFiniteError (nothing left behind) when a merged tensor holds NaN/Inf or overflows the output dtype.
    A base other than the adapter's `base_model_name_or_path` gives a warning, and so does an NF4 base whose
    requantization erases most of some modules' updates (MergeReport.survival).
    """
    from .nf4_checkpoint import checkpoint_codecs, survival_warnings  # nf4_checkpoint builds on this module

    start = time.perf_counter()
    target = check_output(out, overwrite)
    device = resolve_device(device)
    shard_bytes = None if max_shard_size is None else parse_size(max_shard_size)
    ckpt = base if isinstance(base, BaseCheckpoint) else BaseCheckpoint(base)
    config = ckpt.config
    decoder, encoder = checkpoint_codecs(ckpt, dtype, double_quant=double_quant, device=device)
    loaded = load_adapters(adapters, ckpt, allow_pickle)
    factors = check_weights(loaded, weights)
    specs = decoder.specs(ckpt)
    fitted = fit_adapters(loaded, specs, config.get("model_type"))
    for message in filter(None, (base_mismatch(a, ckpt, config) for a in loaded)):
        warnings.warn(message, stacklevel=2)
    if each:
        names = output_names(loaded)
        plans = [plan_output(n, [a], [w], device) for n, a, w in zip(names, fitted, factors)]
    else:
        plans = [plan_output(target.name, fitted, factors, device)]
    del loaded, fitted  # the plans hold the factors they need (float32, scale folded in)
    report = write_outputs(ckpt, specs, plans, decoder, encoder, target, each=each, device=device,
                           overwrite=overwrite, shard_bytes=shard_bytes, batch_bytes=batch_bytes, progress=progress)
    report.seconds = time.perf_counter() - start
    for message in survival_warnings(report):
        warnings.warn(message, stacklevel=2)
    return report


def write_outputs(ckpt: BaseCheckpoint, specs: dict[str, TensorSpec], plans: Sequence[OutputPlan],
                  decoder: StoredDecoder, encoder: CastEncoder, target: Path, *, each: bool, device: torch.device,
                  overwrite: bool, shard_bytes: int | None, batch_bytes: int | None, progress: bool,
                  desc: str = "merging") -> MergeReport:
    """One pass over the base: every output plan (no updates: the base re-encoded) written atomically to `target`
    (with `each`, to `target/<plan name>`), read through `decoder`, written through `encoder`."""
    start = time.perf_counter()
    batch_bytes = batch_bytes or BATCH_BYTES.get(device.type, BATCH_BYTES["cuda"])
    steps = plan_steps(specs, batch_bytes)
    layout = plan_layout(ckpt, steps, specs, encoder, shard_bytes)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    total = sum(s.nbytes for s in specs.values())
    survival: list[dict[str, float]] = [{} for _ in plans]
    workers = worker_count(device, encoder)
    tile_elems = TILE_BYTES[device.type] // 4 if device.type in TILE_BYTES else None

    def run(step: Step, buffers: Buffers) -> int:
        return run_step(step, ckpt, specs, plans, sinks, decoder, encoder, device, buffers, tile_elems, survival)

    with atomic_output(target, overwrite=overwrite) as tmp:
        sinks = [open_output(tmp / plan.name if each else tmp, ckpt, encoder, layout) for plan in plans]
        try:
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                      disable=not progress, file=sys.stderr) as bar, \
                    torch_threads(1 if device.type == "cpu" and workers > 1 else None):
                run_steps(interleave_shards(steps, specs), run, workers, bar)
            for sink in sinks:
                sink.close(total_parameters=sum(s.numel for s in specs.values()))
        finally:
            for sink in sinks:
                sink.abort()
    return MergeReport(
        outputs={plan.name: target / plan.name if each else target for plan in plans},
        modules={plan.name: len(plan.updates) for plan in plans},
        tensors=len(specs),
        bytes_read=total,
        bytes_written=sum(s.total_size for s in sinks),
        seconds=time.perf_counter() - start,
        peak_rss=_peak_rss(),
        peak_device_memory=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        device=str(device),
        dtype=encoder.label,
        quantized=encoder.quantized,
        survival={plan.name: kept for plan, kept in zip(plans, survival) if kept},
    )
