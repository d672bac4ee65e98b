"""Names from untrusted files: file names that must be plain names (never paths), and names shown in messages.

A plain name is one path component: a non-empty string without `/`, `\\`, NUL or other control characters,
not `.` or `..`, with no drive or root (Windows `C:`), encodable as UTF-8. Joined to a folder it names a
file inside that folder (which may itself be a symlink, as in a Hugging Face cache snapshot).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import PureWindowsPath

from .errors import AdaptoolsError

MAX_SHOWN = 120
"""Characters of an untrusted string shown in an error message (the rest is elided)."""


def shown(value: object) -> str:
    """repr of an untrusted value for an error message, cut to about MAX_SHOWN characters."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN] + "..."


def listed(items: Sequence[str], limit: int = 5) -> str:
    """The first `limit` items joined by commas, then "and N more"."""
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def plain_name(name: object, what: str, error: type[AdaptoolsError]) -> str:
    """`name` when it is a plain file name (see the module doc); else `error` saying `what` it is and why not."""
    if not isinstance(name, str):
        raise error(f"{what} must be a file name (a string), got {shown(name)}")
    problem = None
    if not name:
        problem = "it is empty"
    elif name in (".", ".."):
        problem = "it names a folder"
    elif "/" in name or "\\" in name:
        problem = "it holds a path separator"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "it holds a control character"
    elif PureWindowsPath(name).anchor:
        problem = "it has a drive or root"
    else:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            problem = "it is not valid Unicode"
    if problem:
        raise error(f"{what} {shown(name)} is not a plain file name ({problem}): names in files may not lead outside "
                    "their folder")
    return name
