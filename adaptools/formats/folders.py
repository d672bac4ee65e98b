"""Adapter folders, read one way for every family: the weights file of a folder (or the file itself), and
PEFT-style folders (adapter_config.json beside adapter_model.safetensors/.bin, keys `base_model.model.<path>.<role>`):
locate the files, read and check the config, group the state-dict keys by module; and grouping keys by role suffix
(kohya, LyCORIS, mlx)."""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ..errors import AdapterFormatError
from ..jsonio import Check, check_fields, read_json_object
from .tensors import read_tensor_file, require_exists

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."


def weights_in(path: Path, names: Sequence[str]) -> Path | None:
    """The weights of `path`: the file itself, or the first of `names` present in the folder (None when none is)."""
    if path.is_file():
        return path
    return next((path / name for name in names if (path / name).exists()), None)


def locate(path: str | os.PathLike) -> tuple[Path, Path]:
    """(config path, weights path) of a PEFT folder, or of a weights file with its config beside it."""
    path = require_exists(path)
    folder = path if path.is_dir() else path.parent
    config = folder / CONFIG_NAME
    if not config.exists():
        raise AdapterFormatError(f"{str(path)!r} is not a PEFT adapter: no {CONFIG_NAME} in {str(folder)!r}")
    weights = weights_in(path, WEIGHTS_NAMES)
    if weights is None:
        raise AdapterFormatError(f"{str(folder)!r} has {CONFIG_NAME} but no {' or '.join(WEIGHTS_NAMES)}")
    return config, weights


def adapter_name(path: Path) -> str:
    """An adapter's name: its folder's name (the folder of a weights file)."""
    return path.name if path.is_dir() else path.parent.name


@dataclass
class PeftFolder:
    """A PEFT-style adapter as read from disk: its config (checked), its tensors, where they came from, its name."""

    config_path: Path
    weights_path: Path
    config: dict
    tensors: dict[str, Tensor]
    name: str


def read_folder(path: str | os.PathLike, fields: Mapping[str, Check], *, nullable: Sequence[str] = (),
                check: Callable[[dict, str], object] | None = None, allow_pickle: bool = False) -> PeftFolder:
    """Read a PEFT-style folder (or its weights file): the config with its `fields` checked (`nullable` ones may be
    null) and then `check(config, source)`, before the tensors are read."""
    config_path, weights_path = locate(path)
    config = read_json_object(config_path, AdapterFormatError)
    check_fields(config, fields, str(config_path), AdapterFormatError, nullable=nullable)
    if check is not None:
        check(config, str(config_path))
    tensors, _ = read_tensor_file(weights_path, allow_pickle=allow_pickle)
    return PeftFolder(config_path, weights_path, config, tensors, adapter_name(Path(path)))


def base_key(key: str) -> str:
    """Base checkpoint key of a full tensor stored by PEFT (`x.base_layer.weight` → `x.weight`)."""
    return key.replace(".base_layer.", ".")


def group_keys(tensors: Mapping[str, Tensor], split: Callable[[str], tuple[str, str | None]]
               ) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """PEFT state-dict keys grouped per module ({module: {role: tensor}}, `split` giving (module, role) of a key
    without its `base_model.model.` prefix, role None for a full tensor) and the full tensors by base key; a full
    tensor's key must name a module (`<module path>.<parameter>`)."""
    grouped: dict[str, dict[str, Tensor]] = {}
    extra: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        key = key.removeprefix(PREFIX)
        module, role = split(key)
        if role is not None and not module:
            raise AdapterFormatError(f"key {PREFIX + key!r} names no module (an empty module path)")
        if role is not None:
            grouped.setdefault(module, {})[role] = tensor
        elif "." not in key:
            raise AdapterFormatError(f"key {PREFIX + key!r} names no module (a full tensor's key is <module path>."
                                     "<parameter>)")
        else:
            extra[base_key(key)] = tensor
    return grouped, extra


def group_by_role(path: str | os.PathLike, tensors: dict[str, Tensor], roles: dict[str, str],
                  what: str) -> dict[str, dict[str, Tensor]]:
    """{module name: {role: tensor}} by key suffix (`roles`: suffix → role); a key of no role, or no module, raises."""
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        for suffix, role in roles.items():
            if key.endswith(suffix):
                if len(key) == len(suffix):
                    raise AdapterFormatError(f"{str(path)!r}: key {key!r} names no module")
                grouped.setdefault(key[: -len(suffix)], {})[role] = tensor
                break
        else:
            raise AdapterFormatError(f"{str(path)!r}: unexpected key {key!r} in {what}")
    if not grouped:
        raise AdapterFormatError(f"{str(path)!r} holds no LoRA tensors")
    return grouped
