"""sha256 of input files taken from an operation's own reads, kept for the recipe (which would otherwise read every
input again afterwards).

`SequentialHasher` hashes one file in file order while its byte ranges are read in any order, from any thread:
each range reported done extends the hashed prefix when it touches it, from a memory map of just that stretch (the
page cache the read went through), so the file is not read from disk a second time. `record` / `lookup` keep the
results keyed by (resolved path, size, mtime_ns, inode): a file changed since it was hashed is not found.
"""
from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import RecipeError

WINDOW_BYTES = 2**23
"""At most this much of a file is mapped at once while hashing (the mapping's pages count as resident memory)."""

_digests: dict[tuple[str, int, int, int], str] = {}
_hashed: dict[str, tuple[str, int, int, int]] = {}
"""resolved path -> the key under which that file was last hashed."""
_lock = threading.Lock()


def file_key(path: str | os.PathLike) -> tuple[str, int, int, int]:
    """(resolved path, size, mtime_ns, inode) of the file at `path` now."""
    stat = os.stat(path)
    return str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino


def record(key: tuple[str, int, int, int], sha256: str) -> None:
    """Remember the hex sha256 of the file whose `file_key` was `key`."""
    with _lock:
        _digests[key] = sha256
        _hashed[key[0]] = key


def forget() -> None:
    """Drop every recorded digest (a command starts: only its own reads count)."""
    with _lock:
        _digests.clear()
        _hashed.clear()


def lookup(path: str | os.PathLike) -> str | None:
    """The recorded sha256 of the file at `path`; None when it was never hashed by a read. RecipeError when it was
    hashed or read (`reading`), but the file changed since (a recipe would name bytes the operation did not read)."""
    try:
        key = file_key(path)
    except OSError:
        return None
    with _lock:
        found = _digests.get(key)
        earlier = _hashed.get(key[0])
    if found is None and earlier is not None and earlier != key:
        raise RecipeError(f"input {str(path)!r} changed while the command ran (after it was read): the output was "
                          "made from other bytes than the file now holds; run the command again")
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
        if _hashed.get(before[0]) != before:  # the latest read counts (the digest of an earlier one is stale)
            _hashed[before[0]] = before


class SequentialHasher:
    """sha256 of one file, fed by byte ranges [start, end) that are done in any order (`done`, thread-safe);
    `finish` hashes what no range covered (the header, the end) and records the digest."""

    def __init__(self, path: str | os.PathLike, size: int | None = None):
        """`size`: the file's size when its header was read and validated; another size now means it changed."""
        self.path = Path(path)
        self._file = open(self.path, "rb", buffering=0)
        self.key = file_key(self.path)
        self._size = self.key[1]
        if size is not None and size != self._size:
            self._file.close()
            raise changed_error(self.path, f"{size:,} bytes when its header was read, {self._size:,} now")
        self._sha = hashlib.sha256()
        self._position = 0
        self._pending: dict[int, int] = {}
        self._state = threading.Lock()
        self._hashing = threading.Lock()

    def done(self, start: int, end: int) -> None:
        """Bytes [start, end) have been read; hash the prefix they complete (unless another thread is at it: it
        takes these too)."""
        with self._state:
            self._pending[start] = max(end, self._pending.get(start, end))
        while self._hashing.acquire(blocking=False):
            try:
                self._advance()
            finally:
                self._hashing.release()
            with self._state:  # ranges that arrived while this thread hashed are taken by the next round
                if self._position not in self._pending:
                    return

    def _advance(self) -> None:
        while True:
            with self._state:
                end = self._pending.pop(self._position, None)
            if end is None:
                return
            self._hash(self._position, end)

    def _hash(self, start: int, end: int) -> None:
        """Hash bytes [start, end) of the file (in windows of WINDOW_BYTES) and move the position to `end`."""
        end = min(end, self._size)
        while start < end:
            offset = start - start % mmap.ALLOCATIONGRANULARITY
            stop = min(end, offset + WINDOW_BYTES)
            with mmap.mmap(self._file.fileno(), stop - offset, access=mmap.ACCESS_READ, offset=offset) as window:
                with memoryview(window) as view:
                    self._sha.update(view[start - offset:])
            start = stop
        self._position = max(self._position, end)

    def finish(self) -> str:
        """Hash the rest of the file (in order, with every range still pending), record and return the digest."""
        with self._hashing:
            self._advance()
            with self._state:
                pending = sorted(self._pending.items())
                self._pending.clear()
            for start, end in pending:
                if end > self._position:
                    self._hash(self._position, end)
            self._hash(self._position, self._size)
            self._file.close()
        now = file_key(self.path)
        if now != self.key:
            raise changed_error(self.path, f"size {self.key[1]:,} and mtime {self.key[2]} when read, size {now[1]:,} "
                                f"and mtime {now[2]} now")
        digest = self._sha.hexdigest()
        record(self.key, digest)
        return digest

    def close(self) -> None:
        """Close the file without recording anything (the operation failed)."""
        self._file.close()
