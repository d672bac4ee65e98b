"""Streaming merge of LoRA/DoRA adapters into a base checkpoint (DESIGN §8): plan, validate, then one pass.

1. Validate before writing: every adapter module needs a base weight it fits (fan_in_fan_out resolved by shape),
   every LoRA bias a base bias, every full tensor a base tensor of its shape; all offenders are listed at once.
2. Steps: the base's tensors, shard by shard, grouped by (shape, dtype) into chunks of at most `batch_bytes`
   (as float32). Each step is read once and feeds every output (several adapters → several merged models).
3. Per output and step: the targeted weights, canonical (out, in), float32, on `device`, are stacked and merged
   with one `baddbmm`: W' = W + B·A with each module's scale and weight folded into B (several adapters: factors
   concatenated, rank Σr; ranks zero-padded to the largest of the batch); DoRA rows are then scaled by m/‖W'‖.
   Results are cast to the output dtype, checked finite and streamed into the output shards.

Hooks: a decoder turns stored base tensors into the tensors that are merged (`StoredDecoder`: as stored) and an
encoder turns results into stored output tensors (`CastEncoder`: a cast). An NF4 base or output plugs in there
(adaptools.nf4_checkpoint: dequantize → merge in float32 → requantize), and `write_outputs` also serves
`adaptools.quantize` (no adapters, an NF4 encoder).
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .adapter import Adapter, LoraModule
from .atomic import atomic_output, check_output
from .combine import check_weights, combined_bias, concat_factors, plan_terms
from .device import resolve_device
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
    WriteQueue,
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


def dora_merge_rows(W: Tensor, B: Tensor, A: Tensor, magnitude: Tensor, *, inplace: bool = False) -> Tensor:
    """PEFT's DoRA merge W' = (m / ‖V‖_row) ⊙ V with V = W + B @ A, canonical (out, in) or (b, out, in), scale in B.

    `magnitude` is (out,) or (b, out); a row with ‖V‖ = 0 stays 0. With `inplace`, W is overwritten by W'.
    """
    V = lora_merge(W, B, A, inplace=inplace)
    norms = torch.linalg.vector_norm(V, dim=-1)
    gain = torch.where(norms > 0, magnitude / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)
    return V.mul_(gain.unsqueeze(-1))


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

    def read(self, ckpt: BaseCheckpoint, key: str, out: Tensor | None = None) -> Tensor:
        """The tensor to merge, read into `out` (a reusable uint8 buffer of >= spec.nbytes) when given."""
        return ckpt.get(key, out)

    def sources(self, ckpt: BaseCheckpoint, key: str) -> dict[str, tuple[Path, TensorInfo]]:
        """Where the stored bytes of `key` lie, per output key, for outputs that keep it unchanged (copied file to
        file)."""
        return {key: (ckpt.path(key), ckpt.info(key))}


class CastEncoder:
    """Output tensors written as plain entries, floating ones in `dtype` (None keeps each base tensor's dtype)."""

    quantized = 0
    """Weights each output stores quantized."""

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
    """One output's change to one base weight, canonical (out, in): W' = W + B @ A, then DoRA's row scaling."""

    layout: LoraModule
    B: Tensor
    A: Tensor
    magnitude: Tensor | None = None


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
    """One output's updates: per module the weighted terms concatenated (rank Σr), factors on `device` in float32."""
    updates: dict[str, Update] = {}
    biases: dict[str, Tensor] = {}
    for module_name, terms in plan_terms(adapters, weights).items():
        first = terms[0].module
        if len(terms) > 1 and any(t.module.is_dora for t in terms):
            raise DoraError(
                f"module {module_name!r} gets a DoRA update and others in one output; merge them one after another "
                "or use --each"
            )
        B, A = concat_factors(terms)
        magnitude = None if first.magnitude is None else first.magnitude.float().to(device)
        updates[f"{module_name}.weight"] = Update(first, B.to(device), A.to(device), magnitude)
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


def plan_layout(ckpt: BaseCheckpoint, steps: Sequence[Step], specs: dict[str, TensorSpec], encoder: CastEncoder,
                max_shard_bytes: int | None) -> Layout:
    """The base's own shard files (default: an output key stays in its base shard, a new one goes to its tensor's),
    or new shards of at most `max_shard_bytes` in write order."""
    units = [(encoder.entries(key, specs[key]), specs[key].shard) for step in steps for key in step.keys]
    if max_shard_bytes is None:
        files: dict[str, list[str]] = {shard: [] for shard in ckpt.shards}
        for entries, shard in units:
            for key in entries:
                files[ckpt.weight_map.get(key, shard)].append(key)
        files = {name: keys for name, keys in files.items() if keys}
        return Layout(files, ckpt.indexed or len(files) > 1)
    groups = plan_shards([(list(entries), sum(entries.values())) for entries, _ in units], max_shard_bytes)
    return Layout(dict(zip(shard_names(len(groups)), groups)), len(groups) > 1)


# --------------------------------------------------------------------------- execution


class Workspace:
    """Buffers reused from step to step (a fresh large allocation faults in every page again), two slots per role
    used in turn: while the writer thread still reads one slot's results, the next step fills the other.
    With `pin`, CPU buffers are page-locked (faster copies to and from a CUDA device).

    A slot is handed out again only once the writes queued while it was last in use are done.
    """

    SLOTS = 2

    def __init__(self, queue: WriteQueue | None = None, pin: bool = False) -> None:
        self.queue = queue
        self.pin = pin
        self._buffers: dict[tuple[str, torch.device, int], Tensor] = {}
        self._busy: dict[tuple[str, torch.device, int], Future | None] = {}
        self._turn: dict[tuple[str, torch.device], int] = {}

    def take(self, role: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
        """An uninitialised tensor of `shape` and `dtype` in the next slot of `role`."""
        device = torch.device(device)
        previous = self._turn.get((role, device))
        if previous is not None and self.queue is not None:
            self._busy[(role, device, previous)] = self.queue.last
        slot = 0 if previous is None else (previous + 1) % self.SLOTS
        self._turn[(role, device)] = slot
        key = (role, device, slot)
        if self.queue is not None:
            self.queue.wait(self._busy.pop(key, None))
        nbytes = math.prod(shape) * dtype.itemsize
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < nbytes:
            self._buffers.pop(key, None)
            pin = self.pin and device.type == "cpu"
            buffer = self._buffers[key] = torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=pin)
        return buffer[:nbytes].view(dtype).view(tuple(shape))

    def take_packed(self, role: str, sizes: Sequence[int]) -> list[Tensor]:
        """CPU uint8 slices of `sizes` bytes in one `role` buffer, each starting 64-byte aligned."""
        starts = [0]
        for size in sizes:
            starts.append(starts[-1] + -(-size // 64) * 64)
        buffer = self.take(role, (starts[-1],), torch.uint8)
        return [buffer[start:start + size] for start, size in zip(starts, sizes)]


def check_range(names: Sequence[str], values: Tensor, dtype: torch.dtype) -> None:
    """NonFiniteError naming the stacked tensors (b, ...) that hold NaN/Inf or values beyond the range of `dtype`.

    Fast pass: ‖x‖_F per tensor; when it is finite and below the dtype's largest value, so is every |x_i|.
    Tensors failing it get the exact test: max |x| cast to `dtype` overflows exactly when some element does.
    """
    if values.numel() == 0 or not values.is_floating_point():
        return
    flat = values.reshape(len(names), -1)
    norms = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float32)
    suspects = (~(norms < torch.finfo(dtype).max)).nonzero().flatten().tolist()
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
                  workspace: Workspace) -> Iterator[tuple[str, Tensor]]:
    """(key, merged weight in its stored layout, `dtype`, CPU), one baddbmm per canonical shape.

    The results live in `workspace` buffers: consume each before asking for the next group's.
    """
    groups = group_by({k: (u.B.shape[0], u.A.shape[1], u.magnitude is not None) for k, u in updates.items()})
    for (out, inp, dora), keys in groups.items():
        ranks = {updates[k].A.shape[0] for k in keys}
        W = workspace.take("merge", (len(keys), out, inp), torch.float32, device)
        B = workspace.take("B", (len(keys), out, max(ranks)), torch.float32, device)
        A = workspace.take("A", (len(keys), max(ranks), inp), torch.float32, device)
        if len(ranks) > 1:  # zero-pad the smaller ranks
            B.zero_()
            A.zero_()
        for j, key in enumerate(keys):
            u = updates[key]
            W[j].copy_(u.layout.from_base_layout(bases[key]))
            B[j, :, : u.A.shape[0]] = u.B
            A[j, : u.A.shape[0]] = u.A
        if dora:
            dora_merge_rows(W, B, A, torch.stack([updates[k].magnitude for k in keys]), inplace=True)
        else:
            lora_merge(W, B, A, inplace=True)
        check_range(keys, W, dtype)
        cast = W if dtype == torch.float32 else workspace.take("cast", W.shape, dtype, device).copy_(W)
        if cast.device.type != "cpu":
            cast = workspace.take("host", cast.shape, dtype).copy_(cast)
        for j, key in enumerate(keys):
            yield key, updates[key].layout.to_base_layout(cast[j])


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
               encoder: CastEncoder, device: torch.device, workspace: Workspace) -> Iterator[tuple[str, Tensor]]:
    """(key, tensor in the encoder's dtype) for the step's tensors that this output changes or casts.

    The others are kept as stored. Each yielded tensor must be written before the next is asked for.
    """
    dtype = encoder.dtype_for(specs[step.keys[0]])
    current = {k: t for k, t in stored.items() if k in step.keys}
    changed = {}
    for key in current:
        value = changed_value(key, stored[key], plan)
        if value is not None:
            current[key] = changed[key] = value
    updates = {k: plan.updates[k] for k in step.keys if k in plan.updates}
    yield from merge_weights(updates, current, dtype, device, workspace)
    for key in step.keys:
        if key not in updates and (key in changed or not encoder.keeps(key, specs[key])):
            check_range([key], current[key].unsqueeze(0), dtype)
            yield key, current[key].to(dtype)


