"""Object-store inputs of batch jobs (DESIGN §19): an input given as a URL (one object, or a folder prefix such as a
PEFT or Hugging Face folder) is fetched by the worker through fsspec into a cache under the jobs folder,
`.adaptools-batch/inputs/<digest of the URL>/copy/<name>`, once per task; the job runs on that copy, so its recipe
records the copy's path and sha256 like any local input, and a rerun's skip check compares the same.

The cache's `source.json` keeps each object's size and ETag and each file's sha256 as fetched: a later task whose
listing of the URL matches it reuses the copy (hashed again locally, so a copy edited since is fetched again);
anything else (a changed object, a store without ETags) is fetched again into a fresh folder, renamed into place
whole (one worker at a time per URL: a lock file beside the cache). Object names become file names only when
plain (no separators, no `..`), their count and total size are bounded, and each file must have exactly its
listed size.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path, PurePosixPath

import fsspec

from ..errors import AdaptoolsError, InputNotFoundError, InvalidArgumentError
from ..names import plain_name
from ..recipe import sha256_file
from .jobs import STAGING, url_name

INPUTS = "inputs"
"""Folder under STAGING holding the fetched copies of object-store inputs."""
SOURCE = "source.json"
MAX_INPUT_FILES = 10_000
"""Most objects one input URL may hold."""
CHUNK_BYTES = 2**22


def input_copy(folder: Path, url: str) -> Path:
    """Where the object-store input `url` of a jobs file in `folder` is fetched to (the path its jobs run on)."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return folder / STAGING / INPUTS / digest / "copy" / url_name(url)


def fetch_input(folder: Path, url: str) -> Path:
    """Fetch the object-store input `url` into its cache (input_copy) unless the copy there still matches the
    objects' sizes and ETags; return the copy. InputNotFoundError when it is missing or cannot be read (no
    credentials, no network), InvalidArgumentError when its object names or sizes cannot be a local copy."""
    copy = input_copy(folder, url)
    try:
        fs, root = fsspec.url_to_fs(url)
        fs.invalidate_cache()
        listing = remote_listing(fs, root.rstrip("/"), url, copy.name)
        home = copy.parent.parent
        home.parent.mkdir(parents=True, exist_ok=True)
        with open(home.parent / f".{home.name}.lock", "ab") as lock:  # the tasks of one group start together
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not cached(copy, listing):
                download(fs, root.rstrip("/"), listing, copy, url)
    except FileNotFoundError:
        raise InputNotFoundError(f"input {url!r} does not exist") from None
    except AdaptoolsError:
        raise
    except Exception as exc:  # noqa: BLE001 - fsspec backends raise their own types (botocore's, aiohttp's)
        raise InputNotFoundError(f"input {url!r} could not be read: {' '.join(str(exc).split())[:300]}") from None
    return copy


def remote_listing(fs: fsspec.AbstractFileSystem, root: str, url: str, name: str) -> dict[str, dict]:
    """{relative path under copy/..: {"size", "etag"}} of the objects at `root` (one object: its own name; a
    prefix: `name/` and each object's path below it), checked: plain names, at most MAX_INPUT_FILES, sizes >= 0."""
    info = fs.info(root)
    if info.get("type") == "file":
        found = {name: info}
    else:
        found = {f"{name}/{key[len(root) + 1:]}": meta for key, meta in fs.find(root, detail=True).items()
                 if meta.get("type") == "file" and key.startswith(f"{root}/")}
    if not found:
        raise InputNotFoundError(f"input {url!r} holds no object")
    if len(found) > MAX_INPUT_FILES:
        raise InvalidArgumentError(f"input {url!r} holds more than {MAX_INPUT_FILES} objects")
    listing = {}
    for rel, meta in sorted(found.items()):
        for part in rel.split("/"):
            plain_name(part, f"input {url!r}: object {rel!r}", InvalidArgumentError)
        size = meta.get("size")
        if not isinstance(size, int) or size < 0:
            raise InvalidArgumentError(f"input {url!r}: object {rel!r} has no size")
        etag = meta.get("ETag") or meta.get("etag")
        listing[rel] = {"size": size, "etag": etag if isinstance(etag, str) else None}
    return listing


def cached(copy: Path, listing: dict[str, dict]) -> bool:
    """Whether the copy's source.json records `listing` (every object with an ETag) and its files still hash to
    the sha256 they had when fetched (digests remembered: the run and skip check of this task read them again)."""
    try:
        source = json.loads((copy.parent.parent / SOURCE).read_text(encoding="utf-8"))
        recorded = {rel: {"size": entry["size"], "etag": entry["etag"]} for rel, entry in source.items()}
        if recorded != listing or any(entry["etag"] is None for entry in listing.values()):
            return False
        base = copy.parent
        files = sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
        return files == sorted(listing) and all(sha256_file(base / rel, remember=True) == source[rel]["sha256"]
                                                for rel in files)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def download(fs: fsspec.AbstractFileSystem, root: str, listing: dict[str, dict], copy: Path, url: str) -> None:
    """Fetch every listed object (below `root`, as remote_listing named them) into a fresh folder beside the cache
    (each exactly its listed size, hashed as it is written), write its source.json, and put it in place of the
    cache whole. Called with the URL's lock held: fresh folders of this URL left by dead workers are removed."""
    home = copy.parent.parent
    for stale in home.parent.glob(f".{home.name}.*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    total = sum(entry["size"] for entry in listing.values())
    free = shutil.disk_usage(home.parent).free
    if total > free:
        raise InvalidArgumentError(f"input {url!r} needs {total / 2**30:.1f} GiB; {free / 2**30:.1f} GiB are free")
    fresh = home.parent / f".{home.name}.{uuid.uuid4().hex}"
    try:
        source = {}
        for rel, entry in listing.items():
            remote = root if "/" not in rel else f"{root}/{rel.split('/', 1)[1]}"
            source[rel] = {**entry, "sha256": fetch_object(fs, remote, fresh / "copy" / rel, entry["size"], url)}
        (fresh / SOURCE).write_text(json.dumps(source, indent=1), encoding="utf-8")
        old = home.parent / f".{home.name}.{uuid.uuid4().hex}.old"
        if home.exists():
            os.replace(home, old)
        os.replace(fresh, home)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)


def fetch_object(fs: fsspec.AbstractFileSystem, remote: str, local: Path, size: int, url: str) -> str:
    """Copy the object `remote` to `local`, refusing more or fewer bytes than `size`; its sha256."""
    local.parent.mkdir(parents=True, exist_ok=True)
    digest, written = hashlib.sha256(), 0
    with fs.open(remote, "rb") as src, open(local, "xb") as dst:
        while chunk := src.read(min(CHUNK_BYTES, size + 1 - written)):
            written += len(chunk)
            if written > size:
                break
            digest.update(chunk)
            dst.write(chunk)
    if written != size:
        raise InvalidArgumentError(f"input {url!r}: object {PurePosixPath(remote).name!r} changed while it was "
                                   f"fetched ({written} bytes, listed {size})")
    return digest.hexdigest()
