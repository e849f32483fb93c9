"""Nearest-neighbour search on L2-normalised descriptors: FAISS indexes, or torch when FAISS is absent.

Similarity is the inner product; the distance shown to users is the L2 distance between unit
vectors, sqrt(2 - 2 * similarity).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from vpr.errors import DependencyError, UsageError
from vpr.retrieval.options import INDEX_KINDS


def require_faiss():
    """Import FAISS or explain how to install it."""
    try:
        import faiss
    except ImportError as exc:
        raise DependencyError(
            "FAISS is not installed: run `pip install -e '.[cpu]'` (or '.[gpu]' on CUDA machines, never both)"
        ) from exc
    return faiss


def faiss_available() -> bool:
    """Whether the `faiss` module can be imported."""
    try:
        require_faiss()
    except DependencyError:
        return False
    return True


def pq_subquantizers(dim: int) -> int:
    """Largest divisor of `dim` giving sub-vectors of at least 4 dims, capped at 64 (memory/speed trade-off)."""
    for m in (64, 48, 32, 24, 16, 12, 8, 4, 2, 1):
        if dim % m == 0 and dim // m >= 4:
            return m
    return 1


TRAIN_POINTS_PER_CENTROID = 64  # k-means on samples: million-scale training in minutes, not hours
ADD_CHUNK = 65536  # rows added to a FAISS index (and written to database.h5) at a time


def ivf_lists(n: int) -> int:
    """IVF lists for `n` database vectors: 4 sqrt(n), and at least 39 vectors per list."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def training_rows(n: int, kind: str, seed: int = 0) -> np.ndarray:
    """Sorted rows an index of `kind` over `n` vectors trains on: every row up to 64 per IVF list, else a
    seeded random sample of that many (what FAISS's k-means would sample anyway), so training fits in RAM."""
    if kind != "ivfpq":
        return np.zeros(0, dtype=np.int64)
    size = max(ivf_lists(n), 256) * TRAIN_POINTS_PER_CENTROID  # 256: the PQ codebooks' centroids
    if n <= size:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def empty_faiss_index(n: int, dim: int, kind: str = "flat", sample: np.ndarray | None = None, seed: int = 0):
    """An untrained-then-trained, empty FAISS inner-product index of `kind` for `n` vectors; ivfpq trains
    on `sample` (the rows `training_rows` names)."""
    faiss = require_faiss()
    if kind not in INDEX_KINDS:
        raise UsageError(f"unknown index kind '{kind}'; choose one of {', '.join(INDEX_KINDS)}")
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 128
        return index
    if n < 256:
        raise UsageError(f"`kind=ivfpq` needs at least 256 database images (got {n}); use `kind=flat`")
    nlist = ivf_lists(n)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_subquantizers(dim), 8, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.cp.max_points_per_centroid = TRAIN_POINTS_PER_CENTROID
    index.pq.cp.max_points_per_centroid = TRAIN_POINTS_PER_CENTROID
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    index.nprobe = min(nlist, 16)
    return index


def build_faiss_index(descriptors, kind: str = "flat", seed: int = 0, chunk: int = ADD_CHUNK):
    """Build a FAISS inner-product index of `kind` over float32 descriptors (N x d: an array or a row
    reader): ivfpq trains on `training_rows`, then every kind adds the rows `chunk` at a time."""
    n, dim = descriptors.shape
    rows = training_rows(n, kind, seed)
    sample = descriptors[rows] if len(rows) else None
    index = empty_faiss_index(n, dim, kind, sample, seed)
    del sample
    for start in range(0, n, chunk):
        index.add(np.ascontiguousarray(descriptors[start:start + chunk], dtype=np.float32))
    return index


def faiss_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, indices), each N x k, best first."""
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def exact_search(database, queries: np.ndarray, k: int, chunk: int = 1 << 18) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k straight on the descriptors (FAISS's blocked BLAS search, or torch
    without FAISS): a flat index needs no second copy. A row reader is searched `chunk` rows at a time."""
    if not isinstance(database, (np.ndarray, torch.Tensor)):
        parts = [exact_search(np.asarray(database[s:s + chunk]), queries, k) for s in range(0, len(database), chunk)]
        return merge_topk([(sims, np.where(idx >= 0, idx + s, -1)) for (sims, idx), s
                           in zip(parts, range(0, len(database), chunk))], min(k, len(database)))
    if not faiss_available():
        return torch_search(database, queries, k)
    faiss = require_faiss()
    db = np.ascontiguousarray(database, dtype=np.float32)
    return faiss.knn(np.ascontiguousarray(queries, dtype=np.float32), db, k, metric=faiss.METRIC_INNER_PRODUCT)


