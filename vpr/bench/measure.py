"""Measuring: wall and CPU time, steady-state rates, RSS and peak memory (Linux /proc), GPU memory."""

from __future__ import annotations

import re
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MB = 1e6


def _proc_status(field_name: str) -> int | None:
    """A /proc/self/status memory field in bytes (Linux), else None."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def rss_bytes() -> int | None:
    """Current resident memory of this process."""
    return _proc_status("VmRSS")


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process since it started or since `reset_peak_rss`."""
    return _proc_status("VmHWM")


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (Linux `clear_refs` 5); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class Memory:
    """Memory figures of a block: peak above the starting RSS, RSS still held after, peak GPU bytes."""

    peak_mb: float | None = None
    held_mb: float | None = None
    gpu_peak_mb: float | None = None


@contextmanager
def measure_memory(device: torch.device | None = None) -> Iterator[Memory]:
    """Fill a `Memory` with the RSS (and GPU) use of the block."""
    memory = Memory()
    before = rss_bytes()
    resettable = reset_peak_rss()
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        gpu_before = torch.cuda.memory_allocated(device)
    yield memory
    after, peak = rss_bytes(), peak_rss_bytes()
    if before is not None and after is not None:
        memory.held_mb = round((after - before) / MB, 1)
        if resettable and peak is not None:
            memory.peak_mb = round(max(peak - before, 0) / MB, 1)
    if cuda:
        torch.cuda.synchronize(device)
        memory.gpu_peak_mb = round((torch.cuda.max_memory_allocated(device) - gpu_before) / MB, 1)


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (Linux reports kB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB, 1)


@contextmanager
def cpu_time() -> Iterator[dict[str, float]]:
    """CPU seconds the block used in this process ("main") and in worker processes it waited for."""
    self_before = resource.getrusage(resource.RUSAGE_SELF)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    used: dict[str, float] = {}
    yield used
    for name, who, before in (("main", resource.RUSAGE_SELF, self_before), ("workers", resource.RUSAGE_CHILDREN, children_before)):
        after = resource.getrusage(who)
        used[name] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BatchClock:
    """A progress callback that timestamps batches, for steady-state throughput after the first batch."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.marks.append((time.perf_counter(), done))

    def steady_rate(self) -> float | None:
        """Median images/s of the batches after the first one: start-up excluded, and robust to
        another process taking the cores for a moment."""
        marks = [m for m in self.marks if m[1] > 0]
        rates = [(d1 - d0) / (t1 - t0) for (t0, d0), (t1, d1) in zip(marks, marks[1:]) if t1 > t0 and d1 > d0]
        return float(np.median(rates)) if rates else None


def percentile_ms(seconds: list[float], q: float) -> float:
    """The q-th percentile of durations, in milliseconds."""
    return round(float(np.percentile(np.asarray(seconds) * 1000.0, q)), 3)
