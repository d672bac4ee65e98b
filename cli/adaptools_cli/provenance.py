"""Model card, recipe and Hub push for every command that writes an output: one decorator per command; and the
rules by which `replay` turns a recipe (data) back into a command line.

Hooking a command up is one line, directly above its `def` (under the click decorators):

    @click.command()
    @click.argument("adapters", nargs=-1, type=click.Path())
    @output_options
    @provenance("combine", kind="adapter")
    def combine(...): ...

The decorator adds `--push-to ORG/NAME`, `--private` and `--revision BRANCH`, and runs the command inside
`adaptools.atomic.staged_output` for its output: the lock beside the target is taken first (a second run for
the same target fails before any work), and the command's own atomic write of its output lands in the staged
temporary folder. Then, still inside that folder, before the one rename into place:
- the recipe (adaptools.recipe): the command path, its parameters (input paths relative to the output; not the
  output, the side files or the widening options) and the sha256 of every input: `adaptools_recipe.json` in a
  folder, or the `adaptools_recipe` metadata key of a single-file output (a kohya .safetensors), which gets no card;
- `README.md` (adaptools.card): Hub front matter, the recipe, the per-module summary.
The output is complete with its recipe and card, or absent. With --push-to the finished output is pushed
(adaptools.hub; a failure is a HubError, the output stays).

Parameters, by convention:
- the output is the parameter named `output` (-o/--output), `overwrite` replaces it;
- side files (further outputs such as a JSON report) are the parameters named in `side_files`, each with the file
  name a replay writes it under inside its output (default `report_path` -> `report.json`);
- inputs are the other click.Path parameters. Inputs are hashed after the command ran. An input given as a Hub
  repo id (adaptools.sources) is recorded as that ref pinned to the commit it resolved to, with the repo files
  the command used; a merged model's card takes the repo id of a Hub `base` as its `base_model`.

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

Replay (the allow-list): only commands carrying this decorator are replayed (never `push`, never `replay`).
A recipe's values are checked against the command's click parameter types and passed as `--name=value` options
and positional arguments after `--`, so no value can become an option. The widening options (WIDENING) come only
from the replay command line; a recipe's value for one is ignored with a warning.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import click

from adaptools import __version__, digests
from adaptools.atomic import Staging, check_output_paths, staged_output
from adaptools.card import LIBRARY, adapter_base_model, input_metadata, model_card, write_card
from adaptools.errors import OutputWriteError, RecipeError
from adaptools.hub import check_repo_id, push
from adaptools.recipe import input_path, make_recipe, recipe_root, relative_path, write_recipe
from adaptools.sources import HubInput, hub_ref, recording

from .options import push_options

PUSH_PARAMS = ("push_to", "private", "revision")
WIDENING = ("output", "overwrite", "allow_pickle", *PUSH_PARAMS)
"""Parameters a recipe never sets: where the output goes, and what a run may do beyond writing it."""
SIDE_FILES = {"report_path": "report.json"}
SIDE_FILES_ATTR = "adaptools_side_files"
"""The attribute marking a command callback as replayable (its value: the command's side files)."""
RECORDING_ATTR = "adaptools_recording"
"""The attribute holding a replayable command's (operation, kind) for its recipe and card."""
GROUP_ATTR = "adaptools_group"
"""The attribute holding (group runner, names of the parameters that may differ, which invocations may be grouped)
of a command that runs several invocations in one go (merges sharing a base: one read of it)."""


def provenance(operation: str, kind: str = "adapter", side_files: Mapping[str, str] = SIDE_FILES,
               group: Callable[[Sequence[click.Context]], list[Mapping]] | None = None,
               group_varies: Sequence[str] = (), group_when: Callable[[Mapping], bool] = bool) -> Callable:
    """Decorate a click command callback: add the push options; run it in a staged output, write card + recipe
    into the staging, rename, then push. `group(contexts)` (optional) runs several invocations together that agree
    on every parameter but `group_varies` (and the output) and whose parameters pass `group_when`, returning each
    one's result (`adaptools batch`: merges of one base, one read of it)."""
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
            recorded_run([ctx], lambda: [func(*args, **kwargs)])
            if push_to:
                output = Path(ctx.params["output"])
                url = push(output, push_to, private=private, revision=revision,
                           commit_message=f"adaptools {operation}: {output.name}")
                click.echo(f"pushed {output.name} to {url}")

        setattr(command, SIDE_FILES_ATTR, dict(side_files))
        setattr(command, RECORDING_ATTR, (operation, kind))
        if group is not None:
            setattr(command, GROUP_ATTR, (group, (*group_varies, "output"), group_when))
        return command

    return decorate


def recorded_run(contexts: Sequence[click.Context], body: Callable[[], Sequence[Mapping | None]]) -> None:
    """Run `body` (which writes the outputs of the invocations `contexts` of one replayable command and returns
    each one's result) inside a staged output per invocation, then write each one's recipe and card; every output
    is renamed into place only when all are written."""
    command = contexts[0].command
    side_files = getattr(command.callback, SIDE_FILES_ATTR)
    operation, kind = getattr(command.callback, RECORDING_ATTR)
    outputs = [ctx.params[name] for ctx in contexts for name in ("output", *side_files) if ctx.params.get(name)]
    check_output_paths(outputs, [p for ctx in contexts for name in input_names(command, side_files)
                                 for p in listed(jsonable(ctx.params[name])) if hub_ref(p) is None])
    digests.forget()  # the recipe takes only this command's own reads as hashed
    with contextlib.ExitStack() as stack:
        stagings = [stack.enter_context(staged_output(ctx.params["output"],
                                                      overwrite=bool(ctx.params.get("overwrite"))))
                    for ctx in contexts]
        with recording() as hub_inputs:
            results = body()
        for ctx, staging, result in zip(contexts, stagings, results):
            record(ctx, staging, operation, kind, side_files, result or {}, hub_inputs)


def record(ctx: click.Context, staging: Staging, operation: str, kind: str, side_files: Mapping[str, str],
           result: Mapping, hub_inputs: Mapping[str, HubInput]) -> None:
    """Write the recipe (and, for a folder, the card) of the staged output of `ctx`; `hub_inputs` are the inputs
    given as Hub refs, resolved (by the text given)."""
    if staging.is_file is None:
        raise OutputWriteError(f"{str(staging.target)!r} was not written: the command wrote no output")
    root = recipe_root(staging.target, staging.is_file)
    inputs = input_names(ctx.command, side_files)
    pairs = [(name, hub_inputs.get(path, path)) for name in inputs for path in listed(jsonable(ctx.params[name]))]
    params = recorded_params(ctx, side_files, root, {text: hub.pinned for text, hub in hub_inputs.items()})
    recipe = make_recipe(command_path(ctx), operation, kind, params, pairs, root,
                         output_type="file" if staging.is_file else "folder",
                         output_params=[name for name in side_files if ctx.params.get(name)],
                         report=summary_rows(result.get("summary", ())))
    write_recipe(recipe, staging.path, staging.is_file)
    if staging.is_file:
        return
    meta = input_metadata(path.local if isinstance(path, HubInput) else path for _, path in pairs)
    hub_base = next((p.ref.repo_id for name, p in pairs if name == "base" and isinstance(p, HubInput)), None)
    for folder in [staging.locate(p) for p in result.get("folders", ())] or [staging.path]:
        base_model = result.get("base_model") or hub_base or adapter_base_model(folder)
        write_card(model_card(recipe, folder.name, base_model, result.get("license"), meta), folder)


def recorded_params(ctx: click.Context, side_files: Mapping[str, str], root: Path,
                    pinned: Mapping[str, str]) -> dict:
    """The recipe's `params` of the invocation `ctx`: JSON values, no widening options or side files, inputs
    relative to `root` (Hub inputs as their pinned refs: `pinned` maps the text given to it)."""
    params = {name: jsonable(value) for name, value in ctx.params.items()
              if name not in WIDENING and name not in side_files}
    for name in input_names(ctx.command, side_files):
        params[name] = relative(params[name], root, pinned)
    return params


def input_names(command: click.Command, side_files: Mapping[str, str]) -> list[str]:
    """Names of the command's input parameters: its click.Path parameters other than the outputs."""
    return [p.name for p in command.params
            if isinstance(p.type, click.Path) and p.name != "output" and p.name not in side_files]


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


def relative(value: object, root: Path, pinned: Mapping[str, str]) -> object:
    """Input path(s) relative to the recipe's root, Hub inputs as their pinned refs (None stays None)."""
    if isinstance(value, list):
        return [relative(v, root, pinned) for v in value]
    if value in pinned:
        return pinned[value]
    return None if value is None else relative_path(value, root)


# --------------------------------------------------------------------------- replay


def replayable_names(group: click.Group, ctx: click.Context, prefix: str = "") -> list[str]:
    """The commands under `group` that replay runs (those carrying @provenance), e.g. "dora to-lora"."""
    names = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if isinstance(command, click.Group):
            names += replayable_names(command, ctx, f"{prefix}{name} ")
        elif hasattr(command.callback, SIDE_FILES_ATTR):
            names.append(prefix + name)
    return names


def resolve_command(ctx: click.Context, names: Sequence[str]) -> click.Command:
    """The replayable command at `names` under the root group of `ctx` (RecipeError for any other)."""
    root = ctx.find_root().command
    command = root
    for name in names:
        command = command.get_command(ctx, name) if isinstance(command, click.Group) else None
        if command is None:
            raise RecipeError(f"adaptools {__version__} has no command {' '.join(names)!r}")
    if isinstance(command, click.Group) or not hasattr(command.callback, SIDE_FILES_ATTR):
        raise RecipeError(f"the recipe names the command {' '.join(names)!r}, which replay does not run: it runs only "
                          f"commands that write an output ({', '.join(replayable_names(root, ctx))})")
    return command


def replay_params(ctx: click.Context, command: click.Command, recipe: Mapping, root: Path,
                  output: str) -> tuple[dict, list[str]]:
    """The parameter values that redo `recipe` into `output` (inputs from the recipe's `inputs`, resolved against
    `root`; side files inside `output`), and the names of widening parameters the recipe set, which are ignored.
    RecipeError for anything the command would not accept."""
    side_files = getattr(command.callback, SIDE_FILES_ATTR)
    params = {p.name: p for p in command.params}
    recorded = recipe["params"]
    where = f"the recipe of {' '.join(recipe['command'])}"
    unknown = sorted(set(recorded) - set(params))
    if unknown:
        raise RecipeError(f"{where} sets {', '.join(unknown)}, which adaptools {__version__} "
                          f"{' '.join(recipe['command'])} does not have")
    inputs = input_names(command, side_files)
    for entry in recipe["inputs"]:
        if entry["param"] not in inputs:
            raise RecipeError(f"{where} lists the input {entry['path']!r} for {entry['param']!r}, which is not an "
                              f"input of the command ({', '.join(inputs)})")
    values: dict = {}
    for name in inputs:
        listed_paths = [e["path"] for e in recipe["inputs"] if e["param"] == name]
        named = listed(recorded.get(name))
        stray = [p for p in named if p not in listed_paths]
        if stray:
            raise RecipeError(f"{where}: parameter {name!r} names {stray[0]!r}, which is not among the recipe's "
                              "inputs (every input needs an entry with its sha256)")
        if named != listed_paths:
            raise RecipeError(f"{where}: parameter {name!r} ({named!r}) does not match its inputs ({listed_paths!r})")
        paths = [str(input_path(e, root)) for e in recipe["inputs"] if e["param"] == name]
        values[name] = paths if takes_list(params[name]) else (paths[0] if paths else None)
    for name, value in recorded.items():
        if name not in inputs and name not in WIDENING and name not in side_files:
            check_value(ctx, params[name], value, where)
            values[name] = value
    written = set(recipe.get("output_params", ())) | {n for n in side_files if recorded.get(n)}
    for name in sorted(written):
        if name not in side_files:
            raise RecipeError(f"{where} names the side file {name!r}, which the command does not write")
        if recipe.get("output_type", "folder") == "folder":
            values[name] = str(Path(output) / side_files[name])
    ignored = [name for name in WIDENING if recorded.get(name) not in (None, False)]
    return values, ignored


def takes_list(param: click.Parameter) -> bool:
    """Whether the parameter's value is a list (repeatable, or several values)."""
    return param.multiple or param.nargs != 1


def check_value(ctx: click.Context, param: click.Parameter, value: object, where: str) -> None:
    """RecipeError unless `value` (JSON) is what click would make of this parameter's command-line text."""
    if value is None:
        return
    what = f"{where}: parameter {param.name!r}"
    if isinstance(param, click.Option) and (param.is_flag or param.count):
        fits = isinstance(value, bool) if param.is_bool_flag else (
            value == param.flag_value if param.is_flag else type(value) is int and value >= 0)
        if not fits:
            raise RecipeError(f"{what} cannot be {value!r}")
        return
    items = value if takes_list(param) else [value]
    if not isinstance(items, list):
        raise RecipeError(f"{what} must be a list, not {value!r}")
    nested = param.multiple and param.nargs != 1
    for item in items:
        if nested and not (isinstance(item, list) and len(item) == param.nargs):
            raise RecipeError(f"{what} must hold lists of {param.nargs} values, not {item!r}")
        for scalar in item if nested else [item]:
            is_bool = isinstance(param.type, click.types.BoolParamType)
            if not isinstance(scalar, (str, int, float)) or (isinstance(scalar, bool) and not is_bool):
                raise RecipeError(f"{what} cannot be {scalar!r}")
            try:
                param.type.convert(str(scalar), param, ctx)
            except click.ClickException as exc:
                raise RecipeError(f"{what}: {exc.format_message()}") from None


def to_argv(command: click.Command, params: Mapping) -> list[str]:
    """Command-line arguments that make click parse `params` again: options as `--name=value` (a value can never
    read as an option), then `--` and the positional arguments."""
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
            name = max(p.opts, key=len)
            for item in value if p.multiple else [value]:
                first, *rest = [str(v) for v in (item if p.nargs != 1 else [item])]
                options += [f"{name}={first}" if name.startswith("--") else f"{name}{first}", *rest]
    return options + (["--", *positionals] if positionals else [])
