"""Where batch tasks run: a pool of worker processes on this machine, or Ray (a local runtime, or a cluster).

Both retry a task whose worker died (killed, out of memory, node lost) up to `retries` times; a job's own
failure is a row of its task's result, never retried. Ray tasks declare one CPU and the memory their inputs need
(tasks.task_memory), so Ray never puts more on a node than it holds.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from ..errors import InvalidArgumentError
from .jobs import Job
from .tasks import JobResult, JobRunner, failed_rows, one_line, plan_tasks, run_task, task_memory

OBJECT_STORE_BYTES = 2**27
"""Object store of a local Ray runtime: tasks pass only job descriptions and result rows."""
Done = Callable[[list[JobResult]], None]


def pool_context() -> multiprocessing.context.BaseContext:
    """Fork where there is fork (the workers start with adaptools and torch imported: no interpreter start, the
    driver has run no torch op, so no thread pool is copied), spawn elsewhere."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def run_pool(jobs: Sequence[Job], runner: JobRunner, workers: int, retries: int, overwrite: bool,
             done: Done) -> None:
    """Run the tasks of `jobs` on `workers` processes (pool_context; torch on cores/workers threads each);
    `done(rows)` per task. A dead worker breaks the pool: the unfinished tasks count one attempt and run again on
    a new pool."""
    tasks = plan_tasks(jobs, runner, workers)
    threads = max(1, (os.cpu_count() or 1) // workers)
    attempts = [0] * len(tasks)
    pending = set(range(len(tasks)))
    while pending:
        with ProcessPoolExecutor(min(workers, len(pending)), mp_context=pool_context()) as pool:
            futures = {pool.submit(run_task, runner, tasks[i], overwrite, threads): i for i in sorted(pending)}
            broken = False
            while futures and not broken:
                finished, _ = wait(futures, return_when=FIRST_COMPLETED)
                for future in finished:
                    i = futures.pop(future)
                    try:
                        rows = future.result()
                    except BrokenProcessPool:
                        broken = True
                        continue
                    except Exception as exc:  # noqa: BLE001 - the task's jobs fail, the others go on
                        rows = failed_rows(tasks[i], one_line(exc))
                    pending.discard(i)
                    done(rows)
        for i in sorted(pending) if broken else ():
            attempts[i] += 1
            if attempts[i] > retries:
                pending.discard(i)
                done(failed_rows(tasks[i], f"its worker died {attempts[i]} times (killed or out of memory)"))


def run_ray(jobs: Sequence[Job], runner: JobRunner, address: str, workers: int, retries: int, overwrite: bool,
            done: Done) -> None:
    """Run the tasks of `jobs` as Ray tasks: `address` "local" starts a runtime in this process (`workers` CPUs,
    loopback only), "auto" joins the running cluster (RAY_ADDRESS, or the one started on this machine), anything
    else is the cluster's address (tasks then planned for its CPUs). `done(rows)` per task."""
    try:
        import ray
        from ray.exceptions import RayError
    except ImportError:
        raise InvalidArgumentError("--ray needs Ray: pip install 'adaptools[ray]'") from None
    if address == "local":
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # listen on 127.0.0.1 only (DESIGN §19)
        ray.init(address="local", num_cpus=workers, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=False, logging_level=logging.WARNING)
    else:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    try:
        slots = workers if address == "local" else int(ray.cluster_resources().get("CPU", workers))
        tasks = plan_tasks(jobs, runner, slots)
        remote = ray.remote(run_task)
        largest = max((node["Resources"].get("memory", 0) for node in ray.nodes() if node.get("Alive")), default=0)
        refs = {}
        for i, task in enumerate(tasks):
            memory = task_memory(runner, task)
            if memory > largest:  # Ray would wait for such a node forever
                done(failed_rows(task, f"needs {memory / 2**30:.1f} GiB of memory; no node of the cluster has it"))
                continue
            refs[remote.options(num_cpus=1, memory=memory, max_retries=retries,
                                retry_exceptions=False).remote(runner, task, overwrite, 1)] = i
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            i = refs.pop(ready[0])
            try:
                rows = ray.get(ready[0])
            except RayError as exc:
                rows = failed_rows(tasks[i], f"its worker died {retries + 1} times: {one_line(exc)[:200]}")
            done(rows)
    finally:
        ray.shutdown()

