"""Atomic outputs: an output (a file or a folder) appears whole, or not at all.

A target `<parent>/NAME` is written as `<parent>/.NAME.XXXXXXXX.tmp/NAME` (a temporary folder made by mkdtemp
beside the target) and renamed into place when complete. While a run writes, it holds an exclusive flock on
`<parent>/.NAME.lock` (the file holds the holder's pid; the kernel drops the lock when the process dies, even
by kill -9), so:

- a second run for the same target fails at once (OutputLockedError), before doing any work;
- temporary folders `.NAME.XXXXXXXX.tmp` left by dead runs (nobody holds the lock) are removed by the next run;
- with `overwrite`, the old target (a file, a folder, or a symlink itself, never what it points to) is moved into
  the run's own temporary folder, the new output renamed into place, and then the temporary folder removed:
  nothing the run did not create is deleted (a user's `.NAME.old` beside the target stays), and a kill between
  the two renames leaves the old output in a stale temporary folder, which the next run removes;
- a NAME whose temporary name would exceed the file system's NAME_MAX is refused before any work.

Staging: `staged_output(target)` opens the temporary folder and registers it in this context (a contextvar).
Every `atomic_output` inside it for that target, or for a path below that target (a side file such as a report),
writes into the staging instead of opening its own; only the outermost one renames. So the CLI writes a command's
card and recipe into the same temporary folder as its weights, before the one rename (cli provenance).
"""
from __future__ import annotations

import contextlib
import contextvars
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidArgumentError, OutputExistsError, OutputLockedError, OutputWriteError

NAME_MAX = 255
"""File name limit in bytes where the file system does not say (os.pathconf PC_NAME_MAX)."""
PATH_MAX = 4096
"""Path length limit in bytes (Linux's PATH_MAX)."""
TMP_EXTRA = len("..") + 8 + len(".tmp")
"""Bytes the temporary folder's name adds to the target's: `.NAME.` + mkdtemp's 8 random characters + `.tmp`."""

_STAGINGS: contextvars.ContextVar[tuple[Staging, ...]] = contextvars.ContextVar("adaptools_stagings", default=())
_HELD: set[Path] = set()
"""Targets whose lock this process holds (check_output does not report them as locked)."""


def lock_path(target: Path) -> Path:
    """The lock file of `target`: `.NAME.lock` beside it."""
    return target.with_name(f".{target.name}.lock")


def name_max(folder: Path) -> int:
    """NAME_MAX of the file system holding `folder` (or its nearest existing ancestor)."""
    for candidate in (folder, *folder.parents):
        try:
            if candidate.is_dir():
                return os.pathconf(candidate, "PC_NAME_MAX")
        except (OSError, ValueError):
            continue
    return NAME_MAX


def check_path_parts(target: Path, absolute: Path) -> None:
    """InvalidArgumentError for an output path the file system cannot hold or that would leave folders behind: a part
    longer than NAME_MAX bytes, a whole longer than PATH_MAX, the name `..`, or `..` after a folder that does not
    exist (creating it would leave it behind)."""
    if absolute.name == "..":
        raise InvalidArgumentError(f"output {str(target)!r} names no file or folder (it ends in '..')")
    if len(os.fsencode(str(absolute))) + TMP_EXTRA + 1 > PATH_MAX:
        raise InvalidArgumentError(f"output path {str(target)[:80]!r}... is too long: at most {PATH_MAX} bytes")
    prefix = Path(absolute.anchor)
    for part in absolute.parts[1:]:
        if len(os.fsencode(part)) > NAME_MAX:
            raise InvalidArgumentError(f"output path part {part[:40]!r}... is {len(os.fsencode(part))} bytes long: "
                                       f"at most {NAME_MAX}")
        if part == ".." and not prefix.is_dir():
            raise InvalidArgumentError(f"output {str(target)!r} goes through '..' after {str(prefix)!r}, which is no "
                                       "folder")
        prefix = prefix / part


