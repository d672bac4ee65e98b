"""Batch jobs files (DESIGN §19): YAML or JSON holding `jobs:` (and optional `defaults:` applied to every job).

A job is what a recipe holds: `command` (["merge"], ["dora", "to-lora"], or a plain string for one word), the
command's parameters under the recipe's names and value types, and `out`: a path relative to the jobs file's
folder (never absolute, never climbing out of it) or an object-store URL (`s3://bucket/prefix/name`). The whole
file is checked before any work; every mistake is one JobsFileError naming the job's index and key.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import fsspec
import yaml

from ..errors import JobsFileError
from ..jsonio import MAX_JSON_BYTES, json_depth, open_regular, parse_json, read_exactly, MAX_JSON_DEPTH
from ..names import plain_name, shown

URL = re.compile(r"[a-z][a-z0-9+.-]*://")
"""An object-store URL (fsspec protocol), e.g. s3://bucket/key."""
STAGING = ".adaptools-batch"
"""Folder beside the jobs file where object-store outputs are written before their upload."""
TOP_KEYS = ("jobs", "defaults")


@dataclass(frozen=True)
class Job:
    """One output to make: `index` in the file, the command path, its parameters (JSON values, input paths as
    written), `out` as written, the jobs file's folder (absolute) and the file's defaults (which apply to a job
    whose command takes them)."""

    index: int
    command: tuple[str, ...]
    params: Mapping[str, object] = field(hash=False)
    out: str
    folder: Path
    defaults: Mapping[str, object] = field(default_factory=dict, hash=False)

    @property
    def remote(self) -> bool:
        """True for an object-store output."""
        return bool(URL.match(self.out))

    @property
    def target(self) -> Path:
        """Where the output is written on this machine: its path, or for an object-store URL a private staging
        folder under the jobs folder (`.adaptools-batch/<digest of the URL>/<name>`, at a fixed depth, so the
        recipe's relative input paths are the same on every run)."""
        if not self.remote:
            return self.folder / self.out
        digest = hashlib.sha256(self.out.encode()).hexdigest()[:16]
        return self.folder / STAGING / digest / PurePosixPath(self.out).name

    @property
    def label(self) -> str:
        """The command as typed, e.g. "dora to-lora"."""
        return " ".join(self.command)


def read_jobs_text(path: Path) -> object:
    """The document in the jobs file `path` (JSON by `.json`, else YAML), at most MAX_JSON_BYTES."""
    with open_regular(path, JobsFileError) as f:
        data = read_exactly(f, min(os.fstat(f.fileno()).st_size, MAX_JSON_BYTES) + 1)
    if len(data) > MAX_JSON_BYTES:
        raise JobsFileError(f"{str(path)!r} is larger than adaptools' limit of {MAX_JSON_BYTES // 2**20} MiB")
    if path.suffix == ".json":
        return parse_json(data, str(path), JobsFileError)
    try:
        text = data.decode("utf-8")
        if json_depth(text) > MAX_JSON_DEPTH:
            raise JobsFileError(f"{str(path)!r} is nested more than {MAX_JSON_DEPTH} levels deep")
        return yaml.safe_load(text)
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise JobsFileError(f"{str(path)!r} is not valid YAML ({' '.join(str(exc).split())})") from None


def parse_jobs(document: object, folder: Path, source: str) -> list[Job]:
    """The jobs of a jobs document (checked for structure and outputs; parameters are the runner's to check)."""
    if not isinstance(document, dict) or not isinstance(document.get("jobs"), list) or not document["jobs"]:
        raise JobsFileError(f"{source} must hold a non-empty list 'jobs' (and optionally 'defaults')")
    unknown = sorted(str(k) for k in document if k not in TOP_KEYS)
    if unknown:
        raise JobsFileError(f"{source}: unknown key {unknown[0]!r} (a jobs file holds {', '.join(TOP_KEYS)})")
    defaults = document.get("defaults") or {}
    if not isinstance(defaults, dict) or any(not isinstance(k, str) for k in defaults):
        raise JobsFileError(f"{source}: 'defaults' must map parameter names to values")
    if "out" in defaults:
        raise JobsFileError(f"{source}: defaults: key 'out' cannot be a default (every job has its own)")
    jobs, seen = [], {}
    for index, entry in enumerate(document["jobs"]):
        if not isinstance(entry, dict) or any(not isinstance(k, str) for k in entry):
            raise JobsFileError(f"job {index}: must be a mapping of parameter names to values")
        params = dict(entry)
        command = job_command(index, params.pop("command", defaults.get("command")))
        job = Job(index, command, params, job_out(index, params.pop("out", None), folder), folder,
                  {k: v for k, v in defaults.items() if k != "command"})
        where = job.out if job.remote else str(Path(os.path.normpath(job.target)))
        if where in seen:
            raise JobsFileError(f"job {index}: key 'out': {job.out!r} is also the output of job {seen[where]}")
        seen[where] = index
        jobs.append(job)
    for job in jobs:
        holder = next((seen[str(p)] for p in Path(os.path.normpath(job.target)).parents if str(p) in seen), None)
        if not job.remote and holder is not None:
            raise JobsFileError(f"job {job.index}: key 'out': {job.out!r} lies inside the output of job {holder}")
    return jobs


def job_command(index: int, value: object) -> tuple[str, ...]:
    """The command path of job `index`: a list of command names or one word."""
    names = value.split() if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise JobsFileError(f"job {index}: key 'command' must be a command such as [merge] or [dora, to-lora], "
                            f"not {shown(value)}")
    return tuple(names)


def url_name(url: str) -> str:
    """The last part of an object-store URL (a trailing "/" ignored): the name of its output or fetched copy."""
    return PurePosixPath(url.split("://", 1)[1].rstrip("/")).name


def check_url(url: str, where: str) -> str:
    """`url` when its last part is a plain name and fsspec has its protocol, else JobsFileError saying `where`."""
    plain_name(url_name(url), f"{where}: the URL's last part", JobsFileError)
    try:
        fsspec.get_filesystem_class(url.split("://", 1)[0])
    except (ImportError, ValueError) as exc:
        raise JobsFileError(f"{where}: {url!r}: {' '.join(str(exc).split())}") from None
    return url


def job_out(index: int, value: object, folder: Path) -> str:
    """The `out` of job `index`: an object-store URL ending in a plain name, or a relative path inside the jobs
    folder (no `..` that climbs out, not absolute)."""
    where = f"job {index}: key 'out'"
    if not isinstance(value, str) or not value:
        raise JobsFileError(f"{where} is missing (every job names its output: a path or an s3:// URL)")
    if URL.match(value):
        return check_url(value, where)
    path = PurePosixPath(value)
    if path.is_absolute() or "\\" in value or re.match(r"[A-Za-z]:", value):
        raise JobsFileError(f"{where}: {value!r} must be a path relative to the jobs file's folder")
    depth = 0
    for part in path.parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            raise JobsFileError(f"{where}: {value!r} climbs out of the jobs file's folder")
    if depth == 0 or path.parts[0] == STAGING:
        raise JobsFileError(f"{where}: {value!r} names no output inside the jobs file's folder")
    inside = folder.resolve()
    if inside not in (folder / value).parent.resolve().parents and (folder / value).parent.resolve() != inside:
        raise JobsFileError(f"{where}: {value!r} leads out of the jobs file's folder (through a link)")
    return value


def load_jobs(path: str | os.PathLike) -> list[Job]:
    """The jobs of the jobs file `path` (YAML, or JSON by its `.json` suffix), checked for structure."""
    path = Path(path).absolute()
    return parse_jobs(read_jobs_text(path), path.parent, repr(str(path)))
