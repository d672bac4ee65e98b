"""Atomic outputs: write into a temporary folder beside the target, rename it into place when complete."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import InvalidArgumentError, OutputExistsError, OutputWriteError


def check_output(target: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an existing output unless `overwrite`; return the target as a Path."""
    target = Path(target)
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise OutputExistsError(f"output {str(target)!r} already exists (pass --overwrite to replace it)")
    return target


def check_output_paths(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike] = ()) -> None:
    """InvalidArgumentError when two outputs are one path, or an output is, holds or lies inside an input or
    holds the current folder (replacing it would destroy what the command reads, or the folder the user is in)."""
    outs = [Path(p).resolve() for p in outputs]
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
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike, overwrite: bool = False, is_file: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target` that replaces `target` on success and is removed on failure.

    For a folder output (default) the yielded path is an empty folder to fill; with `is_file=True`
    it is a file path (inside a temporary folder) to write.
    """
    target = check_output(target, overwrite).absolute()
    check_output_paths([target])
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise InvalidArgumentError(f"cannot write the output {str(target)!r}: {exc.strerror or exc}") from exc
    try:
        source = tmp / target.name if is_file else tmp
        try:
            yield source
        except OSError as exc:  # a full disk, a lost permission: the output is dropped below
            where = f" ({exc.filename})" if exc.filename else ""
            raise OutputWriteError(f"{str(target)!r} was not written: {exc.strerror or exc}{where}") from exc
        check_output(target, overwrite)
        umask_permissions(source)
        if target.exists() or target.is_symlink():
            backup = target.with_name(f".{target.name}.old")
            os.replace(target, backup)
            os.replace(source, target)
            if backup.is_dir():
                shutil.rmtree(backup)
            else:
                backup.unlink()
        else:
            os.replace(source, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
