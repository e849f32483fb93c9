"""The index and search cases: PCA and index builds per size, each kind searched as `vpr query` does, single-image queries."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from vpr.bench.config import BenchConfig, Stage
from vpr.bench.data import replicate
from vpr.bench.measure import MB, measure_memory, percentile_ms
from vpr.data.images import load_rgb, preprocess
from vpr.models.inference import amp_dtype, forward_batch, inference_model
from vpr.models.model import VPRModel
from vpr.models.pca import PCA, fit_pca
from vpr.retrieval.search import (
    INDEX_KINDS, build_faiss_index, faiss_available, faiss_gpu_count, faiss_search, search_by_kind, search_database,
    torch_search, write_faiss_index,
)

Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]  # (queries, k) -> (similarities, indices)


def faiss_bytes(index) -> int:
    """Size of a FAISS index as written to disk, which is what it holds in memory."""
    with tempfile.TemporaryDirectory(prefix="vpr-bench-index-") as tmp:
        write_faiss_index(index, Path(tmp) / "index.faiss")
        return (Path(tmp) / "index.faiss").stat().st_size


def query_search(kind: str, db: np.ndarray, index, device: str = "cpu") -> Search:
    """Search an index of `kind` (FAISS `index`, None for flat) over `db` with the code `vpr query` runs
    (`search_by_kind`, as `IndexBundle.search`), keeping device copies between calls as a loaded index does."""
    resident: dict = {}
    return lambda queries, k: search_by_kind(kind, db, index, queries, k, device=device, resident=resident)


def searchers(db: np.ndarray, config: BenchConfig, dev: torch.device, stage: Stage, size: int) -> Iterator[tuple[str, dict, Search]]:
    """Build each index kind over `db`, yielding (kind, build figures, search function): the kinds as
    `vpr query` searches them (flat straight on the descriptors, IVF-PQ re-ranked exactly, HNSW; their
    faiss-gpu clones on CUDA), and for comparison IVF-PQ without re-ranking and exact torch search."""
    kinds = list(INDEX_KINDS) if faiss_available() else []
    gpu_faiss = dev.type == "cuda" and faiss_gpu_count() > 0
    for kind in kinds:
        if kind == "ivfpq" and len(db) < 256 * 39:
            continue
        if kind == "flat":
            yield kind, {"build_s": 0.0, "index_mb": 0.0}, query_search(kind, db, None)
            continue
        stage(f"{size:,} descriptors: building {kind}")
        with measure_memory() as memory:
            start = time.perf_counter()
            index = build_faiss_index(db, kind, seed=config.seed)
            seconds = time.perf_counter() - start
        build = {"build_s": round(seconds, 3), "index_mb": round(faiss_bytes(index) / MB, 1), "peak_mb": memory.peak_mb}
        yield kind, build, query_search(kind, db, index)
        if kind == "ivfpq":
            yield "ivfpq-no-rerank", {}, (lambda q, k, index=index: faiss_search(index, q, k))
        if gpu_faiss and kind != "hnsw":
            yield f"{kind}-gpu", {}, query_search(kind, db, index, config.device)
        del index
    if gpu_faiss:
        yield "flat-gpu", {}, query_search("flat", db, None, config.device)
    half = dev.type == "cuda"  # the exact search `vpr query` falls back to on CUDA without faiss-gpu
    with measure_memory(dev) as memory:
        start = time.perf_counter()
        resident = search_database(db, config.device, half=half)
        seconds = time.perf_counter() - start
    build = {"build_s": round(seconds, 3), "index_mb": round(resident.numel() * resident.element_size() / MB, 1),
             "gpu_peak_mb": memory.gpu_peak_mb}
    yield ("torch-fp16" if half else "torch"), build, (
        lambda q, k: torch_search(resident, q, k, device=config.device, half=half))


def search_stats(search: Search, queries: np.ndarray, config: BenchConfig, dev: torch.device) -> tuple[dict, np.ndarray]:
    """Single-query latency (p50/p95 ms), batched queries/s and the batch's top-k indices."""
    search(queries[:1], config.k)
    latencies = []
    for q in queries[:config.latency_queries]:
        start = time.perf_counter()
        search(q[None], config.k)
        latencies.append(time.perf_counter() - start)
    with measure_memory(dev) as memory:
        start = time.perf_counter()
        _, indices = search(queries, config.k)
        seconds = time.perf_counter() - start
    return {
        "p50_ms": percentile_ms(latencies, 50), "p95_ms": percentile_ms(latencies, 95),
        "queries_per_s": round(len(queries) / seconds, 1), "batch_peak_mb": memory.peak_mb,
    }, indices


