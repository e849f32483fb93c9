"""Shared CLI pieces: option parsing helpers, device choice, progress bars and JSON output."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from vpr.errors import UsageError

console = Console()
err_console = Console(stderr=True)


def parse_size(text: str) -> tuple[int, int]:
    """'240x320' -> (240, 320) (height x width)."""
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--resize '{text}' is not HEIGHTxWIDTH, e.g. 240x320") from None
    if not (16 <= height <= 4096 and 16 <= width <= 4096):
        raise UsageError(f"--resize '{text}': each side must be between 16 and 4096 pixels")
    return height, width


def parse_int_list(text: str, option: str) -> tuple[int, ...]:
    """'1,5,10' -> (1, 5, 10), all positive."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{option} '{text}' must be comma-separated integers, e.g. 1,5,10,20") from None
    if not values or min(values) < 1:
        raise UsageError(f"{option} '{text}' must list positive integers, e.g. 1,5,10,20")
    return tuple(sorted(set(values)))


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; a named GPU must exist."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise UsageError(f"--device {device}: use auto, cpu, cuda or cuda:N")
    return device


AMP_HELP = ("Run the model under bf16 autocast (fp16 on GPUs without bf16): about 2x faster on GPUs and on CPUs with "
            "bf16 instructions; descriptors differ from fp32 in the third decimal, rankings almost never.")


COMPILE_HELP = ("Run the model through torch.compile after a one-off compilation of 15-60 s: a 7-19% faster forward "
                "pass measured on a 2-core CPU (more is expected on GPUs); worth it for many thousands of images. "
                "Needs a C++ compiler on the CPU.")


NPROBE_HELP = "ivfpq indexes: coarse lists searched per query (default 16); more finds the exact neighbours more often, slower."
EF_SEARCH_HELP = "hnsw indexes: candidate list size per query (default 128); more finds the exact neighbours more often, slower."


def check_amp(amp: bool, device: str) -> None:
    """Warn when --amp would run bf16 on a CPU without native bf16 support (emulated: slower, not faster)."""
    if amp and device == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        err_console.print("note: this CPU has no native bf16 instructions; --amp will be slower than fp32 here")


def rich_progress() -> Progress:
    """The transient stderr progress display every command uses."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    return Progress(*columns, console=err_console, transient=True)


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


def print_json(data: object) -> None:
    """Machine-readable output on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