def query_rows(descriptors: object, dim: int) -> np.ndarray:
    """Query descriptors as an N x dim float32 array of finite values, or a `UsageError`."""
    try:
        array = np.asarray(descriptors, dtype=np.float32)
    except (TypeError, ValueError):
        raise UsageError(f"descriptors: a {type(descriptors).__name__} is not an N x {dim} array of numbers") from None
    if array.ndim != 2 or array.shape[1] != dim:
        raise UsageError(f"descriptors of shape {array.shape}: the index takes N x {dim} (from describe)")
    if not np.isfinite(array).all():
        raise UsageError("descriptors hold NaN or infinite values; describe the images again")
    return array


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of the union of per-shard top-k results (similarities, global indices; -1 = none),
    best first: what one search over all shards returns."""
    sims = np.concatenate([p[0] for p in parts], axis=1).astype(np.float32)
    idx = np.concatenate([p[1] for p in parts], axis=1).astype(np.int64)
    sims = np.where(idx >= 0, sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(idx, order, axis=1)


def shortlist(k: int, n: int) -> int:
    """IVF-PQ candidates re-ranked exactly for a top-k query: 30 per match, at least 300 (PQ's
    compressed distances misorder close neighbours; 300 restores the exact top-5 on the benchmark)."""
    return min(n, max(300, 30 * k))


def index_search(index, kind: str, database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k from a FAISS index of `kind` over `database`: IVF-PQ's shortlist is re-ranked exactly on
    `database`; flat and HNSW (which store the full vectors) answer directly."""
    if kind != "ivfpq":
        return faiss_search(index, queries, k)
    _, candidates = faiss_search(index, queries, shortlist(k, len(database)))
    return refine(database, queries, candidates, k)


