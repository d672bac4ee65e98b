"""Merge planning: which base tensors each output changes and how (validated before anything is written), the
steps the base is read in, and the output files' layout.
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ..adapter import Adapter, LoraModule, combined_bias, concat_factors, plan_terms
from ..errors import BaseMismatchError, DoraError, InvalidArgumentError, ShapeMismatchError, UnknownModuleError
from ..formats import ia3
from ..sources import cached_repo_id, resolve
from ..sources import load as load_adapter
from ..checkpoints import Container
from ..checkpoints.safetensors_io import DTYPE_NAMES
from ..checkpoints.names import NameMap
from ..checkpoints.shards import Layout
from ..formats.kohya import PREFIXES, remap_to_base
from ..ia3 import IA3Adapter
from ..linalg import group_by
from ..checkpoints.stored import CONV1D_MODEL_TYPES, MERGEABLE_DTYPES, CastEncoder, TensorSpec
from ..names import listed, plain_name
from .kernels import Block, DoraUpdate, LoraUpdate, ScaleUpdate, Update, row_blocks


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

    A linear update fits a weight (out, in), a fan_in_fan_out weight (in, out) (GPT-2's Conv1D) or a convolution
    (out, c, *kernel) with c·prod(kernel) = in (a 1x1 one, or conv factors stored flattened, as LoHa and LoKr
    store them); a square weight is ambiguous and takes `square_transposed`.
    """
    if module.kind != "linear":
        return module if module.weight_shape == tuple(shape) else None
    out, inp = module.out_features, module.in_features
    if len(shape) > 2 and shape[0] == out and math.prod(shape[1:]) == inp:
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


@dataclass
class FittedIA3:
    """An IA3 adapter laid out for the base: per base tensor it scales (weights, and biases on the output side) the
    vector on the tensor's 2-D view and whether it scales columns."""

    adapter: IA3Adapter
    scalings: dict[str, tuple[Tensor, bool]]

    @property
    def extra(self) -> dict[str, Tensor]:
        return self.adapter.extra


def fit_ia3(adapter: IA3Adapter, specs: dict[str, TensorSpec], model_type: str | None, missing: list[str],
            misfit: list[str]) -> FittedIA3:
    """Each IA3 vector on its base weight (and bias): orientation by shape, a square weight by PEFT's fan_in_fan_out
    flag or a Conv1D architecture; problems are appended to `missing` / `misfit`."""
    scalings: dict[str, tuple[Tensor, bool]] = {}
    conv1d = model_type in CONV1D_MODEL_TYPES
    for name, module in adapter.items():
        spec, bias = specs.get(f"{name}.weight"), specs.get(f"{name}.bias")
        fit = None if spec is None else module.on_weight(spec.shape, module.fan_in_fan_out or conv1d)
        if spec is None:
            missing.append(f"{name}.weight")
        elif fit is None:
            misfit.append(f"{name}: the IA3 vector has {len(module.vector)} values, the base weight is {spec.shape}")
        else:
            scalings[f"{name}.weight"] = fit
        if module.scales_bias and bias is not None and fit is not None:
            if bias.shape != tuple(module.vector.shape):
                misfit.append(f"{name}.bias: the IA3 vector has {len(module.vector)} values, the bias {bias.shape}")
            scalings[f"{name}.bias"] = (module.vector, False)
    return FittedIA3(adapter, scalings)


ROWS = "#rows:"
"""A module landing on a row block of a fused stored weight (or on a key not ending in `.weight`) is planned under
the name `<stored key>#rows:<start>:<stop>` (`<stored key>#rows:` for all of it)."""


def planned_name(key: str, rows: tuple[int, int] | None) -> str:
    """The planning name of a module whose update lands on `rows` of the stored `key` (all of it when None):
    `<module>` for a whole `<module>.weight`, else the key with its rows."""
    if rows is None and key.endswith(".weight"):
        return key.removesuffix(".weight")
    return f"{key}{ROWS}" + ("" if rows is None else f"{rows[0]}:{rows[1]}")