def check_output(target: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an existing output unless `overwrite`, one another run is writing (OutputLockedError), and a name
    too long for the temporary and lock names beside it; return the target as a Path."""
    target = Path(target)
    absolute = target.absolute()
    if not absolute.name:
        raise InvalidArgumentError(f"output {str(target)!r} names no file or folder")
    check_path_parts(target, absolute)
    limit = name_max(absolute.parent)
    if len(os.fsencode(absolute.name)) + TMP_EXTRA > limit:
        raise InvalidArgumentError(f"output name {absolute.name!r} is too long: at most {limit - TMP_EXTRA} bytes "
                                   f"(its temporary folder's name must fit the file system's {limit})")
    if absolute not in _HELD:
        holder = lock_holder(absolute)
        if holder is not None:
            raise OutputLockedError(f"output {str(target)!r} is being written by another adaptools run ({holder}); "
                                    "wait for it to end or write elsewhere")
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise OutputExistsError(f"output {str(target)!r} already exists (pass --overwrite to replace it)")
    return target


def output_location(path: str | os.PathLike) -> Path:
    """Where an output at `path` is written: its parent resolved, its own name kept (a symlink there is replaced,
    not followed)."""
    path = Path(path).absolute()
    return path.parent.resolve() / path.name


def check_output_paths(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike] = ()) -> None:
    """InvalidArgumentError when two outputs are one path, or an output is, holds or lies inside an input or
    holds the current folder (replacing it would destroy what the command reads, or the folder the user is in)."""
    outs = [output_location(p) for p in outputs]
    if len(set(outs)) < len(outs):
        raise InvalidArgumentError("the same path is given for two outputs")
    cwd = Path.cwd().resolve()
    for out in outs:
        if out == cwd or out in cwd.parents:
            raise InvalidArgumentError(f"output {str(out)!r} is or holds the current folder")
        for inp in (Path(p).resolve() for p in inputs):
            if out == inp or out in inp.parents or inp in out.parents:
                raise InvalidArgumentError(f"output {str(out)!r} overlaps the input {str(inp)!r}: write it elsewhere")


def umask_permissions(root: Path) -> None:
    """Give `root` and everything below it the modes a plain create would (0o777 / 0o666 less the umask).

    mkdtemp makes 0700 folders and safetensors writes 0600 files; outputs should be as readable as any other.
    Symlinks are left alone (chmod would change what they point to).
    """
    umask = os.umask(0)
    os.umask(umask)
    paths = [root]
    if root.is_dir() and not root.is_symlink():
        for folder, dirs, files in os.walk(root):
            paths += [Path(folder, name) for name in (*dirs, *files)]
    for path in paths:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


# --------------------------------------------------------------------------- lock


def lock_holder(target: Path) -> str | None:
    """'pid N' of a live run holding the lock of `target`, None when nobody holds it."""
    try:
        fd = os.open(lock_path(target), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:  # no lock file (or not one adaptools made): nobody holds it
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return holder_text(fd)
    finally:
        os.close(fd)


def holder_text(fd: int) -> str:
    """What a lock file says about its holder: 'pid N'."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return f"pid {text}" if text.isdigit() else "pid unknown"


class TargetLock:
    """An exclusive flock on `.NAME.lock` beside a target, holding the pid; the file is removed on release."""

    def __init__(self, target: Path):
        self.target = target
        self.path = lock_path(target)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = holder_text(fd)
                os.close(fd)
                raise OutputLockedError(f"output {str(target)!r} is being written by another adaptools run ({holder}); "
                                        "wait for it to end or write elsewhere") from None
            try:  # the file may have been removed (and made again) by a run that released it meanwhile
                same = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        if not re.fullmatch(rb"(\d+\n)?", os.pread(fd, 64, 0)):  # empty, or a pid: a lock (maybe of a dead run)
            os.close(fd)
            raise InvalidArgumentError(f"{str(self.path)!r} is in the way: adaptools keeps the lock of {target.name!r} "
                                       "there, and this file is not one of its locks; move it elsewhere")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        _HELD.add(target)

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in this order, so no run locks a file about to vanish)."""
        _HELD.discard(self.target)
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)


def stale_temporaries(target: Path) -> list[Path]:
    """The temporary folders `.NAME.XXXXXXXX.tmp` beside `target` (folders only, not symlinks)."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.tmp")
    with os.scandir(target.parent) as entries:
        return [Path(e.path) for e in entries if pattern.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]


