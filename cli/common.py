"""Shared CLI pieces: option parsing helpers, bounds, device and precision notes, progress bars and JSON output.

Nothing here imports torch: every command's options come from `vpr.api`'s settings dataclasses, and the
library is asked to work only inside the commands' bodies.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vpr import api
from vpr.errors import UsageError

# User text (paths, file names, option values) is printed literally: no rich markup (`[red]b.png`, `a[/b]c`),
# no emoji codes (`:cat:`), no highlighting. stdout never wraps or crops a line, so paths stay whole in pipes.
# On a terminal whose encoding lacks box-drawing characters rich falls back to ASCII boxes by itself.
console = Console(markup=False, emoji=False, highlight=False, soft_wrap=True)
err_console = Console(stderr=True, markup=False, emoji=False, highlight=False)

INT32_MAX = 2**31 - 1  # FAISS takes C ints (k, nprobe, efSearch)
SEED_MAX = 2**32 - 1
MAX_WORKERS = 256
MAX_BATCH = 4096
MAX_DIM = 65536
MAX_CLUSTERS = 1024
MAX_EF_SEARCH = 1_000_000  # FAISS HNSW allocates candidate lists of this size per query
MAX_SPACING = 1000  # CosPlace --N: N*N*L groups
DEVICE_HELP = "auto, cpu, cuda or cuda:N."


def safe_output_streams() -> None:
    """Escape characters stdout/stderr cannot encode (an ASCII terminal, a filename with undecodable bytes)
    instead of crashing on them: `café.jpg` prints as `caf\\xe9.jpg` under PYTHONIOENCODING=ascii."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a closed or exotic stream: leave it as it is
                pass


def check_output_file(path: Optional[Path], option: str) -> None:
    """Refuse an output file path that names a directory, or whose nearest existing ancestor is not one."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a directory; give a .png file path")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: {parent} is not a directory; give a .png file path in a folder")


def number_range(low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False) -> Callable:
    """A typer.Option callback for float options: refuse NaN, infinities and values outside the range
    (click's FloatRange lets NaN through), as a usage error (exit 2) that names the option."""
    bounds = " and ".join(
        f"{sign} {bound:g}" for sign, bound in ((">" if low_open else ">=", low), ("<" if high_open else "<=", high))
        if bound is not None
    )

    def check(ctx, param, value):  # positional (ctx, param, value): typer passes them untyped in this order
        if value is None:
            return value
        inside = math.isfinite(value) and (
            low is None or (value > low if low_open else value >= low)
        ) and (high is None or (value < high if high_open else value <= high))
        if not inside:
            raise typer.BadParameter(f"{value}: must be a finite number" + (f" {bounds}" if bounds else ""),
                                     ctx=ctx, param=param)
        return value

    return check


POSITIVE = number_range(0, low_open=True)
NON_NEGATIVE = number_range(0)
DEGREES = number_range(0, 360, low_open=True)


def parse_size(text: str, option: str = "--resize") -> tuple[int, int]:
    """'240x320' -> (240, 320) (height x width)."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"{option} '{text}' is not HEIGHTxWIDTH, e.g. 240x320") from None
    if not (16 <= height <= 4096 and 16 <= width <= 4096):
        raise UsageError(f"{option} '{text}': each side must be between 16 and 4096 pixels")
    return height, width


def parse_resize(text: str) -> dict:
    """--resize: 'HxW' (fixed), 'S' (shorter side to S, keeping the aspect ratio) or 'native' -> ModelConfig fields."""
    cleaned = text.strip().lower()
    if cleaned == "native":
        return {"resize": "native"}
    if cleaned.isdigit():
        side = int(cleaned)
        if not 16 <= side <= 4096:
            raise UsageError(f"--resize '{text}': the shorter side must be between 16 and 4096 pixels")
        return {"resize": "shorter", "input_size": (side, side)}
    if "x" not in cleaned:
        raise UsageError(f"--resize '{text}' is not HEIGHTxWIDTH (e.g. 322x322), a shorter side S (e.g. 480) or 'native'")
    return {"resize": "fixed", "input_size": parse_size(text)}


def parse_int_list(text: str, option: str) -> tuple[int, ...]:
    """'1,5,10' -> (1, 5, 10), all positive."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{option} '{text}' must be comma-separated integers, e.g. 1,5,10,20") from None
    if not values or min(values) < 1:
        raise UsageError(f"{option} '{text}' must list positive integers, e.g. 1,5,10,20")
    return tuple(sorted(set(values)))


AMP_HELP = ("Run the model under bf16 autocast (fp16 on GPUs without bf16): about 2x faster on GPUs and on CPUs with "
            "bf16 instructions; descriptors differ from fp32 in the third decimal, rankings almost never.")


