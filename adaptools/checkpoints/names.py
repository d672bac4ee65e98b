"""Name maps: where an adapter module's update lands in a base container (DESIGN §14).

Adapters name modules by the paths of the model they were trained on (transformers or diffusers paths); a base
container may store the same weights under other names (original LDM/BFL keys, llama.cpp names), fused with
others (a qkv weight holds q, k and v as row blocks), or with rows in another order (llama.cpp's q/k layout).
A name map answers, per module path, with a `Target`: the stored tensor, the row block of it that the module's
ΔW covers, and the order its rows take there.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor

from ..adapter import KOHYA_PREFIXES


@dataclass(frozen=True)
class Target:
    """Where one module's ΔW goes: W[key][rows] += ΔW[row_order] (whole tensor when `rows` is None; rows kept in
    order when `row_order` is None)."""

    key: str
    rows: tuple[int, int] | None = None
    row_order: Tensor | None = None


def target_rows(stored: Tensor, target: Target) -> Tensor:
    """The part of a stored tensor that a module's weight is: its row block, rows in the module's order."""
    if target.rows is not None:
        stored = stored[target.rows[0]:target.rows[1]]
    return stored if target.row_order is None else stored[target.row_order]


def target_shape(shape: tuple[int, ...], target: Target) -> tuple[int, ...]:
    """The shape of `target_rows` of a stored tensor of `shape`."""
    return shape if target.rows is None else (target.rows[1] - target.rows[0], *shape[1:])


class NameMap:
    """Module paths → targets for a container whose keys are `<module path>.weight` (Hugging Face folders)."""

    full_tensors = True
    """Whether an adapter extracted from this container carries changed non-LoRA tensors whole (modules_to_save;
    LoRA files of diffusion models hold none)."""

    def __init__(self, keys: Iterable[str]):
        self._keys = frozenset(keys)

    def modules(self) -> list[str]:
        """The module paths adapters may name (every key ending in `.weight`, without it), to resolve kohya-style
        flattened names against."""
        return sorted(key.removesuffix(".weight") for key in self._keys if key.endswith(".weight"))

    def target(self, module: str) -> Target | None:
        """Where the update of `module` lands, or None when the container has no such weight."""
        key = f"{module}.weight"
        return Target(key) if key in self._keys else None

    def key(self, name: str) -> str | None:
        """The stored key of a full tensor an adapter names (a bias, a modules_to_save weight), or None."""
        return name if name in self._keys else None

    def adapter_modules(self, key: str) -> list[tuple[str, tuple[int, int] | None]]:
        """The adapter module paths a stored weight `key` holds, each with its row block (None: all rows): what an
        adapter extracted from this container names (here the key without `.weight`)."""
        return [(key.removesuffix(".weight"), None)]

    def kohya_names(self) -> dict[str, set[str]]:
        """kohya module name → the module paths it may stand for: any kohya prefix + a path with `_` for `.`."""
        candidates: dict[str, set[str]] = {}
        for module in self.modules():
            for prefix in KOHYA_PREFIXES:
                candidates.setdefault(prefix + module.replace(".", "_"), set()).add(module)
        return candidates

    def source(self, key: str) -> tuple[str, Tensor | None]:
        """The model's own key of stored tensor `key` and the row order taking its stored rows back to the model's
        (None: as stored): what an adapter extracted from this container names and holds."""
        return key, None