# --------------------------------------------------------------------------- staging


@dataclass
class Staging:
    """The temporary folder of one target: the output is written at `path` (`folder/NAME`), a file or a folder
    as the first writer claims it."""

    target: Path
    folder: Path
    is_file: bool | None = None

    @property
    def path(self) -> Path:
        return self.folder / self.target.name

    def claim(self, is_file: bool) -> Path:
        """The staged output path, claimed as a file or a folder (made empty) by its first writer."""
        if self.is_file is None:
            self.is_file = is_file
            if not is_file:
                self.path.mkdir()
        elif self.is_file != is_file:
            raise InvalidArgumentError(f"output {str(self.target)!r} is written as a {'file' if self.is_file else 'folder'}, "
                                       f"not as a {'file' if is_file else 'folder'}: it cannot hold side files")
        return self.path

    def locate(self, path: str | os.PathLike) -> Path:
        """Where `path` (the target, or a path below it) is in the staging."""
        path = Path(path).absolute()
        return self.path / path.relative_to(self.target)

    def commit(self, overwrite: bool) -> None:
        """Rename the staged output into place (the old target, if any, moved into the temporary folder first)."""
        if self.is_file is None:
            raise OutputWriteError(f"{str(self.target)!r} was not written: nothing was staged for it")
        check_output(self.target, overwrite)
        umask_permissions(self.path)
        if self.target.exists() or self.target.is_symlink():
            os.rename(self.target, self.folder / f".{self.target.name}.old")  # a symlink moves, not its target
        os.rename(self.path, self.target)


def active_staging(path: Path) -> Staging | None:
    """The staging registered in this context for `path` or a folder above it."""
    for staging in reversed(_STAGINGS.get()):
        if path == staging.target or staging.target in path.parents:
            return staging
    return None


@contextlib.contextmanager
def staged_output(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Staging]:
    """Lock `target`, remove the temporary folders of dead runs, and yield a registered Staging; on success the
    staged output replaces `target`, on failure it is removed. An OSError while writing is an OutputWriteError."""
    target = check_output(target, overwrite).absolute()
    check_output_paths([target])
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = TargetLock(target)
    except OSError as exc:
        raise InvalidArgumentError(f"cannot write the output {str(target)!r}: {exc.strerror or exc}") from exc
    try:
        for stale in stale_temporaries(target):
            shutil.rmtree(stale, ignore_errors=True)
        check_output(target, overwrite)  # a run that held the lock may have just finished it
        try:
            staging = Staging(target, Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp",
                                                            dir=target.parent)))
        except OSError as exc:
            raise InvalidArgumentError(f"cannot write the output {str(target)!r}: {exc.strerror or exc}") from exc
        try:
            token = _STAGINGS.set((*_STAGINGS.get(), staging))
            try:
                yield staging
            except OSError as exc:  # a full disk, a lost permission: the output is dropped below
                where = f" ({exc.filename})" if exc.filename else ""
                raise OutputWriteError(f"{str(target)!r} was not written: {exc.strerror or exc}{where}") from exc
            finally:
                _STAGINGS.reset(token)
            staging.commit(overwrite)
        finally:
            shutil.rmtree(staging.folder, ignore_errors=True)
    finally:
        lock.release()


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike, overwrite: bool = False, is_file: bool = False) -> Iterator[Path]:
    """Yield a temporary path that replaces `target` on success and is removed on failure.

    For a folder output (default) the yielded path is an empty folder to fill; with `is_file=True` it is a file
    path to write. Inside a `staged_output` for `target` (or for a folder above it), the staged path is yielded
    and the enclosing staging renames it.
    """
    path = Path(target).absolute()
    staging = active_staging(path)
    if staging is None:
        with staged_output(path, overwrite) as staging:
            yield staging.claim(is_file)
        return
    if path == staging.target:
        yield staging.claim(is_file)
        return
    staging.claim(False)  # a side file below the target: the output is a folder
    inner = staging.locate(path)
    (inner.parent if is_file else inner).mkdir(parents=True, exist_ok=True)
    yield inner
