"""The one reader of JSON that comes from files (configs, indexes, recipes, safetensors headers, metadata JSON).

Files from the Hub are untrusted, so the reader is strict and bounded:
- a JSON file is at most MAX_JSON_BYTES (64 MiB; the largest real index is a few MiB) and must be a regular
  file: a folder, a device or a pipe is refused before anything is read (opening never blocks);
- the text must be UTF-8 and nest at most MAX_JSON_DEPTH (64) arrays/objects deep, checked by a scan
  of the brackets outside strings before parsing, so deep nesting is an error, never a RecursionError;
- `NaN`, `Infinity`, `-Infinity` and numbers that overflow a float (`1e400`) are refused, and so are
  strings holding lone surrogates (`"\\ud800"`: not Unicode, and refused by Rust's serde_json);
- every failure is the caller's typed error (an AdaptoolsError subclass) naming the file.

The field validators below check one value read from such JSON and name its key in the message.
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .digests import reading
from .errors import AdaptoolsError
from .names import shown

MAX_JSON_BYTES = 64 * 2**20
"""Largest JSON file read (64 MiB)."""
MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects accepted."""

Error = type[AdaptoolsError]

_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STRING = re.compile(r'"[^"]*"')
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")
_STEP = np.zeros(256, dtype=np.int8)
_STEP[[ord("["), ord("{")]], _STEP[[ord("]"), ord("}")]] = 1, -1


MAX_JSON_INT = 2**63 - 1
"""The largest integer (in magnitude) a JSON file may hold: int64's."""


class _Refused(ValueError):
    """A number JSON allows to parse but adaptools refuses (NaN, Infinity, overflow)."""


def open_regular(path: str | os.PathLike, error: Error) -> BinaryIO:
    """`path` opened for unbuffered binary reading; `error` when it cannot be read or is not a regular file
    (a folder, a device, a FIFO: opened without blocking, refused before any read)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise error(f"{str(path)!r} cannot be read ({exc.strerror or exc})") from exc
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise error(f"{str(path)!r} is {kind}, where a file is expected")
    return os.fdopen(fd, "rb", buffering=0)


def read_exactly(f: BinaryIO, n: int) -> bytes:
    """The next `n` bytes of an unbuffered file (fewer only at the end of the file)."""
    data = bytearray(n)
    view, done = memoryview(data), 0
    while done < n:
        got = f.readinto(view[done:])
        if not got:
            break
        done += got
    return bytes(data[:done])


def json_depth(text: str) -> int:
    """Deepest nesting of [] and {} outside JSON strings, without recursion: escaped backslashes and quotes
    are dropped first, so every remaining quote delimits a string."""
    plain = _STRING.sub("", text.replace("\\\\", "").replace('\\"', ""))
    brackets = np.frombuffer(_NOT_BRACKET.sub("", plain).encode("ascii"), dtype=np.uint8)
    return int(np.cumsum(_STEP[brackets], dtype=np.int64).max(initial=0))


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:40]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    value = int(text)
    if not -MAX_JSON_INT <= value <= MAX_JSON_INT:
        raise _Refused(f"the integer {text[:40]}{'...' if len(text) > 40 else ''} is out of range (beyond ±2^63)")
    return value


def _refuse_constant(name: str) -> float:
    raise _Refused(f"{name} is not a JSON number")


def _has_lone_surrogate(value: object) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def parse_json(text: str | bytes, source: str, error: Error) -> object:
    """The JSON value of `text` (bytes must be UTF-8); `error` naming `source` for anything the module doc refuses."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{source!r} is not valid JSON (not UTF-8: {exc.reason} at byte {exc.start})") from None
    if json_depth(text) > MAX_JSON_DEPTH:
        raise error(f"{source!r} is not valid JSON for adaptools (nested more than {MAX_JSON_DEPTH} levels deep)")
    try:
        value = json.loads(text, parse_float=_finite_float, parse_int=_bounded_int, parse_constant=_refuse_constant)
    except ValueError as exc:  # JSONDecodeError, _Refused, an integer of more than 4300 digits
        raise error(f"{source!r} is not valid JSON ({exc})") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(value):
        raise error(f"{source!r} is not valid JSON (a string holds a lone surrogate escape, which is not Unicode)")
    return value


