"""Inputs by local path or by Hugging Face Hub repo id; a repo id is resolved to files of the local Hub cache.

Forms (an existing local path always wins; any other string is a local path that does not exist):
    ORG/NAME                          the repo at its default branch
    ORG/NAME@REVISION                 at a branch, tag or commit
    ORG/NAME/path/in/repo[@REVISION]  one file of the repo (a kohya .safetensors, a single-file base) or one folder

Only the files the operation reads are downloaded (huggingface_hub's snapshot_download with allow_patterns,
top-level files of the repo or of the folder named), by kind of input (`Kind`):
    adapter     adapter_config.json, the adapter weights (PEFT, mlx and diffusers names) and README.md; the
                pickled ones (adapter_model.bin, ...) only with allow_pickle and when no other weights are there
    checkpoint  config.json, README.md and the weights: the shards named by model.safetensors.index.json, else the
                *.safetensors files (what Container reads)
    model       a checkpoint plus the tokenizer, chat template and generation files (what a merged or quantized
                model carries along)
Never pickled bases, optimizer or training states, code, or files of sub-folders. A file named in the ref is
fetched with the configs beside it; a pickle named so needs allow_pickle.

The cache, offline mode and the token are huggingface_hub's: HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE=1 (no
request at all: the cache or a clean error), HF_TOKEN or the login cache of `hf auth login` (never printed: every
message is masked). A pinned commit found in the cache is used without a request; a branch or tag costs one
request to learn its commit, and only the files not yet cached are downloaded, with the client's progress bars.
Downloaded files are untrusted input like any other: the callers read them with the same readers and validators.

Hub refs are strings (a Path is always local). The entry points of the API call `resolve`, `open_base` or `load`,
so they take refs wherever they take paths (formats/ stays free of network code).

A base used only for its names (kohya names mapped to module paths, llama.cpp names: `open_names`), like a
checkpoint `info` describes (`locate_headers`), costs its headers, not its weights: the small files (config.json,
the safetensors index; a pipeline's model_index.json, its components' configs and indexes) are downloaded, the
weights are listed from the repo's tree and only their headers are fetched, by HTTP Range requests (safetensors: 8
bytes, then the N header bytes once N is checked), validated like any local header
(checkpoints.safetensors_io.parse_header; GGUF: gguf_file.read_header_prefix). A weight file already cached is read
from the cache; with HF_HUB_OFFLINE=1 a header that is not is an error.

Every Hub input resolved inside `recording()` is logged with its commit and files, so that recipes and cards can
name it by repo id and commit (a replay downloads exactly that commit) and hash just the files it used (for a base
read for names: the sha256 of each weight file's header bytes, `HubInput.headers`).
"""
from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from huggingface_hub import (constants, get_cached_repo_tree, get_session, get_token, hf_hub_url, snapshot_download,
                             try_to_load_from_cache)
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import (HFValidationError, build_hf_headers, filter_repo_objects, hf_raise_for_status,
                                   httpx, validate_repo_id)

from .adapter import Adapter
from .errors import (
    BaseMismatchError,
    HubAccessError,
    HubError,
    HubNotFoundError,
    InvalidArgumentError,
    PickleNotAllowedError,
)
from .checkpoints import LOCAL, Container, Files, open_container
from .formats import load_adapter
from .checkpoints import pipeline
from .checkpoints import gguf_file
from .checkpoints.gguf import split_names
from .checkpoints.safetensors_io import TensorInfo, header_bytes, header_length, parse_header
from .checkpoints.shards import INDEX_NAME
from .formats.peft import CONFIG_NAME
from .formats.tensors import PICKLE_SUFFIXES
from .jsonio import read_json_object

Kind = Literal["adapter", "checkpoint", "model"]

CARD = "README.md"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapters.safetensors", "pytorch_lora_weights.safetensors",
                   "adapters.npz")
