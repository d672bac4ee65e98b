"""mlx-lm adapters (adapters.safetensors + adapter_config.json) and mlx-examples' older adapters.npz (DESIGN §11).

mlx-lm computes y = W x + scale·(x·lora_a)·lora_b with `lora_a` (in, r) and `lora_b` (r, out), so
ΔW = scale·(lora_a @ lora_b)ᵀ: A = lora_aᵀ, B = lora_bᵀ, and `scale` is a literal multiplier
(`lora_parameters.scale`; mlx-lm has no alpha). DoRA (`fine_tune_type: dora`) adds the per-row magnitude `<path>.m`,
PEFT's magnitude. Module paths are mlx-lm's parameter paths (`model.layers.0.self_attn.q_proj`), the base
checkpoint's keys without `.weight` for the models mlx-lm converts from Hugging Face without renaming.
"""
from __future__ import annotations

import json
import math
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..adapter import Adapter, LoraModule
from ..bounds import archive_limit
from ..digests import reading
from ..errors import AdapterFormatError, UnsupportedAdapterError
from ..jsonio import check_fields, finite_number, json_object, positive_int, read_json_object, string
from .layout import uniform_rank
from .folders import group_by_role, weights_in
from .tensors import check_magnitude, check_stored, read_safetensors, safetensors_header, write_safetensors

NAME = "mlx"
WRITES_FILE = False
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapters.safetensors"
NPZ_NAME = "adapters.npz"
ROLES = {".lora_a": "a", ".lora_b": "b", ".m": "m"}
EMBEDDING_NAMES = ("embed_tokens", "wte", "tok_embeddings", "word_embeddings")
"""Last path components of the embeddings mlx-lm's LoRAEmbedding adapts (lora_a is (num_embeddings, r))."""
LAYER_PATH = re.compile(r"^(.*\.)?layers\.\d+\.(.+)$")


def is_mlx_config(config: Path) -> bool:
    """True for mlx-lm's adapter_config.json (it has `lora_parameters` or `fine_tune_type`, no `peft_type`)."""
    try:
        value = read_json_object(config, AdapterFormatError)
    except AdapterFormatError:
        return False
    return isinstance(value, dict) and "peft_type" not in value and bool({"lora_parameters", "fine_tune_type"} & set(value))


def weights_of(path: Path) -> Path | None:
    """The tensor file of an mlx adapter folder (adapters.safetensors, else adapters.npz) or the file itself."""
    return weights_in(path, (WEIGHTS_NAME, NPZ_NAME))


def detect(path: Path) -> bool:
    """An mlx-lm folder or file: mlx's adapter_config.json, adapters.safetensors/.npz, or `.lora_a`/`.lora_b` keys."""
    folder = path if path.is_dir() else path.parent
    if (folder / CONFIG_NAME).exists():
        return is_mlx_config(folder / CONFIG_NAME)
    weights = weights_of(path)
    if weights is None:
        return False
    if weights.suffix == ".npz":
        return True
    header = safetensors_header(weights)
    return header is not None and any(k.endswith((".lora_a", ".lora_b")) for k in header[0])


