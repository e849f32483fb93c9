"""The build-index memory case: peak RSS of `build_index` at two database sizes, each in a fresh process."""

from __future__ import annotations

import multiprocessing
import os
import queue
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from vpr.bench.config import BenchConfig, Stage, extract_options
from vpr.bench.measure import MB, measure_memory
from vpr.data.datasets import GeoImageSet
from vpr.models.model import ModelConfig, VPRModel, build_model
from vpr.retrieval.build import build_index, cache_dir_for


def _measure_build(config: ModelConfig, seed: int, paths: list[Path], workdir: Path, options: dict, results) -> None:
    """Child process of `build_memory_case`: run `build_index` and report its peak RSS above the start."""
    try:
        model = build_model(config, seed=seed)
        images = GeoImageSet(paths=paths, utm=np.zeros((len(paths), 2)), heading=np.zeros(len(paths)), source=workdir)
        with measure_memory() as memory:
            start = time.perf_counter()
            out = workdir.with_name(workdir.name + "-index")  # beside the image folder: an output never lies inside its input
            build_index(images, out, model=model, cache=cache_dir_for(out), **options)
            seconds = time.perf_counter() - start
        results.put({"seconds": round(seconds, 2), "peak_mb": memory.peak_mb})
    except Exception as exc:  # reported by the parent, which cannot see the child's traceback
        results.put({"error": f"{type(exc).__name__}: {exc}"})


def _child_result(child, results) -> dict:
    """The dict a child process puts on `results`, or its exit status if it died without one."""
    while True:
        try:
            row = results.get(timeout=1.0)
            break
        except queue.Empty:
            if not child.is_alive():
                row = {"error": f"the measuring process died (exit code {child.exitcode})"}
                break
    child.join()
    return row


def _linked_images(sources: list[Path], count: int, folder: Path) -> list[Path]:
    """`count` distinct paths in `folder`, hard links to `sources` in turn (copies across file systems)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{i:07d}.jpg"
        if not path.exists():
            try:
                os.link(sources[i % len(sources)], path)
            except OSError:  # another file system: copy instead
                shutil.copyfile(sources[i % len(sources)], path)
        paths.append(path)
    return paths


def build_memory_case(model: VPRModel, sources: list[Path], config: BenchConfig, workdir: Path, stage: Stage) -> dict:
    """Peak RSS of `build_index` (extraction with its descriptor cache, PCA, FAISS, writing) at two sizes.

    Each size runs in a fresh process, so memory freed by earlier cases cannot hide growth. Files
    are hard links to the city's JPEGs (distinct paths, no extra disk); the model runs at 32x32 so
    the case measures memory, not compute.
    """
    small = replace(model.config, input_size=(32, 32))
    context = multiprocessing.get_context("spawn")
    rows = []
    for count in config.memory_images:
        folder = workdir / f"memory-{count}"
        paths = _linked_images(sources, count, folder)
        stage(f"build-index memory: {count:,} images (fresh process)")
        options = {"pca_dim": min(config.pca_dim or 0, count) or None, "options": extract_options(config)}
        results = context.Queue()
        child = context.Process(target=_measure_build, args=(small, config.seed, paths, folder, options, results))
        child.start()
        row = _child_result(child, results)
        rows.append({"images": count, **row, "descriptors_mb": round(count * small.descriptor_dim * 4 / MB, 1)})
    growth = None
    if len(rows) == 2 and rows[0].get("peak_mb") is not None and rows[1].get("peak_mb") is not None:
        growth = round((rows[1]["peak_mb"] - rows[0]["peak_mb"]) * MB / (rows[1]["images"] - rows[0]["images"]), 1)
    return {"rows": rows, "peak_bytes_per_extra_image": growth, "descriptor_bytes_per_image": small.descriptor_dim * 4}