COMPILE_HELP = ("Run the model through torch.compile after a one-off compilation of 15-60 s: a 7-19% faster forward "
                "pass measured on a 2-core CPU (more is expected on GPUs); worth it for many thousands of images. "
                "Needs a C++ compiler on the CPU.")


GPU_DECODE_HELP = ("Decode JPEGs on the GPU (nvJPEG) and resize them there in batches; CUDA only. Other formats still "
                   "decode in the workers.")


DEVICE = typer.Option("auto", "--device", help=DEVICE_HELP)
AMP = typer.Option(False, "--amp/--no-amp", help=AMP_HELP)
BACKEND = typer.Option("torch", "--backend", help="Run the model on torch, onnxruntime or openvino (its graph exported on the fly; --amp: OpenVINO bf16), or an exported .onnx / .xml file of the same model (e.g. int8 from `vpr export-model`); CPU only. Any backend answers any index.")
COMPILE = typer.Option(False, "--compile", help=COMPILE_HELP)
GPU_DECODE = typer.Option(False, "--gpu-decode", help=GPU_DECODE_HELP)
WORKERS = typer.Option(api.ExtractOptions.num_workers, "--workers", min=0, max=MAX_WORKERS,
                       help="DataLoader worker processes for decoding images.")
BATCH_SIZE = typer.Option(api.ExtractOptions.batch_size, "--batch-size", min=1, max=MAX_BATCH, help="Images per forward pass.")
JSON = typer.Option(False, "--json", help="Print the results as JSON.")


NPROBE_HELP = "ivfpq indexes: coarse lists searched per query (default 16); more finds the exact neighbours more often, slower."
EF_SEARCH_HELP = "hnsw indexes: candidate list size per query (default 128); more finds the exact neighbours more often, slower."


def device_of(device: str, amp: bool = False) -> str:
    """`--device` resolved once (under torchrun, each rank's own GPU), with the note that --amp on a CPU without
    bf16 instructions is slower, not faster."""
    resolved = api.resolve_device(device)
    if amp and api.bf16_is_slow(resolved):
        err_console.print("note: this CPU has no native bf16 instructions; --amp will be slower than fp32 here")
    return resolved


def extract_options(device: str, *, batch_size: int = 32, workers: int = 2, amp: bool = False,
                    compile_model: bool = False, gpu_decode: bool = False, skip_bad: bool = False,
                    backend: str = "torch") -> api.ExtractOptions:
    """The one `ExtractOptions` of a command, from its flags (device resolved once; --gpu-decode needs CUDA)."""
    return api.extract_options(device_of(device, amp) if backend == "torch" else "cpu", batch_size=batch_size,
                               num_workers=workers, amp=amp, compile=compile_model, decode_on_device=gpu_decode,
                               skip_bad=skip_bad, backend=backend)


@contextmanager
def distributed_run(device: str) -> Iterator[bool]:
    """Join torchrun's process group for a command's body (a no-op without torchrun) and leave it at the end;
    yields whether this rank reports. An error that rank 0 reports for the job ends any other rank quietly."""
    with api.distributed_run(device) as main:
        try:
            yield main
        except api.Reported:
            raise typer.Exit(0) from None


def rich_progress() -> Progress:
    """The transient stderr progress display every command uses."""
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    # Off when stderr is not a terminal: rich draws nothing there but ends with an empty line on stderr
    return Progress(*columns, console=err_console, transient=True, disable=not err_console.is_interactive)


@contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar on stderr, driven by the library's (done, total) callback."""
    if not enabled:
        yield lambda done, total: None
        return
    with rich_progress() as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@contextmanager
def phase_bar(enabled: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A rich bar on stderr driven by a (phase, done, total) callback (training, the demo); it restarts per phase."""
    if not enabled:
        yield lambda phase, done, total: None
        return
    with rich_progress() as bar:
        task = bar.add_task("starting", total=None)
        current = {"phase": None}

        def update(phase: str, done: int, total: int) -> None:
            if phase != current["phase"]:
                current["phase"] = phase
                bar.reset(task, total=total, description=phase)
            bar.update(task, completed=done, total=total)

        yield update


def print_json(data: object) -> None:
    """Machine-readable output on stdout: strict JSON (no NaN or Infinity), indented."""
    sys.stdout.write(api.to_json(data))


def warn_random_init(random_init: bool, what: str) -> None:
    """One line on stderr when `what` (an index or the model being indexed) has random weights."""
    if random_init:
        err_console.print(f"warning: {what} has random weights (no --checkpoint or --pretrained): its matches are near "
                          "chance and every similarity is close to 1; train a model (vpr train) or give a published "
                          "checkpoint (vpr models)", soft_wrap=True)
