"""Model card, recipe and Hub push for every command that writes an output: one decorator per command.

Hooking a command up is one line, directly above its `def` (under the click decorators):

    @click.command()
    @click.argument("adapters", nargs=-1, type=click.Path())
    @output_options
    @provenance("combine", kind="adapter")
    def combine(...): ...

The decorator adds `--push-to ORG/NAME`, `--private` and `--revision BRANCH`, runs the command unchanged,
and then, in the finished output (which the command wrote atomically):
- writes `adaptools_recipe.json` (adaptools.recipe): the command path, its parameters (ctx.params as JSON,
  input paths made absolute; not the output, --overwrite or the push options) and the sha256 of every input;
- writes `README.md` (adaptools.card): Hub front matter, the recipe, the per-module summary;
- pushes the folder when --push-to is given (adaptools.hub; a failure is a HubError, the output stays).
Each file is written atomically (temp file + rename). A single-file output (a kohya .safetensors) gets
its recipe beside it as `<file>.adaptools_recipe.json` and no card (there is no folder to hold one).

Parameters, by convention:
- the output is the parameter named `output` (-o/--output);
- inputs are the other click.Path parameters, except those named in `output_params` (further outputs such
  as a JSON report, default `report_path`), which replay leaves out. Inputs are hashed after the command ran.

What the command may return (its return value is otherwise ignored):
    None, or a dict with any of
    "summary":    one row per module, as a list of dicts with the same keys (numbers or strings), or as a
                  {module name: dataclass or dict} mapping (e.g. a report's `.modules`): the card's
                  per-module table (first 100 rows) and the recipe's "report";
    "base_model": str, the base model for the card (default: the output's adapter_config.json, else what
                  the inputs' README.md agree on; put in the front matter only when it is a Hub id);
    "license":    str, the card's license (default: what the inputs' README.md agree on);
    "folders":    list of folders inside the output that each hold one result (merge --each): each gets
                  the card instead of the output itself; the recipe stays at the top.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import click

from adaptools import __version__
from adaptools.atomic import check_output_paths
from adaptools.card import LIBRARY, adapter_base_model, input_metadata, model_card, write_card
from adaptools.errors import RecipeError
from adaptools.hub import check_repo_id, push
from adaptools.recipe import make_recipe, write_recipe
from adaptools.sources import HubInput, hub_ref, recording

from .options import push_options

PUSH_PARAMS = ("push_to", "private", "revision")
NOT_RECORDED = ("output", "overwrite", *PUSH_PARAMS)


def provenance(operation: str, kind: str = "adapter", output_params: Sequence[str] = ("report_path",)) -> Callable:
    """Decorate a click command callback: add the push options; after it ran, write card + recipe, then push."""
    if kind not in LIBRARY:
        raise ValueError(f"kind must be one of {sorted(LIBRARY)}, not {kind!r}")

    def decorate(func: Callable) -> Callable:
        @push_options
        @functools.wraps(func)
        def command(*args, push_to: str | None = None, private: bool = False, revision: str | None = None,
                    **kwargs) -> None:
            if push_to:
                check_repo_id(push_to)
            ctx = click.get_current_context()
            outputs = [ctx.params[name] for name in ("output", *output_params) if ctx.params.get(name)]
            check_output_paths(outputs, [p for name in input_names(ctx, output_params)
                                         for p in listed(jsonable(ctx.params[name])) if hub_ref(p) is None])
            with recording() as hub_inputs:
                result = func(*args, **kwargs)
            output = record(click.get_current_context(), operation, kind, output_params, result or {}, hub_inputs)
            if push_to:
                url = push(output, push_to, private=private, revision=revision,
                           commit_message=f"adaptools {operation}: {output.name}")
                click.echo(f"pushed {output.name} to {url}")

        return command

    return decorate


def record(ctx: click.Context, operation: str, kind: str, output_params: Sequence[str], result: Mapping,
           hub_inputs: Mapping[str, HubInput] = {}) -> Path:  # noqa: B006 - read only
    """Write the recipe (and, for a folder, the card) of the finished output of `ctx`; return the output path.
    Hub inputs (`hub_inputs`: as written -> resolved) are recorded pinned to their commit."""
    output = Path(ctx.params["output"])
    inputs = input_names(ctx, output_params)
    params = {name: jsonable(value) for name, value in ctx.params.items() if name not in NOT_RECORDED}
    pairs: list[tuple[str, str | HubInput]] = []
    for name in inputs:
        values = [hub_inputs[v] if v in hub_inputs else absolute(v) for v in listed(params[name])]
        pairs += [(name, v) for v in values]
        recorded = [v.pinned if isinstance(v, HubInput) else v for v in values]
        params[name] = recorded if isinstance(params[name], list) else (recorded[0] if recorded else None)
    recipe = make_recipe(command_path(ctx), operation, kind, params, pairs,
                         [name for name in output_params if name in params], summary_rows(result.get("summary", ())))
    write_recipe(recipe, output)
    meta = input_metadata(path.local if isinstance(path, HubInput) else path for _, path in pairs)
    hub_base = next((v.ref.repo_id for name, v in pairs if name == "base" and isinstance(v, HubInput)), None)
    folders = [Path(p) for p in result.get("folders", ())] or ([output] if output.is_dir() else [])
    for folder in folders:
        base_model = result.get("base_model") or hub_base or adapter_base_model(folder)
        write_card(model_card(recipe, folder.name, base_model, result.get("license"), meta), folder)
    return output


def input_names(ctx: click.Context, output_params: Sequence[str]) -> list[str]:
    """Names of the command's input parameters: its click.Path parameters other than the outputs."""
    return [p.name for p in ctx.command.params
            if isinstance(p.type, click.Path) and p.name not in ("output", *output_params)]