def run_step(step: Step, ckpt: BaseCheckpoint, specs: dict[str, TensorSpec], plans: Sequence[OutputPlan],
             sinks: Sequence[OutputSink], decoder: StoredDecoder, encoder: CastEncoder, device: torch.device,
             workspace: Workspace, survival: Sequence[dict[str, float]]) -> None:
    """Read the step's tensors that some output changes or casts (once), merge them per output, write everything;
    the encoder's survival of each merged weight goes into `survival` (one dict per output)."""
    needed = [k for k in step.keys if not encoder.keeps(k, specs[k]) or any(plan.changes(k) for plan in plans)]
    buffers = workspace.take_packed("stored", [specs[k].nbytes for k in needed])
    stored = {k: decoder.read(ckpt, k, buffer) for k, buffer in zip(needed, buffers)}
    for plan, sink, kept in zip(plans, sinks, survival):
        written = set()
        for key, tensor in merge_step(step, stored, specs, plan, encoder, device, workspace):
            encoded = encoder.encode(key, tensor)
            sink.write(encoded)
            written.add(key)
            fraction = encoder.survival(key, stored[key], tensor, encoded) if key in plan.updates else None
            if fraction is not None:
                kept[key.removesuffix(".weight")] = fraction
        for key in step.keys:
            if key not in written:
                for out_key, (path, info) in decoder.sources(ckpt, key).items():
                    sink.copy(out_key, path, info)