"""Adapter weight files a folder is read by: PEFT, mlx-lm, diffusers, mlx-examples (.npz: arrays, no pickle)."""
ADAPTER_PICKLES = ("adapter_model.bin", "pytorch_lora_weights.bin")
"""Pickled adapter weights (PEFT, diffusers): fetched only with allow_pickle, when no ADAPTER_WEIGHTS are there."""
MODEL_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
)
"""Beside the weights and config.json, what a merged or quantized model carries: tokenizer, templates, generation."""
SIDE_FILES: dict[str, tuple[str, ...]] = {
    "adapter": (CONFIG_NAME, CARD),
    "checkpoint": ("config.json", CARD),
    "model": ("config.json", CARD, *MODEL_FILES),
}
"""Small files of each kind, fetched first (and beside a file named in the ref)."""
NAMES_FILES = ("config.json", CARD, INDEX_NAME, pipeline.INDEX,
               *(f"{c}/{name}" for c in pipeline.MERGEABLE
                 for name in ("config.json", *(f"{stem}.safetensors.index.json" for stem in pipeline.STEMS))))
"""Small files of a base read for its names (`open_names`): its config and index, or a pipeline's model index and
its mergeable components' configs and indexes; the weights beside them are read by their headers only."""
REF = re.compile(r"(?P<repo>[^/@\s]+/[^/@\s]+)(?:/(?P<path>[^@]+?))?/?(?:@(?P<revision>[^@\s]+))?")


@dataclass(frozen=True)
class HubRef:
    """A Hub input as written: ORG/NAME[/path][@revision]."""

    repo_id: str
    path: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"/{self.path}" if self.path else "") + (f"@{self.revision}" if self.revision else "")

    @property
    def name(self) -> str:
        """The last component of the folder it names (NAME, or the folder in the repo)."""
        return (self.path or self.repo_id).rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class HubInput:
    """A resolved Hub input: the ref as given, the commit it resolved to, and the repo files it uses."""

    ref: HubRef
    commit: str
    snapshot: Path
    files: tuple[str, ...]
    headers: dict[str, str] = field(default_factory=dict)
    """Weight files read by their safetensors header only (a base read for names): repo path → sha256 of the
    8 + N header bytes."""

    @property
    def local(self) -> Path:
        """What the readers open: the snapshot folder, or the file or folder of the ref inside it."""
        return self.snapshot / self.ref.path if self.ref.path else self.snapshot

    @property
    def pinned(self) -> str:
        """The ref at its commit (ORG/NAME[/path]@sha): what a recipe records, so a replay gets exactly these files."""
        return str(replace(self.ref, revision=self.commit))


_RECORDED: ContextVar[dict[str, HubInput] | None] = ContextVar("adaptools_hub_inputs", default=None)


@contextlib.contextmanager
def recording() -> Iterator[dict[str, HubInput]]:
    """Collect {input as written: HubInput} of every Hub input resolved inside the block."""
    log: dict[str, HubInput] = {}
    token = _RECORDED.set(log)
    try:
        yield log
    finally:
        _RECORDED.reset(token)


def parse_hub_ref(text: str) -> HubRef | None:
    """The Hub ref that `text` spells (ORG/NAME[/path][@revision]), or None when it cannot be one."""
    match = REF.fullmatch(text)
    if match is None:
        return None
    repo, path, revision = match.group("repo", "path", "revision")
    try:
        validate_repo_id(repo)
    except HFValidationError:
        return None
    if path is not None and any(part in ("", ".", "..") or "\\" in part for part in path.split("/")):
        return None
    return HubRef(repo, path, revision)


def hub_ref(source: str | os.PathLike) -> HubRef | None:
    """The Hub ref of `source` when it is one: a string that is no local path and spells a ref."""
    if not isinstance(source, str) or Path(source).exists():
        return None
    return parse_hub_ref(source)


def resolve(source: str | os.PathLike, kind: Kind = "adapter", *, allow_pickle: bool = False) -> Path:
    """The local path of `source`: itself when it exists or is no Hub ref, else the cached files of the ref
    (downloaded as needed, only those `kind` needs); logged for `recording()`, inside which a ref resolved
    again stays at the commit it resolved to first."""
    ref = hub_ref(source)
    if ref is None:
        return Path(source)
    found = fetch(pinned(str(source), ref), kind, allow_pickle=allow_pickle)
    return logged(str(source), replace(found, ref=ref)).local


def pinned(source: str, ref: HubRef) -> HubRef:
    """`ref` at the commit that `source` resolved to earlier inside `recording()` (itself when it did not): again
    in one command, the same commit, even if the branch moved meanwhile (and no request when cached)."""
    log = _RECORDED.get()
    earlier = None if log is None else log.get(source)
    return ref if earlier is None else replace(ref, revision=earlier.commit)


