"""Batch runs (DESIGN §19): many output-producing jobs on this machine or a Ray cluster, idempotent and
fault-tolerant, with outputs on local disk or object storage (fsspec).

- `jobs`: the jobs file (YAML/JSON) and its checks; `Job`.
- `tasks`: what a worker runs (skip checks, the runner, uploads), how jobs are cut into tasks; `JobRunner`,
  `JobResult`.
- `outputs`: outputs already there (their recipes), uploads to object storage.
- `engines`: a process pool here, or Ray.
- `api`: `batch`.
"""
from __future__ import annotations

from .api import batch
from .jobs import Job, load_jobs
from .tasks import JobResult, JobRunner

__all__ = ["Job", "JobResult", "JobRunner", "batch", "load_jobs"]
