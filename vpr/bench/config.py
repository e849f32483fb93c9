"""What `vpr bench` measures and at which sizes: `BenchConfig` and the quick / full presets."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vpr.bench import CASES
from vpr.errors import UsageError
from vpr.models.model import ModelConfig
from vpr.retrieval.options import ExtractOptions

Stage = Callable[[str], None]  # told what is being measured now (the CLI shows it as a status line)


@dataclass
class BenchConfig:
    """What to measure and at which sizes; `bench_config` gives the quick and full presets."""

    device: str = "cpu"
    quick: bool = False
    data: Path | None = None  # a synthetic-city root (ROOT/images/SPLIT/...); rendered when None
    preset: str = "small"
    model: ModelConfig = field(default_factory=ModelConfig)
    batch_size: int = 32
    workers: int = 2
    extract_images: int = 512
    jpeg_size: tuple[int, int] | None = (480, 640)  # photo-size copies (height, width); None: the city's files
    forward_batches: int = 8
    index_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    pca_dim: int | None = 256
    num_queries: int = 1000
    latency_queries: int = 200
    k: int = 10
    memory_images: tuple[int, int] = (8000, 32000)  # past the allocator's warm-up, where growth is steady
    compile: bool = False  # add torch.compile cases (always on CUDA)
    threads: int | None = None
    checkpoint: Path | None = None  # a vpr checkpoint to measure instead of a random-init `model`
    cases: tuple[str, ...] = CASES
    backends: tuple[str, ...] = ()  # the backends case's variants (vpr.bench.backends.VARIANTS); () skips it
    seed: int = 0


def bench_config(quick: bool = False, device: str = "cpu", **overrides) -> BenchConfig:
    """The default settings: `quick` runs in a few minutes on a laptop CPU; CUDA gets larger batches."""
    settings: dict = {"device": device, "quick": quick}
    if quick:
        settings.update(preset="tiny", extract_images=192, forward_batches=4, index_sizes=(10_000, 100_000),
                        num_queries=200, latency_queries=100)
    if torch.device(device).type == "cuda":
        settings.update(compile=True, batch_size=128, workers=min(8, os.cpu_count() or 1),
                        extract_images=1024 if quick else 4096, forward_batches=10 if quick else 20)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    config = BenchConfig(**settings)
    for flag, value, low in (("`extract_images`", config.extract_images, 2), ("`batch_size`", config.batch_size, 1),
                             ("`workers`", config.workers, 0), ("`threads`", config.threads or 1, 1),
                             ("`index_sizes`", min(config.index_sizes, default=0), 100)):
        if value < low:
            raise UsageError(f"{flag} {value}: must be at least {low}")
    return config


def extract_options(config: BenchConfig, **flags) -> ExtractOptions:
    """The extraction settings of `config` (batch size, workers, device), with `flags` (amp, compile, ...) on top."""
    return ExtractOptions(batch_size=config.batch_size, num_workers=config.workers, device=torch.device(config.device),
                          **flags)
