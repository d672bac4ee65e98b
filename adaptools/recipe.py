"""Recipe files: which command made an output, with which parameters, from which inputs (by sha256).

A recipe is JSON written beside every output: `adaptools_recipe.json` inside an output folder, or
`<file>.adaptools_recipe.json` next to a single-file output (a kohya .safetensors). Its fields:

- `adaptools_recipe`: format version (1); `adaptools_version`: the version that wrote it;
- `command`: the CLI command path, e.g. ["combine"] or ["dora", "to-lora"]; `operation`, `kind` ("adapter" | "model");
- `params`: every command parameter as JSON (input paths absolute; the output and push options left out);
- `inputs`: per input path, `{"param", "path", "sha256"}` plus, for a folder, `files` = {relative path: sha256}
  (the folder's sha256 is that of the lines "<relative path>\\0<sha256>\\n" in sorted order);
  a file of a Hugging Face cache snapshot that links to a blob named by its sha256 (LFS files: the weights) is
  not read again: the blob's name is its sha256;
- `output_params`: parameters naming further outputs (a JSON report), dropped on replay;
- `report`: the per-module summary rows the command returned (may be empty).

No timestamps and no user or host data: the same inputs and parameters give the same recipe bytes.
Input paths are recorded absolute, so a pushed recipe shows local folder names.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import __version__, digests
from .atomic import atomic_output
from .errors import InputNotFoundError, RecipeError

RECIPE_NAME = "adaptools_recipe.json"
RECIPE_VERSION = 1
CHUNK_BYTES = 2**20
REQUIRED_KEYS = ("adaptools_recipe", "command", "params", "inputs")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks; a Hugging Face cache file whose blob is named by its sha256 (an
    LFS file: weights) is not read, its blob's name is taken."""
    if (recorded := digests.lookup(path)) is not None:  # hashed by the operation's own read (merge, quantize)
        return recorded
    blob = Path(path).resolve()
    if blob.parent.name == "blobs" and Path(path).is_symlink() and re.fullmatch(r"[0-9a-f]{64}", blob.name):
        return blob.name
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def folder_digest(files: Mapping[str, str]) -> str:
    """sha256 of a folder from its files' sha256: over "<relative path>\\0<sha256>\\n" lines in sorted order."""
    return hashlib.sha256("".join(f"{name}\0{files[name]}\n" for name in sorted(files)).encode()).hexdigest()


def hash_input(path: str | os.PathLike) -> dict:
    """{"path", "sha256"} of a file, plus "files" {relative path: sha256} for a folder (every file in it, hashed
    on one thread per CPU)."""
    path = Path(path).absolute()
    if not path.exists():
        raise InputNotFoundError(f"input {str(path)!r} does not exist")
    if path.is_file():
        return {"path": str(path), "sha256": sha256_file(path)}
    paths = [p for p in sorted(path.rglob("*")) if p.is_file()]
    with ThreadPoolExecutor(min(len(paths), os.cpu_count() or 1) or 1) as pool:  # hashlib releases the GIL
        files = dict(zip((p.relative_to(path).as_posix() for p in paths), pool.map(sha256_file, paths)))
    return {"path": str(path), "sha256": folder_digest(files), "files": files}


def recipe_path(output: str | os.PathLike) -> Path:
    """Where the recipe of `output` lives: inside a folder, or `<file>.adaptools_recipe.json` beside a file."""
    output = Path(output)
    return output / RECIPE_NAME if output.is_dir() else output.with_name(f"{output.name}.{RECIPE_NAME}")


def make_recipe(command: Iterable[str], operation: str, kind: str, params: Mapping, inputs: Iterable[tuple[str, str]],
                output_params: Iterable[str] = (), report: Iterable[Mapping] = ()) -> dict:
    """The recipe dict; `inputs` are (parameter name, path) pairs, hashed here."""
    return {
        "adaptools_recipe": RECIPE_VERSION,
        "adaptools_version": __version__,
        "command": list(command),
        "operation": operation,
        "kind": kind,
        "params": dict(params),
        "inputs": [{"param": name, **hash_input(path)} for name, path in inputs],
        "output_params": list(output_params),
        "report": [dict(row) for row in report],
    }


def write_recipe(recipe: Mapping, output: str | os.PathLike) -> Path:
    """Write `recipe` for `output` atomically (temp file + rename); returns the recipe's path."""
    target = recipe_path(output)
    with atomic_output(target, overwrite=True, is_file=True) as tmp:
        tmp.write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
    return target


def read_recipe(path: str | os.PathLike) -> dict:
    """Load and check a recipe file (a folder means its adaptools_recipe.json)."""
    path = Path(path)
    path = path / RECIPE_NAME if path.is_dir() else path
    if not path.is_file():
        raise InputNotFoundError(f"recipe {str(path)!r} does not exist")
    try:
        recipe = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecipeError(f"{str(path)!r} is not a recipe: {exc}") from None
    if not isinstance(recipe, dict) or any(key not in recipe for key in REQUIRED_KEYS):
        raise RecipeError(f"{str(path)!r} is not an adaptools recipe (needs {', '.join(REQUIRED_KEYS)})")
    if recipe["adaptools_recipe"] != RECIPE_VERSION:
        raise RecipeError(f"{str(path)!r} has recipe version {recipe['adaptools_recipe']}; this adaptools reads {RECIPE_VERSION}")
    return recipe


def verify_inputs(recipe: Mapping) -> None:
    """Raise RecipeError naming the first input whose sha256 differs from the recorded one (InputNotFoundError if gone)."""
    for entry in recipe["inputs"]:
        now = hash_input(entry["path"])
        if now["sha256"] == entry["sha256"]:
            continue
        recorded, current = entry.get("files", {}), now.get("files", {})
        changed = sorted(name for name in recorded.keys() | current.keys() if recorded.get(name) != current.get(name))
        detail = f" (files differing: {', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''})" if changed else ""
        raise RecipeError(
            f"input {entry['param']!r} at {entry['path']!r} changed since the recipe was recorded{detail}: "
            f"sha256 {now['sha256'][:12]}... != recorded {entry['sha256'][:12]}...; pass --ignore-hashes to replay anyway"
        )
