"""`adaptools push` (an output to the Hub) and `adaptools replay` (redo a recorded output)."""
from __future__ import annotations

import shlex

import click

from adaptools.hub import push as push_to_hub
from adaptools.recipe import read_recipe, verify_inputs

from ..options import allow_pickle, hub_options, output_options, push_options
from ..provenance import replay_params, resolve_command, to_argv


@click.command()
@click.argument("path", type=click.Path())
@click.option("--repo-id", required=True, metavar="ORG/NAME", help="Hub repository (created if missing).")
@hub_options
@click.option("--commit-message", help="Commit message (default: Upload <name> with adaptools).")
@click.option("--create-pr", is_flag=True, help="Open a pull request against main instead of committing to it.")
def push(path: str, repo_id: str, private: bool, revision: str | None, commit_message: str | None,
         create_pr: bool) -> None:
    """Push PATH to the Hub: an output folder (with its README.md and recipe), or one adapter file with its recipe.

    The token comes from HF_TOKEN or the login cache of `hf auth login`; it is never printed.
    """
    url = push_to_hub(path, repo_id, private=private, revision=revision, commit_message=commit_message,
                      create_pr=create_pr)
    click.echo(f"pushed {path} to {url}")


@click.command()
@click.argument("recipe", type=click.Path())
@output_options
@click.option("--ignore-hashes", is_flag=True, help="Replay even when an input differs from the recorded sha256.")
@allow_pickle
@push_options
@click.pass_context
def replay(ctx: click.Context, recipe: str, output: str, overwrite: bool, ignore_hashes: bool, allow_pickle: bool,
           push_to: str | None, private: bool, revision: str | None) -> None:
    """Redo the command recorded in RECIPE into a new output: RECIPE is an output folder (its
    adaptools_recipe.json), a recipe file, or a single-file output (.safetensors, the recipe in its metadata).

    A recipe is data: only commands that write an output are replayed (never push or replay), with the recipe's
    listed inputs (paths relative to the recipe's folder), whose sha256 are checked first (--ignore-hashes to
    skip); everything is written under -o, side files such as reports inside it. --overwrite, --allow-pickle
    and the push options are taken only from this command line.
    """
    recorded, root = read_recipe(recipe)
    command = resolve_command(ctx, recorded["command"])
    values, ignored = replay_params(ctx, command, recorded, root, output)
    for name in ignored:
        click.echo(f"warning: the recipe sets {name!r}; ignored (replay takes it only from its own command line)",
                   err=True)
    if not ignore_hashes:
        verify_inputs(recorded, root)
    names = {p.name for p in command.params}
    typed = dict(output=output, overwrite=overwrite, allow_pickle=allow_pickle, push_to=push_to, private=private,
                 revision=revision)
    argv = [*recorded["command"], *to_argv(command, {**values, **{k: v for k, v in typed.items() if k in names}})]
    click.echo(f"replaying: adaptools {shlex.join(argv)}")
    root_command = ctx.find_root()
    with root_command.command.make_context(root_command.info_name, argv) as replayed:
        root_command.command.invoke(replayed)
