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
def atomic_output(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `target`; on success it replaces `target`, on failure it is removed.

    A file output is written as a file inside the yielded folder named like the target
    (`tmp / target.name`); a folder output is the yielded folder itself.
    """
    target = check_output(target, overwrite).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        check_output(target, overwrite)
        single = tmp / target.name
        is_file_output = single.is_file() and len(list(tmp.iterdir())) == 1 and target.suffix != ""
        source = single if is_file_output else tmp
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