def open_output(folder: Path, ckpt: BaseCheckpoint, encoder: CastEncoder, layout: Layout,
                queue: WriteQueue) -> OutputSink:
    """An output folder with the base's side files and its config.json (dtype set by the encoder), ready for shards."""
    folder.mkdir(parents=True, exist_ok=True)
    copy_side_files(ckpt.root, folder, skip=("config.json",))
    if (ckpt.root / "config.json").exists():
        config = json.dumps(encoder.update_config(ckpt.config), indent=2, sort_keys=True)
        (folder / "config.json").write_text(config + "\n")
    return OutputSink(folder, layout, queue)


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
    with atomic_output(target, overwrite=overwrite) as tmp:
        queue = WriteQueue(max_pending=2 * batch_bytes)
        sinks = [open_output(tmp / plan.name if each else tmp, ckpt, encoder, layout, queue) for plan in plans]
        workspace = Workspace(queue, pin=device.type == "cuda")
        try:
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                      disable=not progress, file=sys.stderr) as bar:
                for step in steps:
                    run_step(step, ckpt, specs, plans, sinks, decoder, encoder, device, workspace, survival)
                    bar.update(sum(specs[k].nbytes for k in step.keys))
            for sink in sinks:
                sink.close(total_parameters=sum(s.numel for s in specs.values()))
        finally:
            queue.close()
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
