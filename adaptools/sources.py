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

Every Hub input resolved inside `recording()` is logged with its commit and files, so that recipes and cards can
name it by repo id and commit (a replay downloads exactly that commit) and hash just the files it used.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from huggingface_hub import constants, get_cached_repo_tree, get_token, snapshot_download
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import HFValidationError, filter_repo_objects, httpx, validate_repo_id

from .adapter import Adapter
from .errors import (
    BaseMismatchError,
    HubAccessError,
    HubError,
    HubNotFoundError,
    InvalidArgumentError,
    PickleNotAllowedError,
)
from .checkpoints import Container, open_container
from .formats import load_adapter
from .checkpoints.gguf import split_names
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
    log = _RECORDED.get()
    earlier = None if log is None else log.get(str(source))
    if earlier is None:
        found = fetch(ref, kind, allow_pickle=allow_pickle)
    else:  # again in one command: the same commit, even if the branch moved meanwhile (and no request when cached)
        found = fetch(replace(ref, revision=earlier.commit), kind, allow_pickle=allow_pickle)
        found = replace(found, ref=ref, files=tuple(sorted({*earlier.files, *found.files})))
    if log is not None:
        log[str(source)] = found
    return found.local


def open_base(base: str | os.PathLike | Container, kind: Kind = "checkpoint") -> Container:
    """The base container (`adaptools.checkpoints`) of a local folder or file, or of a Hub ref ("model": with tokenizer and generation files)."""
    return base if isinstance(base, Container) else open_container(resolve(base, kind))


def load(path: str | os.PathLike, allow_pickle: bool = False, base: str | os.PathLike | None = None,
         **options: float | None) -> Adapter:
    """Load an adapter (a local path or a Hub ref); with `base` (likewise), kohya names are mapped to its module paths;
    `options` go to the format reader (formats.load_adapter)."""
    local = resolve(path, "adapter", allow_pickle=allow_pickle)
    adapter = load_adapter(local, allow_pickle=allow_pickle, base=None if base is None else resolve(base, "checkpoint"),
                           **options)
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


def fetch_files(repo_id: str, commit: str, files: list[str]) -> Path:
    """The snapshot folder of `repo_id` at `commit` holding `files` (repo paths; downloaded when not cached): what
    a recipe names, re-fetched to check and replay it. The names come from a file, so they are checked first."""
    ref = parse_hub_ref(f"{repo_id}@{commit}")
    if ref is None or ref.path or not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise InvalidArgumentError(f"{repo_id!r} at {commit!r} is not a Hub repo id at a commit sha")
    unsafe = [f for f in files if not isinstance(f, str) or parse_hub_ref(f"{repo_id}/{f}") is None]
    if unsafe:
        raise InvalidArgumentError(f"{unsafe[0]!r} is not a file path inside a Hub repo")
    snapshot = download(ref, commit, [glob.escape(f) for f in files], [])
    missing = [f for f in files if not (snapshot / f).is_file()]
    if missing:
        raise HubNotFoundError(f"{repo_id} at commit {commit[:12]} has no file {missing[0]!r}")
    return snapshot


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
