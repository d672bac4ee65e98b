"""Batch outputs, local or on object storage (fsspec): the recipe of an output already there, and uploads.

An object-store output is written locally (Job.target), then uploaded: every file but the recipe first, the
recipe object (`NAME/adaptools_recipe.json`) last, so it counts as present only when whole; a single-file output
is one object (its recipe is in its safetensors metadata). Leftovers without a recipe object are redone.
"""
from __future__ import annotations

import shutil
import struct

import fsspec

from ..errors import AdaptoolsError, OutputWriteError, RecipeError
from ..jsonio import parse_json
from ..recipe import RECIPE_KEY, RECIPE_NAME, check_recipe, read_recipe
from .jobs import Job

MAX_HEADER_BYTES = 100_000_000
"""Largest safetensors header read back from object storage (the safetensors limit)."""


def existing_recipe(job: Job) -> dict | None:
    """The recipe of the job's output if it is complete (a readable recipe; remote: its recipe object exists),
    else None."""
    try:
        return remote_recipe(job.out) if job.remote else read_recipe(job.target)[0]
    except (AdaptoolsError, OSError):
        return None


def remote_recipe(url: str) -> dict | None:
    """The recipe of the object-store output `url`: its recipe object, or a single file's metadata; None if absent."""
    fs, path = fsspec.url_to_fs(url)
    fs.invalidate_cache()
    if fs.isfile(path):
        with fs.open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER_BYTES:
                return None
            header = parse_json(f.read(length), url, RecipeError)
        text = header.get("__metadata__", {}).get(RECIPE_KEY) if isinstance(header, dict) else None
        recipe = parse_json(text, f"{url}: metadata {RECIPE_KEY}", RecipeError) if isinstance(text, str) else None
    elif fs.isfile(f"{path}/{RECIPE_NAME}"):
        recipe = parse_json(fs.cat_file(f"{path}/{RECIPE_NAME}"), f"{url}/{RECIPE_NAME}", RecipeError)
    else:
        return None
    if not isinstance(recipe, dict):
        return None
    check_recipe(recipe, url)
    return recipe


def clear_staging(job: Job) -> None:
    """Remove the local staging folder of an object-store output (with what an earlier run left there)."""
    if job.remote:
        shutil.rmtree(job.target.parent, ignore_errors=True)


def make_staging(job: Job, output: bool = False) -> None:
    """An empty local staging folder for an object-store output; with `output`, an empty output folder in it
    (where the relative input paths of the output's recipe start: they are checked from there)."""
    if job.remote:
        clear_staging(job)
        (job.target if output else job.target.parent).mkdir(parents=True)


def upload(job: Job) -> None:
    """Upload the staged output of `job` to its URL (an old output there removed first, its recipe object before
    anything else), the recipe object last; then remove the local copy."""
    fs, path = fsspec.url_to_fs(job.out)
    local = job.target
    try:
        fs.invalidate_cache()
        if fs.isfile(f"{path}/{RECIPE_NAME}"):
            fs.rm_file(f"{path}/{RECIPE_NAME}")
        if fs.exists(path):
            fs.rm(path, recursive=True)
        if local.is_file():
            fs.put_file(str(local), path)
        else:
            files = sorted(p for p in local.rglob("*") if p.is_file() and p != local / RECIPE_NAME)
            for file in files:
                fs.put_file(str(file), f"{path}/{file.relative_to(local).as_posix()}")
            fs.put_file(str(local / RECIPE_NAME), f"{path}/{RECIPE_NAME}")
    except OSError as exc:
        raise OutputWriteError(f"{job.out!r} was not uploaded: {' '.join(str(exc).split())}") from exc
    finally:
        clear_staging(job)
