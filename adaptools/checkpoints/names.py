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


@dataclass(frozen=True)
class Target:
    """Where one module's ΔW goes: W[key][rows] += ΔW[row_order] (whole tensor when `rows` is None; rows kept in
    order when `row_order` is None)."""

    key: str
    rows: tuple[int, int] | None = None
    row_order: Tensor | None = None


class NameMap:
    """Module paths → targets for a container whose keys are `<module path>.weight` (Hugging Face folders)."""

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

    def source(self, key: str) -> tuple[str, Tensor | None]:
        """The model's own key of stored tensor `key` and the row order taking its stored rows back to the model's
        (None: as stored): what an adapter extracted from this container names and holds."""
        return key, None