def stored_target(name: str) -> tuple[str, tuple[int, int] | None]:
    """(stored key, row block or None) of a planning name (`planned_name`'s inverse)."""
    if ROWS not in name:
        return f"{name}.weight", None
    key, _, rows = name.partition(ROWS)
    start, _, stop = rows.partition(":")
    return key, (int(start), int(stop)) if rows else None


def bias_key(key: str) -> str | None:
    """The stored bias beside stored weight `key` (`<m>.weight` → `<m>.bias`, OpenCLIP's `in_proj_weight` →
    `in_proj_bias`); None for a key not ending in `weight`."""
    return key.removesuffix("weight") + "bias" if key.endswith("weight") else None


def targeted(adapter: Adapter, names: NameMap, missing: list[str]) -> Adapter:
    """The adapter with its modules named by the stored weights they land in (`names`), rows in the stored order
    (a Target's `row_order` permutes B's rows: ΔW[order] = B[order]·A) and its full tensors by their stored keys;
    modules and tensors the container does not hold are added to `missing` (under the adapter's own names)."""
    modules: dict[str, LoraModule] = {}
    for name, module in adapter.items():
        target = names.target(name)
        if target is None:
            missing.append(f"{name}.weight")
            continue
        order = target.row_order
        if order is not None:
            module = replace(module, B=module.B[order],
                             magnitude=None if module.magnitude is None else module.magnitude[order],
                             bias=None if module.bias is None else module.bias[order])
        modules[planned_name(target.key, target.rows)] = module
    extra = {}
    for key, tensor in adapter.extra.items():
        stored = names.key(key)
        if stored is None:
            missing.append(f"{key} (a full tensor of the adapter)")
        else:
            extra[stored] = tensor
    return adapter.with_modules(modules, extra=extra)