def summary_rows(summary: Sequence[Mapping] | Mapping[str, object]) -> list[dict]:
    """JSON rows from a list of dicts, or from {module name: dataclass or dict} (a "module" column first)."""
    if isinstance(summary, Mapping):
        summary = [{"module": name, **(dataclasses.asdict(row) if dataclasses.is_dataclass(row) else row)}
                   for name, row in summary.items()]
    return [{key: jsonable(value) for key, value in row.items()} for row in summary]


def command_path(ctx: click.Context) -> list[str]:
    """The command names under the root group, e.g. ["dora", "to-lora"]."""
    names = []
    while ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    return names[::-1]


def jsonable(value: object) -> object:
    """A parameter value as JSON: lists for tuples, str for anything else that JSON lacks (a Path, an enum)."""
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def listed(value: object) -> list:
    """A parameter value as a list (None: empty)."""
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def absolute(value: object) -> object:
    """Input path(s) made absolute (None stays None)."""
    if isinstance(value, list):
        return [absolute(v) for v in value]
    return None if value is None else str(Path(value).absolute())


def resolve_command(ctx: click.Context, names: Sequence[str]) -> click.Command:
    """The command at `names` under the root group of `ctx` (RecipeError when this adaptools has none)."""
    command = ctx.find_root().command
    for name in names:
        command = command.get_command(ctx, name) if isinstance(command, click.Group) else None
        if command is None:
            raise RecipeError(f"adaptools {__version__} has no command {' '.join(names)!r}")
    return command


def replay_argv(ctx: click.Context, recipe: Mapping, **overrides: object) -> list[str]:
    """Arguments for the root group that redo `recipe` with `overrides` (output, overwrite, push options)."""
    command = resolve_command(ctx, recipe["command"])
    known = {p.name for p in command.params}
    unknown = sorted(set(recipe["params"]) - known)
    if unknown:
        raise RecipeError(f"adaptools {__version__} {' '.join(recipe['command'])} has no parameter {', '.join(unknown)}")
    dropped = dict.fromkeys(recipe.get("output_params", ()))
    return [*recipe["command"], *to_argv(command, {**recipe["params"], **dropped, **overrides})]


def to_argv(command: click.Command, params: Mapping) -> list[str]:
    """Command-line arguments that make click parse `params` again (options first, then `--` and the arguments)."""
    options: list[str] = []
    positionals: list[str] = []
    for p in command.params:
        value = params.get(p.name)
        if value is None:
            continue
        if isinstance(p, click.Argument):
            positionals += [str(v) for v in (value if p.nargs != 1 else [value])]
        elif p.is_bool_flag:
            options += (p.opts if value else p.secondary_opts)[:1]
        elif p.is_flag:
            options += [p.opts[0]] if value == p.flag_value else []
        elif p.count:
            options += [p.opts[0]] * value
        else:
            for item in value if p.multiple else [value]:
                options += [max(p.opts, key=len), *(str(v) for v in (item if p.nargs != 1 else [item]))]
    return options + (["--", *positionals] if positionals else [])
