"""The whole benchmark: every case in one run, returned as one JSON-ready dict with the settings and machine."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from vpr.bench.config import BenchConfig, Stage, extract_options
from vpr.bench.data import city_images, photo_copies
from vpr.bench.extraction import extraction_case
from vpr.bench.machine import cpu_bf16, machine_info, versions
from vpr.bench.measure import MB, peak_rss_mb
from vpr.bench.memory import build_memory_case
from vpr.bench.search import index_and_search_case, query_latency_case
from vpr.models.checkpoints import load_checkpoint
from vpr.models.model import build_model
from vpr.retrieval.extract import extract_descriptors
from vpr.retrieval.search import faiss_available

BENCH_TAG = "vpr bench"


def is_bench_results(path: Path) -> bool:
    """Whether `path` is a results file `vpr bench` wrote (so a rerun may replace it)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and (data.get("written_by") == BENCH_TAG or {"machine", "versions", "settings"} <= set(data))


def _set_threads(threads: int | None) -> None:
    """torch's and FAISS's thread counts (unchanged when None)."""
    if threads:
        torch.set_num_threads(threads)
        if faiss_available():
            import faiss

            faiss.omp_set_num_threads(threads)


def run_bench(config: BenchConfig, stage: Stage | None = None) -> dict:
    """Run every case and return the results (settings, machine, versions and figures) as a dict."""
    stage = stage or (lambda message: None)
    dev = torch.device(config.device)
    _set_threads(config.threads)
    started = time.perf_counter()
    if config.checkpoint is not None:
        model = load_checkpoint(config.checkpoint)[0]
        config = replace(config, model=model.config)
    else:
        model = build_model(config.model, seed=config.seed)
    results: dict = {
        "written_by": BENCH_TAG,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(config.device), "versions": versions(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
    }
    with tempfile.TemporaryDirectory(prefix="vpr-bench-") as tmp:
        workdir = Path(tmp)
        database, queries, results["data"] = city_images(config, workdir, stage)
        if "extraction" in config.cases or "search" in config.cases or config.backends:
            stage(f"writing {config.extract_images} photo-size JPEGs")
            photos = photo_copies(database + queries, config.extract_images, config.jpeg_size, workdir / "photos")
        if "extraction" in config.cases:
            results["extraction"] = extraction_case(model, photos, config, workdir, stage)
        if "search" in config.cases:
            stage(f"descriptors of the city ({len(database) + len(queries)} images)")
            amp = dev.type == "cuda" or cpu_bf16()
            base_db = extract_descriptors(model, database, extract_options(config, amp=amp)).descriptors
            base_q = extract_descriptors(model, queries, extract_options(config, amp=amp)).descriptors
            build_rows, search_rows, pca, searches = index_and_search_case(base_db, base_q, config, stage)
            results["index"], results["search"] = build_rows, search_rows
            stage("single-image query latency")
            results["query_latency"] = query_latency_case(model, pca, searches, photos, config, max(config.index_sizes))
            del searches
        if config.backends:
            from vpr.bench.backends import backends_case

            results["backends"] = backends_case(model, photos, database[:64], config, workdir, stage, config.backends)
        if "memory" in config.cases:
            results["build_index_memory"] = build_memory_case(model, database + queries, config, workdir, stage)
    results["memory"] = {"peak_rss_mb": peak_rss_mb(),
                         "gpu_peak_mb": round(torch.cuda.max_memory_allocated(dev) / MB, 1) if dev.type == "cuda" else None}
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results
