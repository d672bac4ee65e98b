"""`adaptools batch`: many output-producing jobs from a jobs file, here or on a Ray cluster."""
from __future__ import annotations

import json
from pathlib import Path

import click

import adaptools

from ..jobs import ClickRunner
from ..render import echo_table


@click.command()
@click.argument("jobs", type=click.Path())
@click.option("--ray", "ray_address", metavar="auto|local|ADDRESS",
              help="Run on Ray: local (a runtime in this process), auto (the running cluster, RAY_ADDRESS) or a "
                   "cluster's address. Default: a pool of worker processes here.")
@click.option("--workers", type=click.IntRange(min=1),
              help="Worker processes (or local Ray CPUs); default one per two cores.")
@click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True,
              help="Runs again a task whose worker died (killed, out of memory, node lost) up to this many times.")
@click.option("--overwrite", is_flag=True, help="Redo every job, replacing outputs already there.")
@click.option("--report", "report_path", type=click.Path(), help="Write the rows of the final table to this JSON file.")
def batch(jobs: str, ray_address: str | None, workers: int | None, retries: int, overwrite: bool,
          report_path: str | None) -> None:
    """Run the jobs of JOBS (YAML or JSON): `jobs:` (and optional `defaults:`), each what a recipe holds:

    \b
      jobs:
        - {command: merge, base: base, adapters: [a1], out: merged/a1}
        - {command: [dora, to-lora], adapter: d1, out: s3://bucket/lora/d1}

    Outputs are paths relative to JOBS' folder or object-store URLs. The file is checked whole first. A complete
    output whose recipe records the job (command, parameters, inputs' sha256) is skipped; merges into one base
    read it once per task. Exit status 0 when every job succeeded or was skipped, 1 when some failed.
    """
    rows = adaptools.batch(jobs, ClickRunner(), ray=ray_address, workers=workers, retries=retries,
                           overwrite=overwrite, progress=True)
    echo_table(["job", "command", "out", "status", "seconds", "error"],
               [[r.job, r.command, r.out, r.status, round(r.seconds, 2), r.error] for r in rows])
    if report_path:
        Path(report_path).write_text(json.dumps([r.to_dict() for r in rows], indent=2) + "\n", encoding="utf-8")
    failed = sum(r.status == "failed" for r in rows)
    click.echo(f"{len(rows)} jobs: {sum(r.status == 'ok' for r in rows)} ok, "
               f"{sum(r.status == 'skipped' for r in rows)} skipped, {failed} failed")
    if failed:
        click.get_current_context().exit(1)
