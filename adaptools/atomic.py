"""Atomic outputs: write into a temporary folder beside the target, rename it into place when complete."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputExistsError


def check_output(target: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an existing output unless `overwrite`; return the target as a Path."""
    target = Path(target)
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise OutputExistsError(f"output {str(target)!r} already exists (pass --overwrite to replace it)")
    return target


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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        source = tmp / target.name if is_file else tmp
        yield source
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