def logged(source: str, found: HubInput) -> HubInput:
    """`found`, with the files `source` used earlier inside `recording()` (a file downloaded whole is not also
    listed as read by its header), logged for `recording()`."""
    log = _RECORDED.get()
    if log is None:
        return found
    if (earlier := log.get(source)) is not None:
        files = tuple(sorted({*earlier.files, *found.files}))
        found = replace(found, files=files, headers={name: digest for name, digest in
                                                     {**earlier.headers, **found.headers}.items() if name not in files})
    log[source] = found
    return found


def open_base(base: str | os.PathLike | Container, kind: Kind = "checkpoint") -> Container:
    """The base container (`adaptools.checkpoints`) of a local folder or file, or of a Hub ref ("model": with tokenizer and generation files)."""
    return base if isinstance(base, Container) else open_container(resolve(base, kind))


def open_names(base: str | os.PathLike | Container) -> Container:
    """The base container of `base` for its keys, shapes, dtypes, config and name map, never its tensors: a Hub
    ref (a repo, a folder, or a .safetensors or .gguf file of one) costs its small files and its weights' headers
    (`fetch_names`), no weights; a local path or a container as `open_base`."""
    ref = None if isinstance(base, Container) else hub_ref(base)
    if ref is None or (ref.path or "").endswith(PICKLE_SUFFIXES):
        return open_base(base)
    found = fetch_names(pinned(str(base), ref))
    files = RemoteFiles(found)
    container = open_container(found.local, files)
    logged(str(base), replace(found, ref=ref, headers=dict(files.digests)))
    return container


def locate_headers(source: str | os.PathLike) -> tuple[Path, Files]:
    """Where `source` is read by its headers alone (keys, shapes, dtypes, metadata: what `info` shows of a
    checkpoint): a Hub ref naming a .safetensors or .gguf file or a folder, as the snapshot path of its small files
    (`fetch_small_files`) with the RemoteFiles that fetch its weights' headers by HTTP Range requests; a local path
    (or a pickle file of a repo, which only `resolve` may fetch) as itself, on LOCAL."""
    ref = hub_ref(source)
    if ref is None or (ref.path or "").endswith(PICKLE_SUFFIXES):
        return Path(source), LOCAL
    found = fetch_small_files(pinned(str(source), ref))
    return found.local, RemoteFiles(found)


def load(path: str | os.PathLike, allow_pickle: bool = False, base: str | os.PathLike | Container | None = None,
         **options: float | None) -> Adapter:
    """Load an adapter (a local path or a Hub ref); with `base` (likewise, or a container), kohya names are mapped
    to its module paths (a Hub base costs its headers: `open_names`); `options` go to the format reader
    (formats.load_adapter)."""
    local = resolve(path, "adapter", allow_pickle=allow_pickle)
    adapter = load_adapter(local, allow_pickle=allow_pickle, base=None if base is None else open_names(base), **options)
    folder = local if local.is_dir() else local.parent
    if is_snapshot(folder) and adapter.name == folder.name:  # named after the commit: name it after the repo
        adapter = replace(adapter, name=str(cached_repo_id(folder)).rsplit("/", 1)[-1])
    return adapter


def is_snapshot(folder: Path) -> bool:
    """True for a snapshot folder of the Hugging Face cache (…/models--ORG--NAME/snapshots/<commit>)."""
    return folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--")


def cached_repo_id(path: str | os.PathLike) -> str | None:
    """ORG/NAME when `path` lies in a snapshot of the Hugging Face cache (models--ORG--NAME/snapshots/<commit>/…)."""
    for folder in (Path(path), *Path(path).parents):
        if is_snapshot(folder):
            return folder.parent.parent.name.removeprefix("models--").replace("--", "/", 1)
    return None


# --------------------------------------------------------------------------- downloading


