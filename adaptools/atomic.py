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