def fit_adapters(adapters: Sequence[Adapter | IA3Adapter], specs: dict[str, TensorSpec], model_type: str | None,
                 names: NameMap | None = None) -> list[Adapter | FittedIA3]:
    """The adapters with every module laid out for its base weight (found through the container's `names`; by
    default keys `<module>.weight`); all missing or misfit tensors raise at once."""
    missing: list[str] = []
    misfit: list[str] = []
    unsupported: list[str] = []
    fitted_adapters: list[Adapter | FittedIA3] = []
    names = NameMap(specs) if names is None else names
    for adapter in adapters:
        if isinstance(adapter, Adapter):
            adapter = targeted(adapter, names, missing)
        lora = isinstance(adapter, Adapter)
        square = square_orientation(adapter, specs, model_type) if lora else False
        fitted: dict[str, LoraModule] = {}
        scaled = None if lora else fit_ia3(adapter, specs, model_type, missing, misfit)
        unsupported += [f"{key} ({DTYPE_NAMES.get(specs[key].dtype, specs[key].dtype)})"
                        for key in (scaled.scalings if scaled else ()) if specs[key].dtype not in MERGEABLE_DTYPES]
        for name, module in adapter.items() if lora else ():
            stored, rows = stored_target(name)
            spec = specs.get(stored)
            if spec is None:
                missing.append(stored)
                continue
            if spec.dtype not in MERGEABLE_DTYPES:
                unsupported.append(f"{stored} ({DTYPE_NAMES.get(spec.dtype, spec.dtype)})")
                continue
            shape = spec.shape if rows is None else (rows[1] - rows[0], *spec.shape[1:])
            fit = fit_module(module, shape, square) if rows is None or rows[1] <= spec.shape[0] else None
            if fit is None or (ROWS in name and fit.transposed):
                where = "" if rows is None else f" rows {rows[0]}..{rows[1]} of"
                misfit.append(f"{stored.removesuffix('.weight')}: the adapter needs {module.weight_shape}, the base has"
                              f"{where} {spec.shape}" + (" (a fused slice takes no transposed layout)" if fit else ""))
                continue
            fitted[name] = fit
            if module.bias is not None:
                key = bias_key(stored)
                bias = None if key is None else specs.get(key)
                height = module.out_features if rows is None else spec.shape[0]  # a slice's bias: rows of the fused
                if bias is None:
                    missing.append(f"{key or stored} (for the LoRA bias)")
                elif bias.shape != (height,):
                    misfit.append(f"{key}: the LoRA bias has {module.out_features} values"
                                  f"{'' if rows is None else f' for rows {rows[0]}..{rows[1]}'}, the base {bias.shape}")
                elif bias.dtype not in MERGEABLE_DTYPES:
                    unsupported.append(f"{key} ({DTYPE_NAMES.get(bias.dtype, bias.dtype)})")
        for key, tensor in adapter.extra.items():
            spec = specs.get(key)
            if spec is None:
                missing.append(f"{key} (a full tensor of the adapter)")
            elif tuple(tensor.shape) != spec.shape:
                misfit.append(f"{key}: the adapter's full tensor is {tuple(tensor.shape)}, the base's {spec.shape}")
            elif spec.dtype not in MERGEABLE_DTYPES:
                unsupported.append(f"{key} ({DTYPE_NAMES.get(spec.dtype, spec.dtype)})")
        fitted_adapters.append(adapter.with_modules(fitted) if scaled is None else scaled)
    if missing:
        raise UnknownModuleError(
            f"{len(missing)} tensor(s) the adapters change are not in the base: {listed(missing)}"
        )
    if misfit:
        raise ShapeMismatchError(f"{len(misfit)} adapter tensor(s) do not fit the base: {listed(misfit, 3)}")
    if unsupported:
        raise BaseMismatchError(
            f"{len(unsupported)} base tensor(s) the adapters change are stored in a dtype the merge cannot handle "
            f"(it merges fp16, bf16, fp32, fp64 and bitsandbytes NF4): {listed(unsupported)}"
        )
    return fitted_adapters


def plan_output(name: str, adapters: Sequence[Adapter | FittedIA3], weights: Sequence[float],
                device: torch.device, specs: Mapping[str, TensorSpec]) -> OutputPlan:
    """One output's updates: per module the weighted terms concatenated (rank Σr), laid out for the base weight's
    2-D view, factors on `device` in float32; modules on row blocks of a fused weight (DoRA ones included) as one
    row-block update of it; LoRA biases summed into the stored biases' rows (Σ w·s·b); an IA3 adapter's vectors as
    scalings of its weights and biases."""
    updates: dict[str, Update] = {}
    biases: dict[str, Tensor] = {}
    blocks: dict[str, list[Block]] = {}
    lora = [(a, w) for a, w in zip(adapters, weights) if isinstance(a, Adapter)]
    for module_name, terms in plan_terms([a for a, _ in lora], [w for _, w in lora]).items():
        first = terms[0].module
        if len(terms) > 1 and any(t.module.is_dora for t in terms):
            raise DoraError(
                f"module {module_name!r} gets a DoRA update and others in one output; merge them one after another "
                "or use --each"
            )
        L, R = (f.to(device) for f in first.base_factors(*concat_factors(terms)))
        magnitude = None if first.magnitude is None else first.magnitude.float().to(device)
        stored, rows = stored_target(module_name)
        bias = combined_bias(terms, torch.float32)
        if bias is not None:
            key = bias_key(stored)
            total = biases.setdefault(key, torch.zeros(specs[key].shape[0]))
            total[slice(None) if rows is None else slice(*rows)] += bias
        if rows is not None:
            blocks.setdefault(stored, []).append(Block(rows, L, R, magnitude))
        else:
            updates[stored] = LoraUpdate(L, R) if magnitude is None else DoraUpdate(L, R, magnitude, first.transposed)
    for key, parts in blocks.items():  # fused weights: one row-block update each, a whole-weight update included
        whole = updates.pop(key, None)
        if isinstance(whole, DoraUpdate) and whole.columns:
            raise DoraError(f"{key!r} gets a transposed DoRA update and updates of its fused slices in one output; "
                            "merge them one after another or use --each")
        if whole is not None:
            magnitude = whole.magnitude if isinstance(whole, DoraUpdate) else None
            parts.append(Block((0, whole.L.shape[0]), whole.L, whole.R, magnitude))
        for dora, other in itertools.permutations(parts, 2):
            if dora.magnitude is not None and dora.rows[0] < other.rows[1] and other.rows[0] < dora.rows[1]:
                raise DoraError(f"{key!r} gets a DoRA update of rows {dora.rows[0]}..{dora.rows[1]} and another update "
                                "of those rows in one output; merge them one after another or use --each")
        updates[key] = row_blocks(parts)
    for fitted, weight in zip(adapters, weights):
        if isinstance(fitted, FittedIA3):
            plan_ia3(fitted, weight, updates, biases, device)
    full: dict[str, list[tuple[float, Tensor]]] = {}
    for adapter, weight in zip(adapters, weights):
        for key, tensor in adapter.extra.items():
            full.setdefault(key, []).append((weight, tensor))
    return OutputPlan(name, updates, biases, full)