def fetch(ref: HubRef, kind: Kind, *, allow_pickle: bool = False) -> HubInput:
    """Download (or find in the cache) the files of `ref` that `kind` needs; the commit and the files used.

    First the small files (the side files of the kind, the index or the adapter weights; the named file and the
    side files beside it), which pins the commit; then, at that commit, the weights they call for.
    """
    if ref.path and ref.path.endswith(PICKLE_SUFFIXES) and not allow_pickle:
        raise PickleNotAllowedError(f"{str(ref)!r} is a pickle file; pass --allow-pickle (allow_pickle=True) to "
                                    "load it with weights_only=True")
    prefix = f"{ref.path}/" if ref.path else ""
    ignore = [f"{glob.escape(prefix)}*/*"]
    first = [glob.escape(prefix) + glob.escape(name) for name in
             (*SIDE_FILES[kind], *(ADAPTER_WEIGHTS if kind == "adapter" else (INDEX_NAME,)))]
    if ref.path:
        parent = glob.escape(ref.path.rpartition("/")[0] + "/" if "/" in ref.path else "")
        first += [glob.escape(ref.path), *(parent + glob.escape(name) for name in SIDE_FILES[kind])]
    snapshot = download(ref, ref.revision, first, ignore)
    commit = snapshot.name
    allowed = list(first)
    target = snapshot / ref.path if ref.path else snapshot
    if target.is_file() and target.suffix == ".gguf":  # a split GGUF: every part beside the one named
        parent = ref.path.rpartition("/")[0]
        parts = [glob.escape(f"{parent}/{name}" if parent else name) for name in split_names(target.name)]
        download(ref, commit, parts, ignore)
        allowed += parts
    elif not target.is_file():
        folder = glob.escape(prefix)
        if kind != "adapter":
            index = target / INDEX_NAME
            weights = shard_patterns(index, folder) if index.is_file() else [f"{folder}*.safetensors"]
        elif allow_pickle and not any((target / name).is_file() for name in ADAPTER_WEIGHTS):
            weights = [folder + glob.escape(name) for name in ADAPTER_PICKLES]
        else:
            weights = []
        if weights:
            download(ref, commit, weights, ignore)
            allowed += weights
    files = used_files(snapshot, allowed, ignore)
    check_found(ref, kind, commit, target, files, allow_pickle)
    return HubInput(ref, commit, snapshot, files)


def fetch_names(ref: HubRef) -> HubInput:
    """The small files of a base read for its names (`fetch_small_files`); a folder that is no pipeline must hold
    safetensors weights (listed in the repo's tree)."""
    found = fetch_small_files(ref)
    named_file, prefix = names_folder(ref)
    if not named_file and not (found.local / pipeline.INDEX).is_file():  # a pipeline's weights are in its components
        here = tuple(f for f in repo_listing(ref, found.commit) if f.startswith(prefix) and "/" not in f[len(prefix):])
        if any(f.endswith(".safetensors") for f in here):
            found.local.mkdir(parents=True, exist_ok=True)  # no small file beside the weights: the folder to list
        check_found(ref, "checkpoint", found.commit, found.local, here, False)
    return found


def fetch_small_files(ref: HubRef) -> HubInput:
    """The small files of `ref` read for its names or its headers (NAMES_FILES in the folder of the ref, or beside
    the .safetensors or .gguf file it names; in a pipeline, the safetensors indexes of every component too)
    downloaded or found in the cache; its weights stay on the Hub (RemoteFiles reads their headers)."""
    named_file, prefix = names_folder(ref)
    allowed = [glob.escape(prefix + name) for name in NAMES_FILES]
    snapshot = download(ref, ref.revision, allowed, [])
    commit = snapshot.name
    listed = repo_listing(ref, commit)
    if named_file and ref.path not in listed and not (snapshot / ref.path).is_file():  # listed, or cached
        raise HubNotFoundError(f"{ref.repo_id} at commit {commit[:12]} has no file {ref.path!r}")
    if not named_file and (snapshot / prefix / pipeline.INDEX).is_file():  # the other components' (vae, ...)
        depth = prefix.count("/") + 1
        indexes = [glob.escape(f) for f in sorted(listed) if f.startswith(prefix) and f.count("/") == depth
                   and f.endswith(".safetensors.index.json") and not (snapshot / f).is_file()]
        if indexes:
            download(ref, commit, indexes, [])
            allowed += indexes
    return HubInput(ref, commit, snapshot, used_files(snapshot, allowed, []))


