"""What a batch worker runs: one task (jobs of one command, grouped when they can share a read), its outputs'
skip checks, and the uploads of object-store outputs; and how jobs are cut into tasks."""
from __future__ import annotations

import math
import os
import time
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..errors import AdaptoolsError
from .inputs import fetch_input
from .jobs import Job
from .outputs import clear_staging, existing_recipe, make_staging, upload

STATUSES = ("ok", "skipped", "failed")
BASE_MEMORY = 2**28
"""Bytes a task is assumed to need beyond its inputs (interpreter, torch, buffers)."""


@dataclass
class JobResult:
    """One row of a batch's report."""

    job: int
    command: str
    out: str
    status: str
    seconds: float
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class JobRunner(Protocol):
    """How jobs are checked and run (adaptools_cli.jobs.ClickRunner: through the CLI's own commands). Must pickle:
    workers get it with their tasks."""

    def check(self, job: Job) -> None:
        """JobsFileError naming the job's index and key unless the command would accept the job."""

    def group_key(self, job: Job) -> Hashable | None:
        """Jobs with one key (not None) may run as one task that reads their shared input once."""

    def remote_inputs(self, job: Job) -> list[str]:
        """The job's inputs given as object-store URLs (fetched by the worker before the skip check)."""

    def inputs(self, job: Job) -> list[Path]:
        """The job's local input files and folders (for the memory a task declares)."""

    def complete(self, job: Job, recipe: dict) -> bool:
        """Whether `recipe` (of the output there) records this job: command, parameters, inputs' sha256."""

    def run(self, jobs: Sequence[Job], overwrite: bool) -> list[tuple[str | None, float]]:
        """Write the outputs of `jobs` (at Job.target); per job its one-line error (None: written) and seconds."""


def one_line(exc: BaseException) -> str:
    """An exception as one line: the message of a user error, else its type and message."""
    text = str(exc) if isinstance(exc, AdaptoolsError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


def run_task(runner: JobRunner, jobs: Sequence[Job], overwrite: bool, threads: int | None = None) -> list[JobResult]:
    """Skip the jobs whose output is complete and records the job, write the others (together where the runner
    groups them), upload object-store outputs; never raises for a job's failure."""
    if threads:
        torch.set_num_threads(threads)
    rows, todo, fetched = [], [], {}
    for job in jobs:
        start = time.perf_counter()
        error = fetch_inputs(runner, job, fetched)
        if error is not None:
            rows.append(JobResult(job.index, job.label, job.out, "failed", time.perf_counter() - start, error))
            continue
        make_staging(job, output=True)
        recipe = None if overwrite else existing_recipe(job)
        try:
            done = recipe is not None and runner.complete(job, recipe)
        except (AdaptoolsError, OSError):
            done = False
        if done:
            clear_staging(job)
            rows.append(JobResult(job.index, job.label, job.out, "skipped", time.perf_counter() - start))
        else:
            make_staging(job)
            todo.append(job)
    try:
        outcomes = runner.run(todo, overwrite) if todo else []
    except Exception as exc:  # noqa: BLE001 - a bug in one task is reported in its rows, the batch goes on
        outcomes = [(one_line(exc), 0.0)] * len(todo)
    for job, (error, seconds) in zip(todo, outcomes):
        if error is not None:
            clear_staging(job)
        elif job.remote:
            start = time.perf_counter()
            try:
                upload(job)
            except AdaptoolsError as exc:
                error = one_line(exc)
            seconds += time.perf_counter() - start
        rows.append(JobResult(job.index, job.label, job.out, "failed" if error else "ok", seconds, error or ""))
    return rows


def fetch_inputs(runner: JobRunner, job: Job, fetched: dict[str, str | None]) -> str | None:
    """Fetch the object-store inputs of `job` that this task has not fetched yet (`fetched`: URL -> its one-line
    error or None); the job's first error, None when all are here."""
    for url in runner.remote_inputs(job):
        if url not in fetched:
            try:
                fetch_input(job.folder, url)
                fetched[url] = None
            except AdaptoolsError as exc:
                fetched[url] = one_line(exc)
        if fetched[url] is not None:
            return fetched[url]
    return None


def failed_rows(jobs: Sequence[Job], error: str) -> list[JobResult]:
    """Every job of a task that could not run, failed with `error`."""
    return [JobResult(job.index, job.label, job.out, "failed", 0.0, error) for job in jobs]


def plan_tasks(jobs: Sequence[Job], runner: JobRunner, slots: int) -> list[list[Job]]:
    """Tasks: each group of jobs sharing a read (runner.group_key) cut into as many tasks as its share of `slots`
    (one read of the shared input per task), every other job a task of its own; in job order."""
    groups: dict[Hashable, list[Job]] = {}
    tasks = []
    for job in jobs:
        key = runner.group_key(job)
        if key is None:
            tasks.append([job])
        else:
            groups.setdefault(key, []).append(job)
    for group in groups.values():
        parts = max(1, min(len(group), round(slots * len(group) / len(jobs))))
        size = math.ceil(len(group) / parts)
        tasks += [group[i:i + size] for i in range(0, len(group), size)]
    return sorted(tasks, key=lambda task: task[0].index)


def path_bytes(path: Path) -> list[int]:
    """Sizes of the files at `path` (a file, or every file below a folder)."""
    if path.is_file():
        return [path.stat().st_size]
    return [p.stat().st_size for p in path.rglob("*") if p.is_file()] if path.is_dir() else []


def task_memory(runner: JobRunner, task: Sequence[Job]) -> int:
    """Bytes a task declares: BASE_MEMORY + its largest input file (a merge holds about one shard of the base at a
    time) + every other input file of its jobs (adapters are read whole)."""
    sizes = [sorted(s for p in runner.inputs(job) for s in path_bytes(p)) for job in task]
    largest = max((s[-1] for s in sizes if s), default=0)
    small = sum(sum(s[:-1]) for s in sizes)
    return BASE_MEMORY + largest + small


def default_workers() -> int:
    """One worker per two cores."""
    return max(1, (os.cpu_count() or 2) // 2)
