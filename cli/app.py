"""The `vpr` Typer application and its entry point, which turns `VPRError`s into one-line messages."""

from __future__ import annotations

import logging
import os
import sys
import traceback

import typer

from cli import groups_cmd, retrieval_cmds, synth_cmds, train_cmds
from cli.bench_cmd import bench_cmd
from cli.models_cmd import models_cmd
from vpr.errors import VPRError

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


app.command("synth")(synth_cmds.synth_cmd)
app.command("build-index")(retrieval_cmds.build_index_cmd)
app.command("query")(retrieval_cmds.query_cmd)
app.command("eval")(retrieval_cmds.eval_cmd)
app.command("models")(models_cmd)
app.command("train")(train_cmds.train_cmd)
app.command("groups")(groups_cmd.groups_cmd)
app.command("demo")(synth_cmds.demo_cmd)
app.command("bench")(bench_cmd)


def main() -> None:
    """Console-script entry: exit 0 on success, 1 on runtime failures, 2 on usage errors."""
    debug = "--debug" in sys.argv[1:] or os.environ.get("VPR_DEBUG") == "1"
    try:
        app()  # Typer handles --help and usage errors (exit 2) itself
    except VPRError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback and report it)", file=sys.stderr)
        sys.exit(1)
