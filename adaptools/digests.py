"""sha256 of input files taken while an operation runs, kept for the recipe (which would otherwise read every input
again afterwards).

`SequentialHasher` hashes one file in file order, through memory maps of stretches of it, on the first of an
operation's threads that asks, while the others go on with their work (a merge's other workers merge); the file
is read once, through the page cache the operation reads it from. `record` / `lookup` keep the
results keyed by the file's `FileKey` (resolved path, size, mtime, inode, ctime, device): a file changed since it
was hashed is not found.

Digests of large files also persist between commands, as git's index and the web UIs' hash caches keep them: one
small JSON file per hashed file of PERSIST_MIN_BYTES or more, `<cache>/sha256/<device>-<inode>.json`, holding its
size, mtime, ctime and sha256; `<cache>` is `$ADAPTOOLS_CACHE_DIR` (set empty: no persistent cache) or
`$XDG_CACHE_HOME/adaptools` (default `~/.cache/adaptools`). A later command merging into the same unchanged base
takes its sha256 from there instead of reading 7 GB through sha256 again. Any write to a file moves its ctime
(which no tool can set back), so an entry is trusted only while size, mtime and ctime are all as recorded; a file
is recorded only when its last change is more than RACY_NS older than the record, so a change in the same clock
tick as the hashing cannot go unnoticed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import re
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from .errors import RecipeError

WINDOW_BYTES = 2**23
"""At most this much of a file is mapped at once while hashing (the mapping's pages count as resident memory)."""

RACY_NS = 3 * 10**9
"""A file changed less than this long before its digest is recorded is not recorded persistently."""
PERSIST_MIN_BYTES = 2**26
"""Only files of at least this size persist (smaller ones hash in a blink; the cache stays a few entries)."""
CACHE_ENTRY_BYTES = 4096
"""A persistent entry larger than this is not ours: ignored."""
_SHA256 = re.compile(r"[0-9a-f]{64}")


class FileKey(NamedTuple):
    """What identifies a file's bytes without reading them: equal keys, equal bytes (short of a change within
    one clock tick, which `record` keeps out of the persistent cache)."""

    path: str
    size: int
    mtime_ns: int
    inode: int
    ctime_ns: int
    device: int


_digests: dict[FileKey, str] = {}
_hashed: dict[str, FileKey] = {}
"""resolved path -> the key under which that file was last hashed."""
_lock = threading.Lock()


def file_key(path: str | os.PathLike) -> FileKey:
    """The `FileKey` of the file at `path` now."""
    stat = os.stat(path)
    return FileKey(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns,
                   stat.st_dev)


def cache_folder() -> Path | None:
    """Where digests persist (`<cache>/sha256`), None when $ADAPTOOLS_CACHE_DIR is set empty."""
    configured = os.environ.get("ADAPTOOLS_CACHE_DIR")
    if configured is not None:
        return Path(configured) / "sha256" if configured else None
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "adaptools" / "sha256"


def _entry_path(key: FileKey) -> Path | None:
    folder = cache_folder()
    return None if folder is None else folder / f"{key.device}-{key.inode}.json"


def _stored(key: FileKey) -> str | None:
    """The persisted sha256 of the file of `key` when its entry matches the key's size, mtime and ctime."""
    path = _entry_path(key)
    if path is None or key.size < PERSIST_MIN_BYTES:
        return None
    try:  # a regular file only, not followed through a link, never waited on (a FIFO)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            entry = json.loads(f.read(CACHE_ENTRY_BYTES + 1))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(entry, dict) or [entry.get(k) for k in ("size", "mtime_ns", "ctime_ns")] != \
            [key.size, key.mtime_ns, key.ctime_ns]:
        return None
    digest = entry.get("sha256")
    return digest if isinstance(digest, str) and _SHA256.fullmatch(digest) else None


def persist(key: FileKey, sha256: str) -> None:
    """Write the entry of a file of at least PERSIST_MIN_BYTES whose last change is older than RACY_NS (atomically;
    a cache that cannot be written is left alone)."""
    path = _entry_path(key)
    if path is None or key.size < PERSIST_MIN_BYTES or max(key.mtime_ns, key.ctime_ns) > time.time_ns() - RACY_NS:
        return
    entry = json.dumps({"size": key.size, "mtime_ns": key.mtime_ns, "ctime_ns": key.ctime_ns, "sha256": sha256})
    with contextlib.suppress(OSError):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, staged = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(entry)
            os.replace(staged, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)


def record(key: FileKey, sha256: str) -> None:
    """Remember the hex sha256 of the file whose `file_key` was `key` (for this command, and persistently)."""
    with _lock:
        _digests[key] = sha256
        _hashed[key.path] = key
    persist(key, sha256)


def forget() -> None:
    """Drop every recorded digest (a command starts: only its own reads count)."""
    with _lock:
        _digests.clear()
        _hashed.clear()


def lookup(path: str | os.PathLike) -> str | None:
    """The recorded sha256 of the file at `path` (by this command's reads, or persisted by an earlier command's
    and then noted as this command's); None when unknown. RecipeError when it was hashed or read (`reading`), but
    the file changed since (a recipe would name bytes the operation did not read)."""
    try:
        key = file_key(path)
    except OSError:
        return None
    with _lock:
        found = _digests.get(key)
        earlier = _hashed.get(key.path)
    if found is None and earlier is not None and earlier != key:
        raise RecipeError(f"input {str(path)!r} changed while the command ran (after it was read): the output was "
                          "made from other bytes than the file now holds; run the command again")
    if found is None and (found := _stored(key)) is not None:
        with _lock:  # from now on a change to the file is a change while the command ran
            _digests[key] = found
            _hashed.setdefault(key.path, key)
    return found


def changed_error(path: Path, detail: str) -> RecipeError:
    """The error for an input that changed while a command read it."""
    return RecipeError(f"input {str(path)!r} changed while the command ran ({detail}): no recipe can name the bytes "
                       "the output was made from; run the command again")


@contextlib.contextmanager
def reading(path: str | os.PathLike) -> Iterator[None]:
    """Around a whole read of the file at `path`: its (size, mtime, inode) must be the same after the read as before
    (else RecipeError: it changed while it was read), and is noted, so that a recipe's sha256 of the file taken
    later (`lookup`) is refused if the file changed after the command's last read of it."""
    try:
        before = file_key(path)
    except OSError:  # the reader reports a missing or unreadable file
        yield
        return
    yield
    try:
        after = file_key(path)
    except OSError:
        after = None
    if after != before:
        raise changed_error(Path(path), "while it was read")
    with _lock:
        if _hashed.get(before.path) != before:  # the latest read counts (the digest of an earlier one is stale)
            _hashed[before.path] = before


class SequentialHasher:
    """sha256 of one file in file order, taken by the first thread that asks (`hash_rest`; the others go on with their
    work) or at the latest by `finish`, which records the digest once the file is found unchanged."""

    def __init__(self, path: str | os.PathLike, size: int | None = None):
        """`size`: the file's size when its header was read and validated; another size now means it changed."""
        self.path = Path(path)
        self._file = open(self.path, "rb", buffering=0)
        self.key = file_key(self.path)
        self._size = self.key.size
        if size is not None and size != self._size:
            self._file.close()
            raise changed_error(self.path, f"{size:,} bytes when its header was read, {self._size:,} now")
        self._sha = hashlib.sha256()
        self._position = 0
        self._hashing = threading.Lock()

    def hash_rest(self) -> None:
        """Hash the file from where hashing stopped to its end, unless another thread is at it. A merge's worker
        calls it after a step: one worker then hashes the base in order (at about 1.5 GB/s, one core's SHA-256)
        while the others merge, instead of all of it waiting for the end."""
        if self._hashing.acquire(blocking=False):
            try:
                self._hash(self._position, self._size)
            finally:
                self._hashing.release()

    def _hash(self, start: int, end: int) -> None:
        """Hash bytes [start, end) of the file (in windows of WINDOW_BYTES) and move the position to `end`."""
        end = min(end, self._size)
        while start < end:
            offset = start - start % mmap.ALLOCATIONGRANULARITY
            stop = min(end, offset + WINDOW_BYTES)
            now = os.fstat(self._file.fileno()).st_size
            if now < stop:  # reading a mapping past the end of a file kills the process (SIGBUS): refuse first
                raise changed_error(self.path, f"{self._size:,} bytes when opened, {now:,} while it was hashed")
            with mmap.mmap(self._file.fileno(), stop - offset, access=mmap.ACCESS_READ, offset=offset) as window:
                with memoryview(window) as view:
                    self._sha.update(view[start - offset:])
            start = stop
        self._position = max(self._position, end)

    def finish(self) -> str:
        """Hash what is not hashed yet, check that the file did not change, record and return the digest."""
        with self._hashing:
            self._hash(self._position, self._size)
            self._file.close()
        now = file_key(self.path)
        if now != self.key:
            raise changed_error(self.path, f"size {self.key.size:,} and mtime {self.key.mtime_ns} when read, size "
                                f"{now.size:,} and mtime {now.mtime_ns} now")
        digest = self._sha.hexdigest()
        record(self.key, digest)
        return digest

    def close(self) -> None:
        """Close the file without recording anything (the operation failed)."""
        self._file.close()
