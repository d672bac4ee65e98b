"""Batch jobs through adaptools' own click commands, run in-process (`adaptools batch`, adaptools.batch).

A job's command and parameters are checked against the click command itself (the replayable commands: those
that write an output; the recipe's parameter names and value types, as replay checks them; the widening options
only from the batch command line), so every command and option the CLI has is a job without edits here. A job
runs as its command would run from the command line: the same outputs, cards and recipes. Jobs of a command with
a group runner (merges into one base) run together: one read of the shared input, each output its own.

Workers import the command tree by name (ROOT_MODULE), so a runner pickles to its module name.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import time
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import click

from adaptools.atomic import check_output
from adaptools.batch import Job
from adaptools.batch.inputs import input_copy
from adaptools.batch.jobs import URL, check_url
from adaptools.batch.tasks import one_line
from adaptools.errors import AdaptoolsError, InputNotFoundError, JobsFileError, RecipeError
from adaptools.recipe import recipe_root, verify_inputs
from adaptools.sources import parse_hub_ref

from .provenance import (GROUP_ATTR, SIDE_FILES_ATTR, WIDENING, check_value, input_names, jsonable, listed,
                         recorded_params, recorded_run, replayable_names, resolve_command, takes_list, to_argv)

ROOT_MODULE = "adaptools_cli.main"
"""The module holding the `cli` group (the console script's)."""


@dataclass(frozen=True)
class ClickRunner:
    """adaptools.batch.JobRunner over the click commands of `root_module`'s `cli` group."""

    root_module: str = ROOT_MODULE

    # ----------------------------------------------------------------------- checks

    def command(self, job: Job) -> tuple[click.Context, click.Command]:
        """The parent context (the group's) and the replayable command that `job` names."""
        parent = click.Context(importlib.import_module(self.root_module).cli, info_name="adaptools")
        try:
            command = resolve_command(parent, job.command)
        except RecipeError:
            raise JobsFileError(f"job {job.index}: key 'command': {job.label!r} is not a command that writes an "
                                f"output ({', '.join(replayable_names(parent.command, parent))})") from None
        for name in job.command[:-1]:
            parent = click.Context(parent.command.get_command(parent, name), info_name=name, parent=parent)
        return parent, command

    def values(self, job: Job, command: click.Command) -> dict:
        """The job's parameters (and the defaults `command` takes) checked against `command` (names, types, no
        widening options or side files), input paths resolved against the jobs folder."""
        side_files = getattr(command.callback, SIDE_FILES_ATTR)
        params = {p.name: p for p in command.params}
        allowed = sorted(n for n in params if n not in WIDENING and n not in side_files)
        inputs = input_names(command, side_files)
        unknown = sorted(set(job.defaults) - self.parameter_names())
        if unknown:
            raise JobsFileError(f"defaults: key {unknown[0]!r} is a parameter of no command that writes an output")
        values = {}
        given = {**{k: v for k, v in job.defaults.items() if k in allowed}, **job.params}
        for key, value in given.items():
            where = f"job {job.index}: key {key!r}"
            if key in WIDENING or key in side_files:
                raise JobsFileError(f"{where}: a job may not set it (outputs are `out`; --overwrite is the batch's "
                                    "own option; batch writes no side files and never pushes)")
            if key not in params:
                raise JobsFileError(f"{where}: {job.label} has no parameter {key!r} (it takes {', '.join(allowed)})")
            try:
                check_value(None, params[key], value, f"job {job.index}")
            except RecipeError as exc:
                raise JobsFileError(str(exc)) from None
            if key in inputs and value is not None:
                paths = [self.input_path(job, key, v) for v in listed(value)]
                value = paths if takes_list(params[key]) else paths[0]
            values[key] = value
        return values

    def parameter_names(self) -> set[str]:
        """The parameters of every command that writes an output."""
        parent = click.Context(importlib.import_module(self.root_module).cli, info_name="adaptools")
        return {p.name for name in replayable_names(parent.command, parent)
                for p in resolve_command(parent, name.split()).params}

    @staticmethod
    def input_path(job: Job, key: str, value: object) -> str:
        """An input as the command takes it: a path relative to the jobs folder made absolute (an existing local
        path wins), a Hub ref as written, an object-store URL as the path of its fetched copy (input_copy)."""
        text = str(value)
        if URL.match(text):
            return str(input_copy(job.folder, check_url(text, f"job {job.index}: key {key!r}")))
        local = job.folder / Path(text).expanduser()
        return text if not local.exists() and parse_hub_ref(text) is not None else str(local)

    def context(self, job: Job, overwrite: bool = False) -> click.Context:
        """The click context of `job` writing to Job.target, parsed as the command line would be (JobsFileError
        for what click refuses: a missing argument, a bad choice)."""
        parent, command = self.command(job)
        values = {**self.values(job, command), "output": str(job.target)}
        if overwrite:
            values["overwrite"] = True
        try:
            return command.make_context(job.command[-1], to_argv(command, values), parent=parent)
        except click.ClickException as exc:
            raise JobsFileError(f"job {job.index}: {' '.join(exc.format_message().split())}") from None

    def check(self, job: Job) -> None:  # noqa: D102 - JobRunner
        self.context(job)

    def group_key(self, job: Job) -> Hashable | None:  # noqa: D102 - JobRunner
        ctx = self.context(job)
        spec = getattr(ctx.command.callback, GROUP_ATTR, None)
        if spec is None or not spec[2](ctx.params):
            return None
        return job.command, tuple((k, repr(v)) for k, v in sorted(ctx.params.items()) if k not in spec[1])

    def remote_inputs(self, job: Job) -> list[str]:  # noqa: D102 - JobRunner
        _, command = self.command(job)
        given = {**job.defaults, **job.params}
        names = input_names(command, getattr(command.callback, SIDE_FILES_ATTR))
        return sorted({str(v) for name in names for v in listed(given.get(name)) if URL.match(str(v))})

    def inputs(self, job: Job) -> list[Path]:  # noqa: D102 - JobRunner
        ctx = self.context(job)
        side_files = getattr(ctx.command.callback, SIDE_FILES_ATTR)
        paths = [Path(p) for name in input_names(ctx.command, side_files) for p in listed(jsonable(ctx.params[name]))]
        return [p for p in paths if p.exists()]

    def complete(self, job: Job, recipe: dict) -> bool:  # noqa: D102 - JobRunner
        ctx = self.context(job)
        if recipe["command"] != list(job.command) or recipe.get("output_params"):
            return False
        side_files = getattr(ctx.command.callback, SIDE_FILES_ATTR)
        root = recipe_root(job.target, recipe.get("output_type") == "file")
        pinned = {}
        for name in input_names(ctx.command, side_files):
            for text in listed(jsonable(ctx.params[name])):
                ref = parse_hub_ref(str(text)) if not Path(text).exists() else None
                entry = next((e for e in recipe["inputs"] if e["param"] == name and e.get("repo_id") == ref.repo_id
                              and e.get("path_in_repo") == ref.path and ref.revision in (None, e["revision"])),
                             None) if ref else None
                if ref and entry is None:
                    return False
                if entry is not None:
                    pinned[text] = entry["path"]
        if recorded_params(ctx, side_files, root, pinned) != recipe["params"]:
            return False
        try:
            verify_inputs(recipe, root, remember=True)  # each input read once per task
        except (RecipeError, InputNotFoundError):
            return False
        return True

    # ----------------------------------------------------------------------- runs

    def run(self, jobs: Sequence[Job], overwrite: bool) -> list[tuple[str | None, float]]:  # noqa: D102 - JobRunner
        outcomes: dict[int, tuple[str | None, float]] = {}
        group = []
        for job in jobs:
            try:
                check_output(job.target, overwrite)
                group.append(job)
            except AdaptoolsError as exc:
                outcomes[job.index] = (one_line(exc), 0.0)
        if len(group) > 1:
            start = time.perf_counter()
            error = self.attempt(lambda: self.run_group(group, overwrite))
            if error is None:
                outcomes.update((job.index, (None, (time.perf_counter() - start) / len(group))) for job in group)
                group = []
        for job in group:  # alone, or again one by one when their group failed: a bad job fails alone
            start = time.perf_counter()
            error = self.attempt(lambda: self.run_one(job, overwrite))
            outcomes[job.index] = (error, time.perf_counter() - start)
        return [outcomes[job.index] for job in jobs]

    @staticmethod
    def attempt(body) -> str | None:
        """Run `body` with its terminal output and warnings kept out of the batch's; its error as one line."""
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                body()
            except (AdaptoolsError, click.ClickException, OSError, ValueError, RuntimeError) as exc:
                return exc.format_message() if isinstance(exc, click.ClickException) else one_line(exc)
        return None

    def run_one(self, job: Job, overwrite: bool) -> None:
        """Run the job's command as the command line would."""
        ctx = self.context(job, overwrite)
        with ctx:
            ctx.command.invoke(ctx)

    def run_group(self, jobs: Sequence[Job], overwrite: bool) -> None:
        """Run jobs that share a group key through their command's group runner (one read of what they share)."""
        contexts = [self.context(job, overwrite) for job in jobs]
        group = getattr(contexts[0].command.callback, GROUP_ATTR)[0]
        recorded_run(contexts, lambda: group(contexts))
