"""Positioned writes into output files: new files only, whole-buffer pwrites, kernel copies, and `BlockWriter`,
which writes a large region of a file with direct I/O.

`BlockWriter` gathers the pieces written into a region (tiles of merged rows, tensors copied from the base, in
any order and from any thread) into aligned blocks of BLOCK_BYTES. A block is written once, with one O_DIRECT
write on the writer's own thread, when all of its bytes are there. So the kernel allocates, copies and writes back
no page-cache page for the output: on the machines this was measured on, buffered writes of a multi-GB file cost
more CPU time than the merge math (`benchmarks/RESULTS.md`). The buffers (MAX_BLOCKS for the whole process) are
shared by every writer. Where a file system refuses O_DIRECT, or a block waits for its pieces while every buffer
is taken (it is then spilled), the writes are buffered as before: same bytes. Which outputs are written this way
is the shard writer's choice (`DIRECT_MIN_BYTES`).
"""
from __future__ import annotations

import errno
import itertools
import mmap
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

COPY_CHUNK = 16 * 2**20
ALIGN = 4096
"""Offsets, lengths and buffer addresses of direct writes are multiples of this (the page size; a multiple of the
logical block size of the disks and file systems that support O_DIRECT)."""
BLOCK_BYTES = 8 * 2**20
"""Bytes per direct write (a multiple of ALIGN)."""
MAX_BLOCKS = 16
"""Block buffers of the process at once (filling, or queued for a writer thread), shared by every BlockWriter."""
DIRECT_MIN_BYTES = 4 * 2**30
"""Outputs smaller than this are written buffered: the page cache takes them at memory speed and writes them back
later. Larger ones outgrow what the kernel lets a process keep dirty (a fifth of the free memory by default):
buffered writers are then held to the disk's speed and pay the page cache's CPU on top."""

_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP)
"""Errors of a direct write that mean "not with direct I/O here" (the bytes are then written buffered)."""
_SEEK_LOCK = threading.Lock()
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)


def create_new(path: os.PathLike | str) -> int:
    """A descriptor of a new file at `path`, opened for writing; FileExistsError when anything (a file, a link, even
    a dangling one) is there: an output file never truncates or writes through what exists."""
    return os.open(path, _NEW_FILE, 0o666)


def positioned(op: str, fd: int, arg, offset: int):
    """os.pread / os.pwrite (`op` "read" / "write": arg is a count / the data), or seek + read / write under a lock
    where there is none (Windows)."""
    native = getattr(os, "p" + op, None)
    if native is not None:
        return native(fd, arg, offset)
    with _SEEK_LOCK:
        os.lseek(fd, offset, os.SEEK_SET)
        return getattr(os, op)(fd, arg)


def pwrite_all(fd: int, data, offset: int) -> None:
    """Write every byte of `data` at `offset` of `fd` (a positioned write may take only part)."""
    view = memoryview(data).cast("B")
    while view:
        written = positioned("write", fd, view, offset)
        view, offset = view[written:], offset + written


def pread_into(fd: int, view: memoryview, offset: int) -> None:
    """Fill `view` with the bytes at `offset` of `fd`; OSError when the file ends first."""
    while view:
        n = os.preadv(fd, [view], offset) if hasattr(os, "preadv") else _read_chunk(fd, view, offset)
        if not n:
            raise OSError(f"the source ends before byte {offset + len(view)}")
        view, offset = view[n:], offset + n


def _read_chunk(fd: int, view: memoryview, offset: int) -> int:
    """One positioned read into `view` where there is no preadv; bytes read."""
    chunk = positioned("read", fd, min(len(view), COPY_CHUNK), offset)
    view[:len(chunk)] = chunk
    return len(chunk)


def copy_range(src: int, dst: int, offset: int, position: int, count: int) -> None:
    """Copy `count` bytes at `offset` of file `src` to `position` of file `dst` (copy_file_range where available)."""
    if hasattr(os, "copy_file_range"):
        try:
            while count:
                n = os.copy_file_range(src, dst, count, offset, position)
                if n == 0:
                    raise OSError(f"the source ends before byte {offset + count}")
                offset, position, count = offset + n, position + n, count - n
            return
        except OSError as exc:  # e.g. unsupported by the file system: copy through memory from where it stopped
            if exc.errno is None:
                raise
    while count:
        chunk = positioned("read", src, min(count, COPY_CHUNK), offset)
        if not chunk:
            raise OSError(f"the source ends before byte {offset + count}")
        pwrite_all(dst, chunk, position)
        offset, position, count = offset + len(chunk), position + len(chunk), count - len(chunk)


def _buffer() -> mmap.mmap:
    """A new block buffer: private anonymous memory, page-aligned (as direct writes need), in huge pages where the
    system gives them on request: a direct write of 4 KiB pages is cut into many small requests (a virtio disk
    takes about 254 segments per request), one of 2 MiB pages into a few large ones (measured: 8 MiB writes 1.7x
    as fast)."""
    buffer = mmap.mmap(-1, BLOCK_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buffer.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):  # no transparent huge pages here: 4 KiB pages, same bytes
        pass
    return buffer


