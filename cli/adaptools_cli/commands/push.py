"""`adaptools push` (an output to the Hub) and `adaptools replay` (redo a recorded output)."""
from __future__ import annotations

import shlex

import click

from adaptools.hub import push as push_to_hub
from adaptools.recipe import read_recipe, verify_inputs

from ..options import hub_options, output_options, push_options
from ..provenance import replay_argv


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
@push_options
@click.pass_context
def replay(ctx: click.Context, recipe: str, output: str, overwrite: bool, ignore_hashes: bool, push_to: str | None,
           private: bool, revision: str | None) -> None:
    """Redo the command recorded in RECIPE (an adaptools_recipe.json, or an output folder) into a new output.

    The inputs' sha256 are checked first; a changed input is refused unless --ignore-hashes.
    """
    recorded = read_recipe(recipe)
    if not ignore_hashes:
        verify_inputs(recorded)
    root = ctx.find_root()
    argv = replay_argv(ctx, recorded, output=output, overwrite=overwrite, push_to=push_to, private=private,
                       revision=revision)
    click.echo(f"replaying: adaptools {shlex.join(argv)}")
    with root.command.make_context(root.info_name, argv) as replayed:
        root.command.invoke(replayed)