def search_by_kind(
    kind: str, descriptors: np.ndarray, faiss_index, queries: np.ndarray, k: int, *, device: str = "cpu",
    resident: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (similarities, indices) of an index of `kind` over `descriptors`, the way `vpr query` and
    `vpr eval` search (`IndexBundle.search`) and `vpr bench` measures.

    flat: exact search on the descriptors. ivfpq: a shortlist from the compressed `faiss_index`,
    re-ranked with exact inner products. hnsw: the graph search. On CUDA: faiss-gpu clones when
    installed (not hnsw), else exact fp16 torch search with the database kept on the device.
    `resident` (device -> database tensor or GPU index) keeps those device copies between calls.
    """
    resident = {} if resident is None else resident
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu and (kind == "hnsw" or faiss_gpu_count() == 0):
        if device not in resident:  # copy the database to the device(s) once, not per query
            resident[device] = shard_database(descriptors, search_devices(device), half=True)
        return sharded_search(resident[device], queries, k, half=True)
    if kind == "flat" and not on_gpu:
        return exact_search(descriptors, queries, k)
    if on_gpu:
        if device not in resident:
            cpu_index = faiss_index if kind != "flat" else build_faiss_index(descriptors, "flat")
            resident[device] = index_to_device(cpu_index, device)
        return index_search(resident[device], kind, descriptors, queries, k)
    if faiss_index is None:
        raise DependencyError(f"a '{kind}' index needs FAISS: pip install -e '.[cpu]'")
    return index_search(faiss_index, kind, descriptors, queries, k)


def refine(
    database, queries: np.ndarray, candidates: np.ndarray, k: int, query_chunk: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact refinement of an approximate shortlist: each query's candidate rows (-1 marks none) scored by exact inner
    products, top-k (similarities, indices).
    `database` is an array or a row reader (`rows.RowReader`), from which only the candidates' rows are read.

    Turns an approximate shortlist (IVF-PQ's compressed distances) into exact scores and order; at
    most 16 MB of gathered candidate vectors exist at once unless `query_chunk` says otherwise.
    """
    queries = np.asarray(queries, dtype=np.float32)
    query_chunk = query_chunk or max(1, (4 << 20) // max(1, candidates.shape[1] * database.shape[1]))
    k = min(k, candidates.shape[1])
    sims_out = np.full((len(queries), k), -np.inf, dtype=np.float32)
    idx_out = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(queries), query_chunk):
        cand = candidates[start:start + query_chunk]
        valid = cand >= 0
        vectors = database[np.where(valid, cand, 0)]  # chunk x candidates x d
        sims = np.einsum("qd,qcd->qc", queries[start:start + query_chunk], vectors)
        sims[~valid] = -np.inf
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        sims_out[start:start + len(cand)] = np.take_along_axis(sims, order, axis=1)
        idx_out[start:start + len(cand)] = np.where(
            np.isfinite(sims_out[start:start + len(cand)]), np.take_along_axis(cand, order, axis=1), -1)
    return sims_out, idx_out


def write_faiss_index(index, path: Path) -> None:
    require_faiss().write_index(index, str(path))


def read_faiss_index(handle: BinaryIO) -> tuple[object, str]:
    """A FAISS index read from an open file, and the sha256 of the bytes it was read from (one pass)."""
    faiss = require_faiss()
    digest = hashlib.sha256()

    def read(size: int) -> bytes:
        chunk = handle.read(size)
        digest.update(chunk)
        return chunk

    with handle:
        index = faiss.read_index(faiss.PyCallbackIOReader(read))
        while rest := handle.read(1 << 20):  # bytes FAISS did not need still count for the digest
            digest.update(rest)
    return index, digest.hexdigest()


def search_database(descriptors: np.ndarray | torch.Tensor, device: str = "cpu", half: bool = False) -> torch.Tensor:
    """The database as a tensor resident on `device` (fp16 when `half`), to reuse across `torch_search` calls."""
    dtype = torch.float16 if half else torch.float32
    return torch.as_tensor(descriptors).to(torch.device(device), dtype)


def search_devices(device: str) -> list[str]:
    """Devices a search on `device` spreads over: every visible GPU for a bare "cuda", else `device` alone."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.device_count() > 1:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [device]


def shard_database(descriptors, devices: list[str], half: bool = False,
                   chunk: int = 1 << 18) -> list[tuple[int, torch.Tensor]]:
    """The database split into contiguous row ranges, one per device: (first row, tensor resident there).
    A row reader is copied `chunk` rows at a time, so host memory never holds the whole database."""
    n = len(descriptors)
    bounds = np.linspace(0, n, len(devices) + 1).astype(np.int64)
    shards = []
    for device, start, stop in zip(devices, bounds[:-1], bounds[1:]):
        blocks = [search_database(np.asarray(descriptors[s:min(s + chunk, stop)]), device, half)
                  for s in range(int(start), int(stop), chunk)]
        dim = descriptors.shape[1]
        empty = torch.zeros((0, dim), dtype=torch.float16 if half else torch.float32, device=torch.device(device))
        shards.append((int(start), torch.cat(blocks) if blocks else empty))
    return shards


def sharded_search(shards: list[tuple[int, torch.Tensor]], queries: np.ndarray, k: int,
                   half: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over database shards (from `shard_database`), each searched on its own device, merged
    exactly; one shard is a plain `torch_search`."""
    k = min(k, sum(len(t) for _, t in shards))
    parts = []
    for start, tensor in shards:
        if len(tensor):
            sims, idx = torch_search(tensor, queries, k, device=str(tensor.device), half=half)
            parts.append((sims, idx + start))
    return merge_topk(parts, k)


def torch_search(
    database: np.ndarray | torch.Tensor, queries: np.ndarray, k: int, *, device: str = "cpu",
    chunk: int = 65536, half: bool = False, query_chunk: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k with chunked matmuls: no full similarity matrix in memory.

    At most `query_chunk` x `chunk` similarities (64 MB by default) exist at once, whatever the database size. Used on
    GPU machines without faiss-gpu (`half` computes in fp16 there; pass `search_database` output to
    keep the database on the GPU between calls) and as the CPU fallback without FAISS.
    """
    dev = torch.device(device)
    dtype = torch.float16 if half else torch.float32
    db = torch.as_tensor(database)
    all_queries = torch.as_tensor(np.asarray(queries, dtype=np.float32))
    k = min(k, db.shape[0])
    sims, idxs = [torch.zeros((0, k))], [torch.zeros((0, k), dtype=torch.int64)]
    for q_start in range(0, all_queries.shape[0], query_chunk):
        q = all_queries[q_start:q_start + query_chunk].to(dev, dtype, non_blocking=True)
        best_sim = torch.full((q.shape[0], k), -math.inf, device=dev)
        best_idx = torch.zeros((q.shape[0], k), dtype=torch.int64, device=dev)
        for start in range(0, db.shape[0], chunk):
            block = db[start:start + chunk].to(dev, dtype, non_blocking=True)
            sim = (q @ block.T).float()
            top_sim, top_idx = sim.topk(min(k, sim.shape[1]), dim=1)
            merged_sim = torch.cat([best_sim, top_sim], dim=1)
            merged_idx = torch.cat([best_idx, top_idx + start], dim=1)
            best_sim, order = merged_sim.topk(k, dim=1)
            best_idx = merged_idx.gather(1, order)
        sims.append(best_sim.cpu())
        idxs.append(best_idx.cpu())
    return torch.cat(sims).numpy(), torch.cat(idxs).numpy()


def faiss_gpu_count() -> int:
    """GPUs that FAISS can use: 0 without faiss-gpu (or without FAISS)."""
    if not faiss_available():
        return 0
    faiss = require_faiss()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def index_to_device(index, device: str = "cpu"):
    """`index` cloned to the GPU when `device` is CUDA and faiss-gpu sees one (sharded over all GPUs for a
    bare "cuda" when there are several); else `index` itself.

    HNSW has no GPU version and stays on the CPU; flat and IVF-PQ use fp16 on the GPU.
    """
    dev = torch.device(device)
    if dev.type != "cuda" or faiss_gpu_count() == 0:
        return index
    faiss = require_faiss()
    if isinstance(index, faiss.IndexHNSW):
        return index
    if dev.index is None and faiss_gpu_count() > 1:  # bare "cuda": shard the index over every GPU
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True
        options.useFloat16 = True
        return faiss.index_cpu_to_all_gpus(index, options)
    resources = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = True
    gpu_index = faiss.index_cpu_to_gpu(resources, dev.index or 0, index, options)
    gpu_index.referenced_objects = [resources]  # the GPU memory must live as long as the index
    return gpu_index