def npz_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> np.ndarray:
    """One array of an .npz archive: its .npy header read first, and its declared shape × itemsize checked against the
    member's size before the data is decompressed."""
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(member)
        if dtype.hasobject:
            raise ValueError(f"member {info.filename!r} holds Python objects (pickle)")
        need = math.prod(shape) * dtype.itemsize + member.tell()
        if need != info.file_size:
            raise ValueError(f"member {info.filename!r} declares shape {shape} of {dtype} ({need:,} bytes with its "
                             f"header) but the archive records {info.file_size:,} bytes for it")
    with archive.open(info) as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def read_npz(path: Path) -> dict[str, Tensor]:
    """The arrays of a numpy .npz archive, without pickle (object arrays are refused), after checking that the
    members decompress to no more than adaptools.bounds allows for the archive's size."""
    try:
        with reading(path), zipfile.ZipFile(path) as archive:
            infos = [info for info in archive.infolist() if not info.is_dir()]
            total, limit = sum(i.file_size for i in infos), archive_limit(path.stat().st_size)
            if total > limit:
                raise AdapterFormatError(
                    f"{str(path)!r}: its members decompress to {total:,} bytes, more than {limit:,} for an archive of "
                    f"{path.stat().st_size:,} bytes (adaptools.bounds): a compression bomb?")
            arrays = {info.filename.removesuffix(".npy"): npz_member(archive, info, path) for info in infos}
            return {key: torch.from_numpy(np.ascontiguousarray(array)) for key, array in arrays.items()}
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as exc:
        raise AdapterFormatError(f"{str(path)!r} is not a readable numpy .npz archive: this file is truncated or corrupt ({exc})") from exc
    except (ValueError, OSError, NotImplementedError) as exc:
        raise AdapterFormatError(f"{str(path)!r} is not a numpy .npz archive of plain arrays ({exc})") from exc


def mlx_module(name: str, parts: dict[str, Tensor], scale: float, rank: int | None) -> LoraModule:
    """One module from lora_a (in, r), lora_b (r, out) and DoRA's m (out,): A = lora_aᵀ, B = lora_bᵀ."""
    if "a" not in parts or "b" not in parts:
        raise AdapterFormatError(f"mlx module {name!r} lacks lora_a or lora_b")
    a, b = parts["a"], parts["b"]
    if a.ndim == 3 or b.ndim == 3:
        raise UnsupportedAdapterError(
            f"mlx module {name!r} is a LoRASwitchLinear (one LoRA per MoE expert, lora_a {tuple(a.shape)}): "
            "adaptools reads one LoRA per weight"
        )
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise AdapterFormatError(
            f"mlx module {name!r}: lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} are not (in, r) and (r, out)"
        )
    if rank is not None and a.shape[1] != rank:
        raise AdapterFormatError(f"mlx module {name!r} has rank {a.shape[1]} but lora_parameters.rank is {rank}")
    kind = "embedding" if name.rsplit(".", 1)[-1] in EMBEDDING_NAMES else "linear"
    magnitude = parts.get("m")
    if a.shape[1] == 0:
        raise AdapterFormatError(f"mlx module {name!r} has rank 0 (an empty update)")
    check_stored(name, "lora_a", a)
    check_stored(name, "lora_b", b)
    if magnitude is not None:
        magnitude = magnitude.reshape(-1)
        check_magnitude(name, magnitude, ".m")
    return LoraModule(A=a.T.contiguous(), B=b.T.contiguous(), scale=scale, kind=kind, magnitude=magnitude)


def read_config(folder: Path) -> dict:
    """mlx-lm's adapter_config.json ({} when there is none); a full fine-tune is refused."""
    path = folder / CONFIG_NAME
    if not path.exists():
        return {}
    config = read_json_object(path, AdapterFormatError)
    kind = config.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise UnsupportedAdapterError(
            f"{str(path)!r}: fine_tune_type {kind!r} is a full fine-tune (whole weights), not a LoRA adapter"
        )
    json_object(config.get("lora_parameters", {}), "lora_parameters", str(path), AdapterFormatError)
    check_fields(config, {"model": string}, str(path), AdapterFormatError, nullable=("model",))
    check_fields(config["lora_parameters"] if "lora_parameters" in config else {},
                 {"rank": positive_int, "scale": finite_number}, f"{path}: lora_parameters", AdapterFormatError)
    return config