def read_json_object(path: Path, error: Error) -> dict:
    """The JSON object in file `path` (at most MAX_JSON_BYTES); `error` when it is unreadable, not a file,
    too large, not valid JSON (see the module doc) or not an object."""
    with reading(path), open_regular(path, error) as f:
        size = os.fstat(f.fileno()).st_size
        data = read_exactly(f, min(size, MAX_JSON_BYTES) + 1)
    if len(data) > MAX_JSON_BYTES:
        raise error(f"{str(path)!r} is larger than adaptools' limit of {MAX_JSON_BYTES // 2**20} MiB for a JSON file")
    value = parse_json(data, str(path), error)
    if not isinstance(value, dict):
        raise error(f"{str(path)!r} does not hold a JSON object")
    return value


# --------------------------------------------------------------------------- typed fields
# Each check takes (value, key, source, error) and returns the value; the message names the file and the key.

Check = Callable[[object, str, str, Error], object]


def _wrong(value: object, key: str, source: str, error: Error, expected: str) -> AdaptoolsError:
    return error(f"{source!r}: {key!r} must be {expected}, got {shown(value)}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(value: object, key: str, source: str, error: Error) -> int:
    """An integer >= 1 (not a bool, a float such as 8.0, or a string such as "8")."""
    if not _is_int(value) or value < 1:
        raise _wrong(value, key, source, error, "a positive integer")
    return value


def finite_number(value: object, key: str, source: str, error: Error) -> float:
    """A finite JSON number (not a bool, not a string)."""
    if not _is_number(value):
        raise _wrong(value, key, source, error, "a finite number")
    return value


def positive_number(value: object, key: str, source: str, error: Error) -> float:
    """A finite JSON number > 0."""
    if not _is_number(value) or value <= 0:
        raise _wrong(value, key, source, error, "a positive finite number")
    return value


def boolean(value: object, key: str, source: str, error: Error) -> bool:
    """true or false (not "yes", not 1)."""
    if not isinstance(value, bool):
        raise _wrong(value, key, source, error, "true or false")
    return value


def string(value: object, key: str, source: str, error: Error) -> str:
    """A JSON string."""
    if not isinstance(value, str):
        raise _wrong(value, key, source, error, "a string")
    return value


def string_or_strings(value: object, key: str, source: str, error: Error) -> str | list[str]:
    """A string, or a list of strings (PEFT's target_modules: a regex or module names)."""
    if not isinstance(value, str) and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise _wrong(value, key, source, error, "a string or a list of strings")
    return value


def booleans(value: object, key: str, source: str, error: Error) -> list[bool]:
    """A list of true/false (AdaLoRA's rank masks)."""
    if not isinstance(value, list) or not all(isinstance(v, bool) for v in value):
        raise _wrong(value, key, source, error, "a list of true/false")
    return value


def json_object(value: object, key: str, source: str, error: Error) -> dict:
    """A JSON object (any keys and values)."""
    if not isinstance(value, dict):
        raise _wrong(value, key, source, error, "a JSON object")
    return value


def mapping_of(check: Check) -> Check:
    """A check of a JSON object whose values all pass `check` (the key shown as `key[name]`)."""

    def mapping(value: object, key: str, source: str, error: Error) -> dict:
        for name, item in json_object(value, key, source, error).items():
            check(item, f"{key}[{name!r}]", source, error)
        return value

    return mapping


def check_fields(obj: Mapping, checks: Mapping[str, Check], source: str, error: Error,
                 nullable: tuple[str, ...] = ()) -> None:
    """Run `checks[key]` on each key of `obj` that is present (a null value passes for the `nullable` keys)."""
    for key, check in checks.items():
        if key in obj and not (obj[key] is None and key in nullable):
            check(obj[key], key, source, error)