def plan_ia3(fitted: FittedIA3, weight: float, updates: dict[str, Update], biases: dict[str, Tensor],
             device: torch.device) -> None:
    """Add an IA3 adapter's scalings to one output's updates; it takes weight 1 and no other update of its tensors."""
    if weight != 1.0:
        raise InvalidArgumentError(f"an IA3 adapter scales weights by its vectors and takes no weight (got {weight:g})")
    for key, (vector, columns) in fitted.scalings.items():
        if key in updates or key in biases:
            raise InvalidArgumentError(
                f"{key!r} gets an IA3 scaling and another update in one output; merge them one after another "
                "or use --each"
            )
        updates[key] = ScaleUpdate(vector.float().to(device), columns)


def plan_steps(specs: dict[str, TensorSpec], batch_bytes: int) -> list[Step]:
    """Steps in shard order: same-shape, same-dtype tensors of a shard in chunks of <= batch_bytes (float32)."""
    steps = []
    for keys in group_by({k: (s.shard, s.shape, s.dtype) for k, s in specs.items()}).values():
        per = max(1, batch_bytes // max(1, 4 * specs[keys[0]].numel))
        steps += [Step(tuple(keys[i:i + per])) for i in range(0, len(keys), per)]
    return steps


def mixed_order(steps: Sequence[Step]) -> list[Step]:
    """The steps in an order fixed by their key names alone (sha256 of the first key): the base's parts come mixed,
    so that whatever an adapter changes is spread through the run instead of coming in one stretch (an SDXL file
    holds its text encoders first, and a LoRA mostly changes the UNet): the processors (products) and the disk
    (copies) are then busy together. The order depends on the base alone, so `--each` and batch groups write
    what single merges write."""
    return sorted(steps, key=lambda step: hashlib.sha256(step.keys[0].encode()).digest())


def interleave_shards(steps: Sequence[Step], specs: dict[str, TensorSpec], width: int = 2) -> list[Step]:
    """The steps of `width` shards at a time taken in turn (each shard's in order; a shard whose steps run out is
    replaced by the next): steps running at once mostly write different output files (a file takes one buffered
    write at a time), and only about `width` files are written at once (each holds its partly filled direct-I/O
    blocks)."""
    waiting = collections.deque(group_by({step: specs[step.keys[0]].shard for step in steps}).values())
    active = [collections.deque(waiting.popleft()) for _ in range(min(width, len(waiting)))]
    order = []
    while active:
        for turn in list(active):
            order.append(turn.popleft())
            if not turn:
                active.remove(turn)
                if waiting:
                    active.append(collections.deque(waiting.popleft()))
    return order


def plan_layout(ckpt: Container, steps: Sequence[Step], specs: dict[str, TensorSpec], encoder: CastEncoder,
                max_shard_bytes: int | None) -> Layout:
    """The output files of the container's kind for the encoder's entries, in write order."""
    units = [(encoder.entries(key, specs[key]), specs[key].shard) for step in steps for key in step.keys]
    return ckpt.plan_layout(units, max_shard_bytes)


AdapterLike = Adapter | str | os.PathLike


def load_adapters(adapters: AdapterLike | Iterable[AdapterLike], ckpt: Container,
                  allow_pickle: bool) -> list[Adapter]:
    """Adapters from paths (PEFT or kohya) or as given; kohya names mapped to the base's module paths."""
    items = [adapters] if isinstance(adapters, (Adapter, IA3Adapter, str, os.PathLike)) else list(adapters)
    if not items:
        raise InvalidArgumentError("merge needs at least one adapter")
    loaded: list[Adapter | IA3Adapter] = []
    for item in items:
        if isinstance(item, (Adapter, IA3Adapter)):
            adapter = item
        else:
            local = resolve(item, "adapter", allow_pickle=allow_pickle)
            reader = ia3.read_ia3 if ia3.detect(local) else load_adapter
            adapter = reader(local, allow_pickle=allow_pickle)
        if isinstance(adapter, Adapter) and any(name.startswith(PREFIXES) and ckpt.names.target(name) is None
                                                for name in adapter.modules):
            adapter = remap_to_base(adapter, ckpt.names.kohya_names())
        loaded.append(adapter)
    return loaded


MODEL_SUFFIX = re.compile(r"([-_. ](gguf|f32|f16|bf16|i?q\d\w*|tq\d\w*))*(-\d{5}-of-\d{5})?(\.gguf)?$")
"""What a model's file or repo name may add to the model's name: a split part, `.gguf`, GGUF and type tags."""


def comparable(name: str) -> str:
    """A model name as base names are compared: its last path component without GGUF and type suffixes, lower
    case, letters and digits only (`HuggingFaceTB/SmolLM2-135M-Instruct` = `SmolLM2 135M Instruct` =
    `smollm2-135m-instruct-q4_k_m.gguf`)."""
    tail = str(name).rstrip("/").rsplit("/", 1)[-1].lower()
    return re.sub(r"[^a-z0-9]", "", MODEL_SUFFIX.sub("", tail))


def base_mismatch(adapter: Adapter, ckpt: Container, config: dict) -> str | None:
    """A warning when the adapter names a base model other than this one (names compared by `comparable`). A
    container listing its own names (`_aliases`: GGUF metadata) is compared with those only, and not at all when it
    lists none."""
    wanted = adapter.base_model
    aliases = config.get("_aliases")
    if aliases is None:
        have = [config.get("_name_or_path"), str(ckpt.root), str(ckpt.root.resolve()), cached_repo_id(ckpt.root)]
    else:
        have = [*aliases, cached_repo_id(ckpt.root)] if aliases else []
    if not wanted or not any(have) or any(h and comparable(h) == comparable(wanted) for h in have):
        return None
    shown = config.get("_name_or_path") or str(ckpt.root)
    return f"adapter {adapter.name or ''!r} was trained on {wanted!r}, but the base is {shown!r}"


def output_names(adapters: Sequence[Adapter]) -> list[str]:
    """Folder names for --each: the adapters' names (adapter<i> when unnamed), which must differ."""
    names = [a.name or f"adapter{i}" for i, a in enumerate(adapters)]
    for name in names:
        plain_name(name, "--each output folder (the adapter's name)", InvalidArgumentError)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InvalidArgumentError(f"--each writes one folder per adapter name, and {listed(twice)} occur twice")
    return names