def read(path: Path, *, allow_pickle: bool = False, scale: float | None = None, alpha: float | None = None) -> Adapter:
    """An mlx-lm adapter; the scale is `lora_parameters.scale`, or `scale` where no config records it (.npz)."""
    folder = path if path.is_dir() else path.parent
    config = read_config(folder)
    weights = weights_of(path)
    if weights is None:
        raise AdapterFormatError(f"{str(folder)!r} has mlx-lm's {CONFIG_NAME} but no {WEIGHTS_NAME} or {NPZ_NAME}")
    params = config.get("lora_parameters", {})
    if config and "scale" in params:
        scale = float(params["scale"])
    elif scale is None:
        what = "a numpy .npz archive" if weights.suffix == ".npz" else f"an mlx-lm {weights.name}"
        where = f"{CONFIG_NAME} has no lora_parameters.scale" if config else f"mlx records it in {CONFIG_NAME}, missing here"
        raise AdapterFormatError(
            f"{str(weights)!r} is {what} without a scale ({where}): pass --scale (scale=...) with the scale it was "
            "trained with"
        )
    rank = params.get("rank")
    tensors = read_npz(weights) if weights.suffix == ".npz" else read_safetensors(weights)[0]
    grouped = group_by_role(weights, tensors, ROLES, "an mlx adapter")
    modules = {name: mlx_module(name, parts, float(scale), rank) for name, parts in grouped.items()}
    dora = [m.is_dora for m in modules.values()]
    if config and any(dora) != (config.get("fine_tune_type") == "dora"):
        raise AdapterFormatError(
            f"{str(folder / CONFIG_NAME)!r} says fine_tune_type {config.get('fine_tune_type', 'lora')!r} but the "
            f"weights {'have' if any(dora) else 'lack'} DoRA magnitudes (.m)"
        )
    adapter = Adapter(modules=modules, config=config, source_format=NAME, name=folder.name, base_model=config.get("model"))
    adapter.check_finite()
    return adapter


def layer_keys(adapter: Adapter) -> list[str]:
    """mlx-lm's `lora_parameters.keys`: module paths inside a transformer block (`self_attn.q_proj`)."""
    keys = set()
    for name, m in adapter.items():
        match = LAYER_PATH.match(name)
        if match is None:
            raise AdapterFormatError(
                f"module {name!r}: mlx-lm applies adapters inside the transformer layers (`layers.N.`) only"
            )
        if m.kind != "linear" or m.fan_in_fan_out or m.bias is not None:
            what = "a conv" if m.kind == "conv" else ("an embedding" if m.kind == "embedding" else
                                                      ("a LoRA bias" if m.bias is not None else "a fan_in_fan_out layer"))
            raise AdapterFormatError(f"module {name!r}: mlx-lm adapters cannot hold {what}; use --to peft")
        keys.add(match.group(2))
    return sorted(keys)


def write(adapter: Adapter, folder: Path) -> None:
    """An mlx-lm folder: one rank, scale 1.0 (each module's scale folded into lora_b), num_layers -1 (all layers;
    layers without a tensor here get lora_b = 0 in mlx-lm), `keys` naming the adapted block paths."""
    if adapter.extra:
        raise AdapterFormatError(f"mlx-lm adapters cannot hold full tensors ({', '.join(sorted(adapter.extra)[:3])}); use --to peft")
    dora = [m.is_dora for m in adapter.modules.values()]
    if any(dora) and not all(dora):
        raise AdapterFormatError("mlx-lm's fine_tune_type applies to every module, but only some modules are DoRA")
    keys = layer_keys(adapter)
    uniform = uniform_rank(adapter)
    state: dict[str, Tensor] = {}
    for name, m in uniform.items():
        state[f"{name}.lora_a"], state[f"{name}.lora_b"] = m.A.T, m.B.T
        if m.magnitude is not None:
            state[f"{name}.m"] = m.magnitude
    rank = max(uniform.ranks.values(), default=0)
    config = {
        "fine_tune_type": "dora" if any(dora) else "lora",
        "num_layers": -1,
        "lora_parameters": {"rank": rank, "scale": 1.0, "dropout": 0.0, "keys": keys},
    }
    if adapter.base_model:
        config["model"] = adapter.base_model
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(state, folder / WEIGHTS_NAME, metadata={"format": "mlx"})
