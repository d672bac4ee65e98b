"""The `adaptools` command: a click group whose errors end as one `error: ...` line with exit status 2."""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import warnings
from typing import NoReturn

import click

from adaptools import AdaptoolsError, __version__

from .commands import batch, combine, convert, dora, extract, info, merge, push, quantize, rerank, spectrum


class AdaptoolsGroup(click.Group):
    """A click group that renders user errors as one line (`--debug` shows the traceback)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: D102
        argv = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in argv
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", UserWarning)
                warnings.showwarning = warn
                rv = super().main(args=argv, prog_name=prog_name or "adaptools", complete_var=complete_var,
                                  standalone_mode=False, **extra)
        except AdaptoolsError as exc:
            if debug:
                raise
            fail(str(exc), 2)
        except click.ClickException as exc:
            fail(f"{exc.format_message()} (see --help)", exc.exit_code)
        except click.Abort:
            fail("aborted", 1)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


def warn(message, category, filename, lineno, file=None, line=None) -> None:  # warnings.showwarning's signature
    """A warning as one `warning: ...` line on stderr."""
    click.echo("warning: " + " ".join(str(message).split()), err=True)


def fail(message: str, code: int) -> None:
    """Print `error: <message>` on one line of stderr and exit with `code`."""
    click.echo("error: " + " ".join(message.split()), err=True)
    sys.exit(code)


@click.group(cls=AdaptoolsGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="adaptools")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
def cli(debug: bool) -> None:
    """Adapter arithmetic and merging for LoRA/DoRA adapters, on saved files.

    Reads PEFT folders and kohya files, combines and re-ranks adapters exactly, and merges them
    into fp16/bf16/fp32 or NF4 checkpoints shard by shard.
    """


COMMANDS = (
    info.info,
    convert.convert,
    combine.combine,
    combine.interpolate,
    combine.negate,
    rerank.rerank,
    extract.extract,
    merge.merge,
    quantize.quantize,
    dora.dora,
    spectrum.spectrum,
    push.push,
    push.replay,
    batch.batch,
)
for command in COMMANDS:
    cli.add_command(command)


def main() -> NoReturn:
    """Console-script entry point: the command, then `quick_exit` with its status."""
    try:
        cli.main()
    except SystemExit as exc:
        quick_exit(exc.code)
    quick_exit(0)


def quick_exit(code: int | str | None) -> NoReturn:
    """End the process as `sys.exit(code)` would, without the interpreter's teardown: what the interpreter runs at
    exit runs (threading's exit callbacks, such as idle thread pools' shutdown, then the join of running threads;
    atexit handlers, weakref finalizers among them), standard streams are flushed, then the process exits. Tearing
    down the million objects torch's import leaves takes a third of a second at the end of every command, and frees
    nothing the exit does not."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    join_threads = getattr(threading, "_shutdown", None)  # the interpreter's own exit steps (CPython)
    run_handlers = getattr(atexit, "_run_exitfuncs", None)
    if join_threads is None or run_handlers is None:
        sys.exit(code)
    join_threads()
    run_handlers()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`adaptools info ... | head`): nothing to say
            stream.flush()
    os._exit(code or 0)