def _pca_row(raw: np.ndarray, config: BenchConfig, stage: Stage, size: int) -> tuple[PCA, np.ndarray, dict]:
    """Fit the PCA on `raw` and project it, timed: (pca, projected descriptors, build row)."""
    dim = min(config.pca_dim, *raw.shape)
    stage(f"{size:,} descriptors: PCA fit to {dim}-d")
    with measure_memory() as memory:
        start = time.perf_counter()
        pca = fit_pca(raw, dim, seed=config.seed)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        db = pca.transform(raw)
        transform_s = time.perf_counter() - start
    return pca, db, {"size": size, "kind": "pca", "fit_s": round(fit_s, 3), "transform_s": round(transform_s, 3),
                     "peak_mb": memory.peak_mb}


def index_and_search_case(
    base_db: np.ndarray, base_q: np.ndarray, config: BenchConfig, stage: Stage,
) -> tuple[list[dict], list[dict], PCA | None, dict[str, Search]]:
    """Build rows and search rows for each database size, and the largest size's PCA and search functions."""
    dev = torch.device(config.device)
    rng = np.random.default_rng(config.seed)
    raw_queries = replicate(base_q, config.num_queries, rng)
    build_rows, search_rows = [], []
    largest: tuple[PCA | None, dict[str, Search]] = (None, {})
    for size in config.index_sizes:
        stage(f"{size:,} descriptors: replicating real ones")
        raw = replicate(base_db, size, rng)
        pca = None
        if config.pca_dim:
            pca, db, row = _pca_row(raw, config, stage, size)
            build_rows.append(row)
        else:
            db = raw
        del raw
        queries = pca.transform(raw_queries) if pca else raw_queries
        exact = None
        kept = {}
        for kind, build, search in searchers(db, config, dev, stage, size):
            stage(f"{size:,} descriptors: searching {kind}")
            stats, indices = search_stats(search, queries, config, dev)
            if exact is None:
                exact = indices  # flat (or torch without FAISS): exact inner-product search
            stats["recall1_vs_exact"] = round(float(np.mean(indices[:, 0] == exact[:, 0])), 4)
            stats["recall1_at10_vs_exact"] = round(float(np.mean(np.any(indices == exact[:, :1], axis=1))), 4)
            if kind.startswith("torch"):
                stats["full_matrix_mb"] = round(len(queries) * size * 4 / MB, 1)
            if build:
                build_rows.append({"size": size, "kind": kind, "dim": int(db.shape[1]), **build})
            search_rows.append({"size": size, "kind": kind, "queries": len(queries), **stats})
            if size == max(config.index_sizes):
                kept[kind] = search
        if size == max(config.index_sizes):
            largest = (pca, kept)
    return build_rows, search_rows, *largest


def query_latency_case(
    model: VPRModel, pca: PCA | None, searches: dict[str, Search], paths: list[Path], config: BenchConfig, size: int,
) -> dict:
    """Single-image query, end to end (load, forward, PCA, search), per index kind at the largest size."""
    dev = torch.device(config.device)
    fast = inference_model(model, dev)
    low = amp_dtype(dev) if dev.type == "cuda" else None
    count = min(len(paths), max(10, config.latency_queries // 4))
    out = {"database_size": size, "queries": count, "autocast": str(low).replace("torch.", "") if low else None, "kinds": {}}
    for kind, search in searches.items():
        stages: dict[str, list[float]] = {"load": [], "forward": [], "pca": [], "search": [], "total": []}
        for i in range(count + 1):
            t0 = time.perf_counter()
            image = preprocess(load_rgb(paths[i % len(paths)]), model.config.preprocess)
            t1 = time.perf_counter()
            descriptor = forward_batch(fast, image[None].to(dev), low).cpu().numpy()
            t2 = time.perf_counter()
            if pca is not None:
                descriptor = pca.transform(descriptor)
            t3 = time.perf_counter()
            search(descriptor, config.k)
            t4 = time.perf_counter()
            if i == 0:
                continue  # warm-up
            for name, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                stages[name].append(seconds)
        out["kinds"][kind] = {
            **{f"{name}_p50_ms": percentile_ms(values, 50) for name, values in stages.items()},
            "total_p95_ms": percentile_ms(stages["total"], 95),
        }
    return out