def names_folder(ref: HubRef) -> tuple[bool, str]:
    """(whether `ref` names a .safetensors or .gguf file, the repo folder it is read in as a path prefix)."""
    named_file = bool(ref.path and ref.path.endswith((".safetensors", ".gguf")))
    folder = ref.path.rpartition("/")[0] if named_file else ref.path
    return named_file, f"{folder}/" if folder else ""


class RemoteFiles(Files):
    """The files of a Hub base read for its names: the small ones in the cache snapshot, the weights listed from
    the repo's cached tree and read by their headers only (`weight_header`), each validated by its format's reader
    (safetensors_io.parse_header, gguf_file.read_header_prefix); `digests` holds the sha256 of the header bytes
    read (repo path → hex)."""

    def __init__(self, found: HubInput):
        self.found = found
        self.listed = repo_listing(found.ref, found.commit)
        self.digests: dict[str, str] = {}
        self._headers: dict[str, Any] = {}

    def _repo_path(self, path: Path) -> str | None:
        return path.relative_to(self.found.snapshot).as_posix() if path.is_relative_to(self.found.snapshot) else None

    def has(self, path: Path) -> bool:
        return path.is_file() or self._repo_path(path) in self.listed

    def _listed_in(self, folder: Path) -> list[str]:
        """The repo paths listed under `folder` (inside the snapshot), relative to it."""
        inside = self._repo_path(folder)
        if inside is None:
            return []
        prefix = "" if inside == "." else f"{inside}/"
        return [name[len(prefix):] for name in self.listed if name.startswith(prefix)]

    def safetensors(self, folder: Path) -> list[str]:
        listed = {name for name in self._listed_in(folder) if "/" not in name and name.endswith(".safetensors")}
        return sorted(listed | set(LOCAL.safetensors(folder)))

    def folders(self, folder: Path) -> list[str]:
        listed = {name.partition("/")[0] for name in self._listed_in(folder) if "/" in name}
        return sorted({name for name in listed if not name.startswith(".")} | set(LOCAL.folders(folder)))

    def header(self, path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        return self._parsed(path, LOCAL.header, parse_header)

    def gguf_header(self, path: Path) -> gguf_file.GGUFHeader:
        return self._parsed(path, LOCAL.gguf_header,
                            lambda raw, size, source: gguf_file.read_header_prefix(raw, size, path, source))

    def _parsed(self, path: Path, local: Callable[[Path], Any], parse: Callable[[bytes, int, str], Any]) -> Any:
        """`parse(header bytes, file size, name for errors)` of the repo's weight file at `path`, its header bytes
        fetched (or read from the cache) once and their sha256 kept in `digests`; `local(path)` for other files."""
        name = self._repo_path(path)
        if name is None:
            return local(path)
        if name not in self._headers:
            ref, commit = self.found.ref, self.found.commit
            if not self.has(path):
                raise HubNotFoundError(f"{ref.repo_id} at commit {commit[:12]} has no file {name!r}")
            raw, size = weight_header(ref.repo_id, commit, name, path)
            self._headers[name] = parse(raw, size, f"{ref.repo_id}/{name}@{commit[:12]}")
            self.digests[name] = hashlib.sha256(raw).hexdigest()
        return self._headers[name]


def weight_header(repo_id: str, commit: str, name: str, cached: Path | None) -> tuple[bytes, int]:
    """The header bytes of the weight file `name` of `repo_id` at `commit` (a safetensors file's first 8 + N bytes, a
    GGUF file's bytes before its tensor data), and the file's size: read from `cached` (its copy in the cache
    snapshot) when there, else fetched (`remote_header`, `remote_gguf_header`)."""
    gguf = name.endswith(".gguf")
    if cached is not None and cached.is_file():
        if not gguf:
            return header_bytes(cached)
        header = gguf_file.read_header(cached)
        with open(cached, "rb") as f:
            return f.read(min(header.size, header.data_start)), header.size
    return (remote_gguf_header if gguf else remote_header)(repo_id, commit, name)


GGUF_FIRST_BYTES = 1 << 18
"""The first Range request for a GGUF header: 256 KiB (a tokenizer's vocabulary makes headers of several MB)."""
MAX_GGUF_HEADER_BYTES = 1 << 28
"""A GGUF header read from the Hub by ranges stops here (256 MiB): a larger one is read from a downloaded file."""


@functools.lru_cache(maxsize=64)
def remote_gguf_header(repo_id: str, commit: str, name: str) -> tuple[bytes, int]:
    """The bytes of a GGUF file on the Hub before its tensor data, and its size, by HTTP Range requests: 8 bytes
    (the size comes with them), then ranges growing 4× (from 256 KiB) as far as the validated fields reach
    (gguf_file.read_header_prefix), never past MAX_GGUF_HEADER_BYTES; kept for the process like `remote_header`."""
    ref, url, data, size = first_bytes(repo_id, commit, name, "GGUF")
    while True:
        try:
            header = gguf_file.read_header_prefix(data, size, Path(name), str(ref))
            break
        except gguf_file.NeedMore as more:
            if more.needed > MAX_GGUF_HEADER_BYTES:
                raise BaseMismatchError(f"{str(ref)!r}: its GGUF header goes on past {MAX_GGUF_HEADER_BYTES:,} bytes; "
                                        "pass the downloaded file instead") from None
            want = min(size, MAX_GGUF_HEADER_BYTES, max(more.needed, 4 * len(data), GGUF_FIRST_BYTES))
            data += byte_range(ref, url, len(data), want - len(data))[0]
    end = min(size, header.data_start)
    if len(data) < end:  # the padding before the tensor data
        data += byte_range(ref, url, len(data), end - len(data))[0]
    return data[:end], size


@functools.lru_cache(maxsize=256)
def remote_header(repo_id: str, commit: str, name: str) -> tuple[bytes, int]:
    """The first 8 + N bytes of a safetensors file on the Hub and its size, by two HTTP Range requests, the second
    once N is checked (safetensors_io.header_length); kept for the process (a commit's files never change), so a
    replay that checks the header and then reads it fetches it once."""
    ref, url, prefix, size = first_bytes(repo_id, commit, name, "safetensors")
    length = header_length(prefix, size, str(ref), BaseMismatchError)
    return prefix + (byte_range(ref, url, 8, length)[0] if length else b""), size


def first_bytes(repo_id: str, commit: str, name: str, kind: str) -> tuple[HubRef, str, bytes, int]:
    """(ref, URL, first 8 bytes, size) of the `kind` weight file `name` on the Hub: one Range request (HubError in
    offline mode)."""
    ref = HubRef(repo_id, name, commit)
    if constants.is_offline_mode():
        raise HubError(f"HF_HUB_OFFLINE is set and {ref} is not in the local Hub cache ({constants.HF_HUB_CACHE}): "
                       f"unset it to fetch the file's {kind} header")
    url = hf_hub_url(repo_id, name, revision=commit)
    return (ref, url, *byte_range(ref, url, 0, 8))


CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


def byte_range(ref: HubRef, url: str, start: int, count: int) -> tuple[bytes, int]:
    """Bytes [start, start + count) (count >= 1) of a file on the Hub by one HTTP Range request, and the file's
    size (from the answer's Content-Range). Never reads further: an answer other than 206 with that range is
    refused before its body is read."""
    data = bytearray()
    try:
        wanted = {**build_hf_headers(), "Range": f"bytes={start}-{start + count - 1}"}
        with get_session().stream("GET", url, headers=wanted, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
            hf_raise_for_status(response)
            span = CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
            if response.status_code != 206 or span is None or int(span[1]) != start:
                raise HubError(f"{constants.ENDPOINT} answered {response.status_code} without the byte range asked "
                               f"for {ref}: its header cannot be read alone")
            for chunk in response.iter_bytes():
                data += chunk[:count - len(data)]
                if len(data) == count:
                    break
    except HubError:
        raise
    except Exception as exc:  # noqa: BLE001 - translated, or raised as it is
        raise hub_failure(exc, ref) from exc
    if len(data) < count:
        raise BaseMismatchError(f"{str(ref)!r}: the Hub sent {len(data)} of the {count} header bytes asked for")
    return bytes(data), int(span[3])


def header_digests(repo_id: str, commit: str, names: list[str]) -> dict[str, str]:
    """sha256 of the header bytes of the weight files `names` (safetensors, GGUF) of `repo_id` at `commit` (read as
    `open_names` reads them): what a recipe records for a base read for its names, checked again on replay."""
    pinned_ref(repo_id, commit, names)
    digests = {}
    for name in names:
        cached = try_to_load_from_cache(repo_id, name, revision=commit)
        raw, _ = weight_header(repo_id, commit, name, Path(cached) if isinstance(cached, str) else None)
        digests[name] = hashlib.sha256(raw).hexdigest()
    return digests


def fetch_files(repo_id: str, commit: str, files: list[str]) -> Path:
    """The snapshot folder of `repo_id` at `commit` holding `files` (repo paths; downloaded when not cached): what
    a recipe names, re-fetched to check and replay it. The names come from a file, so they are checked first."""
    ref = pinned_ref(repo_id, commit, files)
    snapshot = download(ref, commit, [glob.escape(f) for f in files], [])
    missing = [f for f in files if not (snapshot / f).is_file()]
    if missing:
        raise HubNotFoundError(f"{repo_id} at commit {commit[:12]} has no file {missing[0]!r}")
    return snapshot


def pinned_ref(repo_id: str, commit: str, files: list[str]) -> HubRef:
    """The ref of `repo_id` at `commit` whose `files` a recipe names; InvalidArgumentError unless the repo id, the
    commit sha and the file paths inside the repo are valid (they come from a file)."""
    ref = parse_hub_ref(f"{repo_id}@{commit}")
    if ref is None or ref.path or not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise InvalidArgumentError(f"{repo_id!r} at {commit!r} is not a Hub repo id at a commit sha")
    unsafe = [f for f in files if not isinstance(f, str) or parse_hub_ref(f"{repo_id}/{f}") is None]
    if unsafe:
        raise InvalidArgumentError(f"{unsafe[0]!r} is not a file path inside a Hub repo")
    return ref


def shard_patterns(index: Path, folder: str) -> list[str]:
    """Patterns for the shard files that a safetensors index names (the index is untrusted: names are matched
    against the repo's own listing, and Container validates them when it reads)."""
    weight_map = read_json_object(index, BaseMismatchError).get("weight_map")
    if not isinstance(weight_map, dict):
        raise BaseMismatchError(f"{str(index)!r} is not a valid safetensors index (no weight_map object)")
    return sorted({folder + glob.escape(name) for name in weight_map.values() if isinstance(name, str)})


def used_files(snapshot: Path, allowed: list[str], ignore: list[str]) -> tuple[str, ...]:
    """The repo paths of the snapshot's files that the patterns select."""
    present = (p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    return tuple(sorted(filter_repo_objects(present, allow_patterns=allowed, ignore_patterns=ignore)))


def check_found(ref: HubRef, kind: Kind, commit: str, target: Path, files: tuple[str, ...], allow_pickle: bool) -> None:
    """HubNotFoundError when the ref's file or folder, or the weights the kind needs, are not in the repo
    (PickleNotAllowedError when the repo's listing shows pickled adapter weights only)."""
    at = f"{ref.repo_id} at commit {commit[:12]}"
    where = f" in {ref.path!r}" if ref.path else ""
    if ref.path and not target.exists():
        raise HubNotFoundError(f"{at} has no file {ref.path!r}, nor a folder of that name holding "
                               f"{'adapter' if kind == 'adapter' else 'model'} files")
    if target.is_file() or any(f.endswith((".safetensors", ".npz", *PICKLE_SUFFIXES)) for f in files):
        return
    folder = f"{ref.path}/" if ref.path else ""
    pickles = sorted(f for f in repo_listing(ref, commit) if f.startswith(folder) and f.endswith(PICKLE_SUFFIXES)
                     and "/" not in f[len(folder):])
    if kind == "adapter":
        if pickles and not allow_pickle:
            raise PickleNotAllowedError(f"{at} holds pickled adapter weights only ({', '.join(pickles)}); pass "
                                        "--allow-pickle (allow_pickle=True) to load them with weights_only=True")
        raise HubNotFoundError(f"{at} holds no adapter weights{where} ({', '.join(ADAPTER_WEIGHTS)}); name one file "
                               f"of the repo as {ref.repo_id}/<file>.safetensors or a folder as {ref.repo_id}/<folder>")
    only = f" (only pickled weights: {', '.join(pickles)})" if pickles else ""
    raise HubNotFoundError(f"{at} holds no safetensors weights{where}{only}; base models are read from safetensors, "
                           "pickled weights are never downloaded")


def repo_listing(ref: HubRef, commit: str) -> set[str]:
    """The repo's files at `commit` from the tree listing that snapshot_download cached (empty when none is)."""
    try:
        return {f.path for f in get_cached_repo_tree(ref.repo_id, revision=commit)}
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        return set()


def download(ref: HubRef, revision: str | None, allow: list[str], ignore: list[str]) -> Path:
    """snapshot_download of the files matching `allow` (not `ignore`) at `revision`; the snapshot folder.

    huggingface_hub's failures become one-line HubError / HubAccessError / HubNotFoundError (token masked)."""
    try:
        return Path(snapshot_download(ref.repo_id, revision=revision, allow_patterns=allow, ignore_patterns=ignore))
    except Exception as exc:  # noqa: BLE001 - translated below, or raised as it is
        raise hub_failure(exc, ref) from exc


def hub_failure(exc: Exception, ref: HubRef) -> Exception:
    """The typed adaptools error for a failure of huggingface_hub while resolving `ref` (`exc` itself if unknown)."""
    endpoint, repo = constants.ENDPOINT, ref.repo_id
    said = getattr(exc, "server_message", None) or ""
    detail = f" (the Hub said: {said.strip().splitlines()[0]})" if said.strip() else ""
    login = "set HF_TOKEN to a token of an account that may read it, or run `hf auth login`"
    if isinstance(exc, GatedRepoError):
        error: Exception = HubAccessError(
            f"{repo} is a gated repo: request access at {endpoint}/{repo} (log in and accept its conditions), then "
            f"{login}{detail}")
    elif isinstance(exc, RepositoryNotFoundError):
        error = HubNotFoundError(
            f"{str(ref)!r} is not a local path, and {endpoint} has no repo {repo} that "
            f"{'this token' if get_token() else 'an anonymous request'} can read; check the name, and for a "
            f"private repo {login}")
    elif isinstance(exc, RevisionNotFoundError):
        error = HubNotFoundError(f"{repo} on {endpoint} has no revision {ref.revision!r} (a branch, tag or commit)")
    elif isinstance(exc, RemoteEntryNotFoundError):
        error = HubNotFoundError(f"a file of {ref} is no longer on {endpoint}{detail}")
    elif isinstance(exc, LocalEntryNotFoundError) and isinstance(exc.__cause__, HfHubHTTPError):
        return hub_failure(exc.__cause__, ref)  # the Hub answered; the cache had no copy to fall back on
    elif isinstance(exc, LocalEntryNotFoundError):
        nowhere = f"{str(ref)!r} is not a local path, nor in the local Hub cache ({constants.HF_HUB_CACHE})"
        error = HubError(f"{nowhere}, and HF_HUB_OFFLINE is set: unset it to download" if constants.is_offline_mode()
                         else f"{nowhere}, and {endpoint} cannot be reached: {exc.__cause__ or exc}")
    elif isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            error = HubAccessError(f"{endpoint} refused the credentials (401) for {repo}{detail}: {login}")
        elif status == 403:
            error = HubAccessError(f"{endpoint} refused access (403) to {repo}{detail}: {login}")
        else:
            error = HubError(f"{endpoint} answered {status} for {ref}{detail}; run again later")
    elif isinstance(exc, httpx.HTTPError):
        error = HubError(f"lost the connection to {endpoint} while downloading {ref} ({type(exc).__name__}: {exc}); "
                         "run again to resume")
    elif isinstance(exc, HFValidationError):
        error = InvalidArgumentError(f"{str(ref)!r} is not a valid Hub ref: {exc}")
    elif isinstance(exc, OSError):
        error = HubError(f"cannot store {ref} in the Hub cache {constants.HF_HUB_CACHE}: {exc}")
    else:
        return exc
    return type(error)(masked(" ".join(str(error).split())))


def masked(text: str) -> str:
    """`text` with the Hub token (if one is configured) replaced by ***."""
    token = get_token()
    return text.replace(token, "***") if token else text
