"""The public `batch` call: many output-producing jobs, idempotent and fault-tolerant (DESIGN §19)."""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from tqdm.auto import tqdm

from ..errors import InvalidArgumentError
from .engines import run_pool, run_ray
from .jobs import Job, load_jobs
from .tasks import JobResult, JobRunner, default_workers


def batch(jobs: str | os.PathLike | Sequence[Job], runner: JobRunner, *, ray: str | None = None,
          workers: int | None = None, retries: int = 2, overwrite: bool = False,
          progress: bool = False) -> list[JobResult]:
    """Run every job of a jobs file (or of `load_jobs`' list) and return one row per job, in job order.

    The whole file is checked first (JobsFileError naming the job and key; nothing runs). A job whose output is
    complete and whose recipe records it (command, parameters, inputs' sha256) is skipped unless `overwrite`;
    merges that share a base and options run as tasks that each read the base once. A failed job fails alone; a
    task whose worker dies runs again, up to `retries` times.

    Args:
        runner: how jobs are checked and run (adaptools_cli.jobs.ClickRunner(): the CLI's own commands).
        ray: None: a pool of `workers` processes here; "local": a Ray runtime in this process; "auto": the running
            Ray cluster (RAY_ADDRESS); else a Ray cluster's address.
        workers: processes (or local Ray CPUs); default one per two cores.
        progress: a tqdm bar of jobs on stderr.
    """
    if retries < 0 or (workers is not None and workers < 1):
        raise InvalidArgumentError("workers must be >= 1 and retries >= 0")
    jobs = load_jobs(jobs) if isinstance(jobs, (str, os.PathLike)) else list(jobs)
    for job in jobs:
        runner.check(job)
    workers = workers or default_workers()
    rows: dict[int, JobResult] = {}
    with tqdm(total=len(jobs), unit="job", desc="batch", disable=not progress, file=sys.stderr) as bar:
        def done(results: list[JobResult]) -> None:
            rows.update((row.job, row) for row in results)
            bar.update(len(results))

        if ray is None:
            run_pool(jobs, runner, workers, retries, overwrite, done)
        else:
            run_ray(jobs, runner, ray, workers, retries, overwrite, done)
    return [rows[job.index] for job in jobs]