def open_direct(path: os.PathLike | str, fd: int) -> int | None:
    """A second descriptor, with O_DIRECT, of the file open as `fd` at `path`; None where the platform or the file
    system has no direct I/O (or `path` is no longer that file)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        direct = os.open(path, os.O_WRONLY | flag | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    mine, theirs = os.fstat(fd), os.fstat(direct)
    if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
        os.close(direct)
        return None
    return direct


@dataclass(eq=False)
class _Block:
    """Block `index` of a region: file bytes [lo, hi), gathered in `buffer` (file offset index·BLOCK_BYTES at 0);
    `serial`: its place in the order blocks are opened."""

    index: int
    lo: int
    hi: int
    buffer: mmap.mmap
    serial: int = 0
    filled: int = 0
    pending: int = 0
    pieces: list[tuple[int, int]] = field(default_factory=list)

    def view(self, start: int, stop: int) -> memoryview:
        """The buffer's bytes for file offsets [start, stop)."""
        origin = self.index * BLOCK_BYTES
        return memoryview(self.buffer)[start - origin:stop - origin]


class _BufferPool:
    """The block buffers of every BlockWriter of the process, at most MAX_BLOCKS (one more only while every buffer
    is being filled), and the lock that guards them and every writer's blocks. A writer that needs a buffer when
    none is free waits for a writer thread to free one, or spills the oldest idle block of any open writer."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.free: list[mmap.mmap] = []
        self.allocated = 0
        self.queued = 0
        self.writers: list[BlockWriter] = []
        self.serials = itertools.count()
        """Numbers blocks in the order they are opened (the oldest idle block is spilled first)."""

    def take(self) -> mmap.mmap:
        """A buffer (the lock held): free, new, freed by a writer thread, or taken from a spilled block."""
        while True:
            if self.free:
                return self.free.pop()
            if self.allocated < MAX_BLOCKS:
                self.allocated += 1
                return _buffer()
            if self.queued:
                self.cond.wait()
                continue
            idle = [(block.serial, block, writer) for writer in self.writers for block in writer.idle_blocks()]
            if not idle:  # every buffer is being filled right now: one more
                self.allocated += 1
                return _buffer()
            _, block, writer = min(idle, key=lambda item: item[0])
            writer.spill(block)
            return block.buffer

    def opened(self, writer: BlockWriter) -> None:
        with self.cond:
            self.writers.append(writer)

    def closed(self, writer: BlockWriter) -> None:
        """`writer` is done; with the last writer gone the free buffers are released."""
        with self.cond:
            if writer in self.writers:
                self.writers.remove(writer)
            if not self.writers:  # no buffer is in use
                self.allocated = 0
                self.free.clear()


_POOL = _BufferPool()


class BlockWriter:
    """Bytes [start, end) of the file open as `fd` (buffered) and `direct` (O_DIRECT), written in any order from any
    thread: each byte once, by `write` or `copy`. `close` returns once all is on its way to the disk; `abort` drops
    what has not been written. A failure of the writer thread is raised by the next call."""

    def __init__(self, fd: int, direct: int, start: int, end: int):
        self._fd, self._direct, self._start, self._end = fd, direct, start, end
        self._use_direct = True
        self._blocks: dict[int, _Block] = {}
        self._spilled: set[int] = set()
        self._failure: BaseException | None = None
        self._aborted = False
        self._cond = _POOL.cond
        self._queue: queue.SimpleQueue[_Block | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="adaptools-direct-writer", daemon=True)
        self._thread.start()
        _POOL.opened(self)

    def write(self, data, offset: int) -> None:
        """Write the bytes of `data` (a buffer) at file offset `offset`."""
        view = memoryview(data).cast("B")
        self._pieces(offset, len(view), lambda into, at: into.__setitem__(slice(None), view[at:at + len(into)]),
                     lambda at, lo, hi: pwrite_all(self._fd, view[at:at + hi - lo], lo))

    def copy(self, src: int, src_offset: int, offset: int, count: int) -> None:
        """Write `count` bytes read at `src_offset` of file `src` at file offset `offset`."""
        self._pieces(offset, count, lambda into, at: pread_into(src, into, src_offset + at),
                     lambda at, lo, hi: copy_range(src, self._fd, src_offset + at, lo, hi - lo))

    def _pieces(self, offset: int, count: int, fill: Callable[[memoryview, int], None],
                buffered: Callable[[int, int, int], None]) -> None:
        """Bytes [offset, offset + count) block by block: `fill(view, at)` puts bytes at..at+len(view) of the
        piece into a block's buffer; `buffered(at, lo, hi)` writes them to file bytes [lo, hi) without one."""
        if offset < self._start or offset + count > self._end:
            raise ValueError(f"bytes {offset}..{offset + count} lie outside the region {self._start}..{self._end}")
        lo = offset
        while lo < offset + count:
            index = lo // BLOCK_BYTES
            hi = min(offset + count, (index + 1) * BLOCK_BYTES)
            block = self._enter(index)
            if block is None:
                buffered(lo - offset, lo, hi)
            else:
                try:
                    fill(block.view(lo, hi), lo - offset)
                finally:
                    self._leave(block, lo, hi)
            lo = hi

    def _enter(self, index: int) -> _Block | None:
        """Block `index`, opened if need be, with one more piece pending; None when its pieces are written
        buffered (spilled, or direct I/O refused)."""
        with self._cond:
            self._check()
            block = self._blocks.get(index)
            if block is None and index not in self._spilled and self._use_direct:
                buffer = _POOL.take()
                block = self._blocks.get(index)  # another thread may have opened it while this one waited
                if self._failure is not None or block is not None or index in self._spilled or not self._use_direct:
                    _POOL.free.append(buffer)
                    self._check()
                else:
                    lo = max(self._start, index * BLOCK_BYTES)
                    hi = min(self._end, (index + 1) * BLOCK_BYTES)
                    block = self._blocks[index] = _Block(index, lo, hi, buffer, next(_POOL.serials))
            if block is not None:
                block.pending += 1
            return block

    def _leave(self, block: _Block, lo: int, hi: int) -> None:
        """Count file bytes [lo, hi) of `block` as there; a complete block goes to the writer thread."""
        with self._cond:
            block.pending -= 1
            block.filled += hi - lo
            block.pieces.append((lo, hi))
            if block.filled == block.hi - block.lo:
                del self._blocks[block.index]
                _POOL.queued += 1
                self._queue.put(block)
            self._cond.notify_all()

    def idle_blocks(self) -> list[_Block]:
        """The open blocks no piece is being written into (the pool's lock held)."""
        return [block for block in self._blocks.values() if not block.pending]

    def spill(self, block: _Block) -> None:
        """Write an idle block's pieces buffered (the pool's lock held); its later pieces are written buffered too."""
        del self._blocks[block.index]
        self._spilled.add(block.index)
        self._write_pieces(block)

    def _write_pieces(self, block: _Block) -> None:
        """Write the pieces a block holds, buffered."""
        for lo, hi in sorted(block.pieces):
            pwrite_all(self._fd, block.view(lo, hi), lo)

    def _write_block(self, block: _Block) -> None:
        """Write a complete block: its aligned middle with direct writes, its unaligned ends buffered (direct I/O
        refused: all of it buffered, and direct I/O is off from then on)."""
        first = -(-block.lo // ALIGN) * ALIGN
        last = max(first, block.hi // ALIGN * ALIGN)
        if last > first:
            self._write_aligned(block.view(first, last), first)
        for lo, hi in ((block.lo, min(first, block.hi)), (max(last, block.lo), block.hi)):
            if hi > lo:
                pwrite_all(self._fd, block.view(lo, hi), lo)

    def _write_aligned(self, view: memoryview, offset: int) -> None:
        """Write aligned bytes at an aligned offset: direct while direct I/O works, else buffered."""
        try:
            while view and self._use_direct:
                written = os.pwrite(self._direct, view, offset)
                view, offset = view[written:], offset + written
        except OSError as exc:  # refused (this file system, these alignments): buffered from here on
            if exc.errno not in _REFUSED:
                raise
            self._use_direct = False
        pwrite_all(self._fd, view, offset)

    def _run(self) -> None:
        """The writer thread: complete blocks, in the order they complete, until None."""
        while (block := self._queue.get()) is not None:
            try:
                if self._failure is None and not self._aborted:
                    self._write_block(block)
            except BaseException as exc:  # raised to the caller by its next call
                with self._cond:
                    self._failure = self._failure or exc
            with self._cond:
                _POOL.queued -= 1
                _POOL.free.append(block.buffer)
                self._cond.notify_all()

    def _check(self) -> None:
        """Raise the writer thread's failure, if any."""
        if self._failure is not None:
            raise self._failure

    def close(self) -> None:
        """Write what is left (blocks never completed, buffered), wait for the writer thread, release the buffers
        and the direct descriptor; the writer thread's failure is raised here."""
        with self._cond:
            while any(block.pending for block in self._blocks.values()):
                self._cond.wait()
            for block in sorted(self._blocks.values(), key=lambda block: block.index):
                self._write_pieces(block)
                _POOL.free.append(block.buffer)
            self._blocks.clear()
        self._stop()
        self._check()

    def abort(self) -> None:
        """Stop without writing what is not written yet (the caller discards the file)."""
        self._aborted = True
        self._stop()

    def _stop(self) -> None:
        """End the writer thread and release the buffers and the direct descriptor."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        with self._cond:  # blocks never completed (an abort): their buffers go back to the pool
            _POOL.free.extend(block.buffer for block in self._blocks.values())
            self._blocks.clear()
        if self._direct >= 0:
            os.close(self._direct)
            self._direct = -1
        _POOL.closed(self)
