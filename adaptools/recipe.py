"""Recipe files: which command made an output, with which parameters, from which inputs (by sha256).

A recipe is JSON stored with every output, inside it, so output and recipe appear together or not at all:
`adaptools_recipe.json` inside an output folder, or, for a single-file output (a kohya .safetensors), the
string under the key `adaptools_recipe` of that file's safetensors `__metadata__` (no file beside it).
Its fields:

- `adaptools_recipe`: format version (1); `adaptools_version`: the version that wrote it;
- `command`: the CLI command path, e.g. ["combine"] or ["dora", "to-lora"]; `operation`, `kind` ("adapter" | "model");
- `output_type`: "folder" or "file";
- `params`: the command's parameters as JSON: inputs as their recorded paths (below), never the output, the
  side-file paths, or the options that widen what a run does (overwrite, pickle, push);
- `inputs`: per input path, `{"param", "path", "sha256"}` plus, for a folder, `files` = {relative path: sha256}
  (the folder's sha256 is that of the lines "<relative path>\\0<sha256>\\n" in sorted order). `path` is relative
  to the recipe's folder (the output folder, or the folder holding a single-file output), in POSIX form, e.g.
  "../style": never an absolute local path. A Hub input (adaptools.sources) also has `repo_id`, `revision` (the
  commit sha it resolved to) and, for a file or folder of the repo, `path_in_repo`; its `path` (and its value in
  `params`) is the ref pinned to that commit, ORG/NAME[/path]@<sha>, and `files` lists the repo files the command
  used, so a replay downloads exactly those files, anywhere; a base read for its names only (`headers`: the
  weight files whose safetensors header alone was read) has the sha256 of each one's 8 + N header bytes in
  `files`, and a replay fetches those headers again, not the weights. A file of a Hugging Face cache snapshot that links to
  a blob named by its sha256 (LFS files: the weights) is not read again: the blob's name is its sha256;
- `output_params`: the side files (a JSON report) the run wrote; a replay writes them inside its output under
  names adaptools chooses;
- `report`: the per-module summary rows the command returned (may be empty).

No timestamps and no user or host data: the same inputs and parameters give the same recipe bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath, PureWindowsPath

from safetensors import SafetensorError, safe_open

from . import __version__, digests
from .checkpoints import gguf_file
from .errors import AdaptoolsError, InputNotFoundError, RecipeError
from .jsonio import parse_json, read_json_object
from .sources import HubInput, HubRef, fetch_files, header_digests, parse_hub_ref

RECIPE_NAME = "adaptools_recipe.json"
RECIPE_KEY = "adaptools_recipe"
"""The safetensors metadata key holding the recipe of a single-file output."""
GGUF_RECIPE_KEY = "adaptools.recipe"
"""The GGUF key/value holding the recipe of a GGUF output (llama.cpp ignores keys it does not know)."""
RECIPE_VERSION = 1
CHUNK_BYTES = 2**20
REQUIRED_KEYS = ("adaptools_recipe", "command", "params", "inputs")
OUTPUT_TYPES = ("folder", "file")
SHA256 = re.compile(r"[0-9a-f]{64}")
COMMIT = re.compile(r"[0-9a-f]{40}")


COMPANION_FILES = ("adapter_config.json",)
"""Files beside a weights file that its reader takes too (PEFT, LyCORIS-in-PEFT, IA3 and mlx-lm read the adapter's
config beside the weights the user names): hashed with it, so that a replay notices an edited config."""


def sha256_file(path: str | os.PathLike, remember: bool = False) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks; a Hugging Face cache file whose blob is named by its sha256 (an
    LFS file: weights) is not read, its blob's name is taken. With `remember`, the digest is recorded
    (adaptools.digests), so the file is not read again until the next command starts; either way it persists
    for later commands while the file stays unchanged."""
    if (recorded := digests.lookup(path)) is not None:  # hashed by the operation's own read (merge, quantize)
        return recorded
    blob = Path(path).resolve()
    if blob.parent.name == "blobs" and Path(path).is_symlink() and SHA256.fullmatch(blob.name):
        return blob.name
    key = digests.file_key(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    if remember:
        digests.record(key, digest.hexdigest())
    else:
        digests.persist(key, digest.hexdigest())
    return digest.hexdigest()


def folder_digest(files: Mapping[str, str]) -> str:
    """sha256 of a folder from its files' sha256: over "<relative path>\\0<sha256>\\n" lines in sorted order."""
    return hashlib.sha256("".join(f"{name}\0{files[name]}\n" for name in sorted(files)).encode()).hexdigest()


def hash_input(path: str | os.PathLike, remember: bool = False) -> dict:
    """{"sha256"} of a file, plus "files" {relative path: sha256} for a folder (every file in it, hashed on one
    thread per CPU) and for a file read with a companion beside it (COMPANION_FILES: a weights file's config);
    `remember`: as sha256_file's."""
    path = Path(path).absolute()
    if not path.exists():
        raise InputNotFoundError(f"input {str(path)!r} does not exist")
    if path.is_file():
        companions = [path.with_name(name) for name in COMPANION_FILES if name != path.name]
        companions = [p for p in companions if p.is_file()]
        if not companions:
            return {"sha256": sha256_file(path, remember)}
        return hash_files(path.parent, [path.name, *(p.name for p in companions)], remember)
    paths = [p for p in sorted(path.rglob("*")) if p.is_file()]
    with ThreadPoolExecutor(min(len(paths), os.cpu_count() or 1) or 1) as pool:  # hashlib releases the GIL
        hexes = pool.map(lambda p: sha256_file(p, remember), paths)
        files = dict(zip((p.relative_to(path).as_posix() for p in paths), hexes))
    return {"sha256": folder_digest(files), "files": files}


def hash_files(root: Path, names: Iterable[str], remember: bool = False) -> dict:
    """{"sha256", "files"} of the files `names` (relative paths) under `root`, as hash_input gives for a folder;
    `remember`: as sha256_file's."""
    files = {name: sha256_file(root / name, remember) for name in sorted(names)}
    return {"sha256": folder_digest(files), "files": files}


def input_entry(path: str | os.PathLike | HubInput, root: str | os.PathLike) -> dict:
    """The recipe entry (less "param") of a local input (path relative to `root`) or of a resolved Hub input (the
    pinned ref, repo id, commit, path in the repo, and the sha256 of the repo files it used)."""
    if not isinstance(path, HubInput):
        return {"path": relative_path(path, root), **hash_input(path)}
    where = {"path_in_repo": path.ref.path} if path.ref.path else {}
    files = {**hash_files(path.snapshot, path.files)["files"], **path.headers}
    headers = {"headers": sorted(path.headers)} if path.headers else {}
    return {"path": path.pinned, "repo_id": path.ref.repo_id, "revision": path.commit, **where,
            "sha256": folder_digest(files), "files": files, **headers}


def hub_files(entry: Mapping) -> dict:
    """{"sha256", "files"} of the Hub input `entry` as its repo is now at the recorded commit: the files it read
    whole (downloaded where not cached) and the headers of those it read by header (fetched again)."""
    headers = list(entry.get("headers", ()))
    whole = [name for name in entry["files"] if name not in headers]
    files = hash_files(fetch_files(entry["repo_id"], entry["revision"], whole), whole)["files"] if whole else {}
    files.update(header_digests(entry["repo_id"], entry["revision"], headers))
    return {"sha256": folder_digest(files), "files": files}


def hub_entry_ref(entry: Mapping) -> str:
    """The pinned ref ORG/NAME[/path]@<commit> of a Hub input entry."""
    return str(HubRef(entry["repo_id"], entry.get("path_in_repo"), entry["revision"]))


def relative_path(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """`path` relative to the folder `root`, in POSIX form (e.g. "../style"): what recipes and cards record."""
    return Path(os.path.relpath(Path(path).absolute(), Path(root).absolute())).as_posix()


def recipe_root(output: str | os.PathLike, is_file: bool) -> Path:
    """The folder a recipe's relative paths start from: the output folder, or the folder of a single-file output."""
    output = Path(output).absolute()
    return output.parent if is_file else output


def make_recipe(command: Iterable[str], operation: str, kind: str, params: Mapping,
                inputs: Iterable[tuple[str, str | os.PathLike | HubInput]],
                root: str | os.PathLike, output_type: str = "folder", output_params: Iterable[str] = (),
                report: Iterable[Mapping] = ()) -> dict:
    """The recipe dict; `inputs` are (parameter name, path or resolved Hub input) pairs, hashed here; local paths
    are recorded relative to `root` (recipe_root of the output)."""
    return {
        "adaptools_recipe": RECIPE_VERSION,
        "adaptools_version": __version__,
        "command": list(command),
        "operation": operation,
        "kind": kind,
        "output_type": output_type,
        "params": dict(params),
        "inputs": [{"param": name, **input_entry(path, root)} for name, path in inputs],
        "output_params": list(output_params),
        "report": [dict(row) for row in report],
    }


def recipe_text(recipe: Mapping) -> str:
    """The recipe as the JSON text stored."""
    return json.dumps(recipe, indent=2) + "\n"


def write_recipe(recipe: Mapping, output: str | os.PathLike, is_file: bool) -> None:
    """Store `recipe` in the (staged) `output`: `adaptools_recipe.json` inside a folder, or in a single
    safetensors file's metadata (embed_recipe)."""
    output = Path(output)
    if is_file and gguf_file.detect(output):
        gguf_file.embed_strings(output, {GGUF_RECIPE_KEY: json.dumps(recipe, indent=None)})
    elif is_file:
        embed_recipe(recipe, output)
    else:
        with open(output / RECIPE_NAME, "x", encoding="utf-8") as f:
            f.write(recipe_text(recipe))


def embed_recipe(recipe: Mapping, file: Path) -> None:
    """Put `recipe` under `__metadata__`[RECIPE_KEY] of the safetensors `file`: in place when the header's space
    holds it, else a new header (padded to 8 bytes, as safetensors writes it; data offsets are relative to the
    data, so they stay) and the data copied after it."""
    with open(file, "r+b") as src:
        (length,) = struct.unpack("<Q", src.read(8))
        header = json.loads(src.read(length))
        header["__metadata__"] = {**header.get("__metadata__", {}), RECIPE_KEY: json.dumps(recipe, indent=None)}
        text = json.dumps(header, separators=(",", ":")).encode()
        if len(text) <= length:  # the header's padding holds it (single-file merges reserve room): rewrite in place
            src.seek(8)
            src.write(text.ljust(length, b" "))
            return
        text += b" " * (-len(text) % 8)
        rewritten = file.with_name(f".{file.name}.new")
        with open(rewritten, "xb") as dst:
            dst.write(struct.pack("<Q", len(text)) + text)
            shutil.copyfileobj(src, dst, CHUNK_BYTES)
    os.replace(rewritten, file)


def read_recipe(path: str | os.PathLike) -> tuple[dict, Path]:
    """Load and check a recipe: `path` is an output folder (its adaptools_recipe.json), a recipe JSON file, or a
    single-file output (.safetensors) holding its recipe in its metadata. Returns the recipe and its root (the
    folder its relative input paths start from)."""
    path = Path(path)
    if not path.exists():
        raise InputNotFoundError(f"recipe {str(path)!r} does not exist")
    if path.is_dir():
        path = path / RECIPE_NAME
        if not path.is_file():
            raise InputNotFoundError(f"{str(path.parent)!r} holds no {RECIPE_NAME}")
    if path.suffix in (".safetensors", ".gguf"):
        recipe = parse_json(embedded_recipe(path), f"{path}: metadata {RECIPE_KEY}", RecipeError)
        if not isinstance(recipe, dict):
            raise RecipeError(f"{str(path)!r}: metadata {RECIPE_KEY!r} does not hold a JSON object")
    else:
        recipe = read_json_object(path, RecipeError)
    check_recipe(recipe, repr(str(path)))
    return recipe, path.absolute().parent


def embedded_recipe(path: Path) -> str:
    """The recipe text in the metadata of the safetensors (or GGUF) file `path`."""
    if gguf_file.detect(path):
        try:
            text = gguf_file.read_header(path).get(GGUF_RECIPE_KEY)
        except AdaptoolsError as exc:
            raise RecipeError(str(exc)) from None
        if not isinstance(text, str):
            raise RecipeError(f"{str(path)!r} holds no adaptools recipe (no string {GGUF_RECIPE_KEY!r} in its metadata)")
        return text
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise RecipeError(f"{str(path)!r} is not a readable safetensors file ({exc})") from None
    if RECIPE_KEY not in metadata:
        raise RecipeError(f"{str(path)!r} holds no adaptools recipe (no {RECIPE_KEY!r} in its metadata)")
    return metadata[RECIPE_KEY]


def check_recipe(recipe: Mapping, source: str) -> None:
    """RecipeError naming the field of `recipe` that is missing or of the wrong type."""
    missing = [key for key in REQUIRED_KEYS if key not in recipe]
    if missing:
        raise RecipeError(f"{source} is not an adaptools recipe (needs {', '.join(REQUIRED_KEYS)})")
    if recipe["adaptools_recipe"] != RECIPE_VERSION:
        raise RecipeError(f"{source} has recipe version {recipe['adaptools_recipe']!r}; this adaptools reads {RECIPE_VERSION}")
    command = recipe["command"]
    if not isinstance(command, list) or not command or not all(isinstance(c, str) and c for c in command):
        raise RecipeError(f"{source}: 'command' must be a list of command names")
    if not isinstance(recipe["params"], dict):
        raise RecipeError(f"{source}: 'params' must be an object")
    if recipe.get("output_type", "folder") not in OUTPUT_TYPES:
        raise RecipeError(f"{source}: 'output_type' must be one of {', '.join(OUTPUT_TYPES)}")
    names = recipe.get("output_params", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RecipeError(f"{source}: 'output_params' must be a list of parameter names")
    if not isinstance(recipe["inputs"], list):
        raise RecipeError(f"{source}: 'inputs' must be a list")
    for i, entry in enumerate(recipe["inputs"]):
        check_input_entry(entry, f"{source}: input {i}")


def check_input_entry(entry: object, where: str) -> None:
    """RecipeError unless `entry` is {"param": str, "path": str, "sha256": hex, ["files": {str: hex}]}."""
    if not isinstance(entry, dict):
        raise RecipeError(f"{where} must be an object")
    for key in ("param", "path"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise RecipeError(f"{where} needs {key!r} (a non-empty string)")
    if not isinstance(entry.get("sha256"), str) or not SHA256.fullmatch(entry["sha256"]):
        raise RecipeError(f"{where} ({entry['path']!r}) needs 'sha256' (64 lowercase hex digits)")
    files = entry.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) and SHA256.fullmatch(v)
                                              for k, v in files.items()):
        raise RecipeError(f"{where} ({entry['path']!r}): 'files' must map file names to sha256 digests")
    if "repo_id" in entry:
        check_hub_entry(entry, where)
    elif PurePosixPath(entry["path"]).is_absolute() or PureWindowsPath(entry["path"]).anchor:
        raise RecipeError(f"{where} ({entry['path']!r}): a local input must be a path relative to the recipe's folder")


def check_hub_entry(entry: Mapping, where: str) -> None:
    """RecipeError unless the Hub input `entry` names a repo id, a commit sha, a safe path in the repo and safe repo
    file names, and its `path` is that ref pinned to that commit."""
    fields = (entry.get("repo_id"), entry.get("revision"), entry.get("path_in_repo", ""))
    if not all(isinstance(v, str) for v in fields) or not COMMIT.fullmatch(entry["revision"]):
        raise RecipeError(f"{where} ({entry['path']!r}): a Hub input needs 'repo_id' and 'revision' (a commit sha)")
    ref = parse_hub_ref(hub_entry_ref(entry))
    if ref is None or ref.repo_id != entry["repo_id"] or entry["path"] != hub_entry_ref(entry):
        raise RecipeError(f"{where} ({entry['path']!r}) is not a Hub repo id, path and commit that adaptools reads")
    unsafe = [name for name in entry.get("files", {}) if parse_hub_ref(f"{entry['repo_id']}/{name}") is None]
    if unsafe or not entry.get("files"):
        shown = f", not {unsafe[0]!r}" if unsafe else ""
        raise RecipeError(f"{where} ({entry['path']!r}): 'files' must name the repo files used{shown}")
    headers = entry.get("headers", [])
    if not isinstance(headers, list) or not all(isinstance(h, str) and h in entry["files"] for h in headers):
        raise RecipeError(f"{where} ({entry['path']!r}): 'headers' must list files of 'files' (read by header)")


def input_path(entry: Mapping, root: Path) -> Path:
    """Where the recipe input `entry` is: its (relative, checked) path joined to the recipe's root; for a Hub
    input, its pinned ref (ORG/NAME@<commit>, resolved by the command that reads it)."""
    return Path(hub_entry_ref(entry)) if "repo_id" in entry else root / entry["path"]


def verify_inputs(recipe: Mapping, root: Path, remember: bool = False) -> None:
    """Raise RecipeError naming the first input whose sha256 differs from the recorded one (InputNotFoundError if
    gone); the files are hashed as they are now (digests of earlier reads in this process are dropped), unless
    `remember`: then local inputs' digests are recorded and kept, so that checking several recipes with one input
    reads it once (adaptools batch; a file changed since it was recorded is a RecipeError)."""
    if not remember:
        digests.forget()
    for entry in recipe["inputs"]:
        if "repo_id" in entry:  # the recorded files at the recorded commit, downloaded where not cached
            now = hub_files(entry)
        else:
            now = hash_input(input_path(entry, root), remember)
        if now["sha256"] == entry["sha256"]:
            continue
        recorded, current = entry.get("files", {}), now.get("files", {})
        changed = sorted(name for name in recorded.keys() | current.keys() if recorded.get(name) != current.get(name))
        detail = f" (files differing: {', '.join(changed[:5])}{', ...' if len(changed) > 5 else ''})" if changed else ""
        raise RecipeError(
            f"input {entry['param']!r} at {entry['path']!r} changed since the recipe was recorded{detail}: "
            f"sha256 {now['sha256'][:12]}... != recorded {entry['sha256'][:12]}...; pass --ignore-hashes to replay anyway"
        )
