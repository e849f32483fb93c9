"""The `vpr` Typer application and its entry point, which turns `VPRError`s into one-line messages."""

from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
from typing import Callable

import typer

from cli import deploy_cmd, eval_cmd, groups_cmd, interop_cmds, places_cmd, retrieval_cmds, synth_cmds, train_cmds
from cli.bench_cmd import bench_cmd
from cli.common import safe_output_streams
from cli.flags import as_flags, flag_table
from cli.models_cmd import join_anyloc_cmd, models_cmd
from cli.serve_cmd import serve_cmd
from vpr.errors import VPRError

INTERRUPTED = 130  # the shell's code for a process ended by SIGINT (128 + 2)
# Typer's (vendored or not) click exceptions: usage errors (exit 2) and the like, shown by their own show().
_CLICK_ERRORS = tuple(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

app = typer.Typer(
    name="vpr", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
    help="Visual place recognition: find where a photo was taken by retrieving geo-tagged images.",
)


@app.callback()
def _global(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show info logs."),
) -> None:
    """Visual place recognition: find where a photo was taken by retrieving geo-tagged images."""
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not debug:  # torch.compile on a CPU-only machine notes that it found no CUDA runtime
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


class _Both(dict):
    """A command's own flags, falling back to every command's (filled as the commands are registered)."""

    def __missing__(self, name: str):
        return EVERY_FLAG[name]

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name) or name in EVERY_FLAG


class Interrupted(Exception):
    """Ctrl-C inside a command, carried past Typer (which would turn KeyboardInterrupt into a silent exit 130)."""


EVERY_FLAG: dict = {}  # a parameter of any command -> its flag, for messages that point to another command


def _command(command: Callable) -> Callable:
    """`command` as the app runs it: Ctrl-C carried past Typer, and the library's errors said with this
    command's flags, or another command's where the message points there (`vpr.errors` messages name
    parameters, `cli.flags`)."""
    own = flag_table(command)
    for name, flag in own.items():
        EVERY_FLAG.setdefault(name, flag)
    flags = _Both(own)

    @functools.wraps(command)  # Typer reads the options from the wrapped signature
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted() from None
        except VPRError as exc:
            exc.args = (as_flags(exc.args[0], flags), *exc.args[1:]) if exc.args else exc.args
            raise

    return run


for _name, _function in (
    ("synth", synth_cmds.synth_cmd), ("build-index", retrieval_cmds.build_index_cmd), ("query", retrieval_cmds.query_cmd),
    ("eval", eval_cmd.eval_cmd), ("models", models_cmd), ("train", train_cmds.train_cmd),
    ("groups", groups_cmd.groups_cmd), ("demo", synth_cmds.demo_cmd), ("bench", bench_cmd), ("serve", serve_cmd),
    ("join-anyloc", join_anyloc_cmd), ("pairs", interop_cmds.pairs_cmd), ("export-features", interop_cmds.export_features_cmd),
    ("export-model", deploy_cmd.export_model_cmd), ("places", places_cmd.places_cmd),
):
    app.command(_name)(_command(_function))


def _interrupted() -> None:
    print("interrupted", file=sys.stderr)
    sys.exit(INTERRUPTED)


def main() -> None:
    """Console-script entry: exit 0 on success, 1 on runtime failures, 2 on usage errors, 130 on Ctrl-C."""
    debug = "--debug" in sys.argv[1:] or os.environ.get("VPR_DEBUG") == "1"
    safe_output_streams()
    try:
        # standalone_mode=False: Typer raises usage errors and interrupts instead of printing and exiting itself
        code = app(standalone_mode=False)
    except _CLICK_ERRORS as exc:  # a wrong flag or value: click's usage message naming the option, exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except (Interrupted, KeyboardInterrupt):
        _interrupted()
    except typer.Abort as exc:  # older click: Ctrl-C (or end of input) becomes Abort
        if isinstance(exc.__cause__, KeyboardInterrupt):
            _interrupted()
        print("error: aborted", file=sys.stderr)
        sys.exit(1)
    except VPRError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except Exception as exc:
        if debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback and report it)", file=sys.stderr)
        sys.exit(1)
    if code == INTERRUPTED:  # Ctrl-C while Typer parsed the arguments: it returns Exit(130)'s code
        _interrupted()
    sys.exit(code if isinstance(code, int) else 0)
