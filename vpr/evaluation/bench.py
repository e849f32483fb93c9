"""`vpr bench`: extraction, index and search speed measured side by side with a plain reference.

Every case returns plain numbers (a JSON-ready dict); nothing here prints. Cases:
- extraction: model forward alone on synthetic tensors, the full pipeline from JPEG files
  (`extract_descriptors`: decode, resize, normalise, forward, HDF5 cache) and a plain fp32
  research-code loop on the same files, with their ratios and agreement;
- index: PCA fit and FAISS build time and memory on real descriptors of the synthetic city,
  replicated and perturbed up to each size;
- search: latency (p50/p95 ms per single query), throughput (queries/s in one batch) and
  recall@1 relative to exact search, per index kind;
- query: single-image end-to-end latency (load, forward, PCA, search) and its breakdown;
- build-index memory at two database sizes, to show it grows only by the descriptors;
- peak RSS and, on GPU, peak device memory.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import platform
import queue
import re
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vpr import __version__
from vpr.data.datasets import SPLITS, GeoImageSet, list_images
from vpr.data.images import image_to_tensor, load_rgb
from vpr.errors import UsageError
from vpr.models.checkpoints import load_checkpoint
from vpr.models.model import ModelConfig, VPRModel, build_model
from vpr.models.pca import PCA, fit_pca
from vpr.models.inference import amp_dtype
from vpr.retrieval.extract import compiled, extract_descriptors, forward_batch, inference_model
from vpr.retrieval.index import (
    INDEX_KINDS, build_faiss_index, exact_search, faiss_available, faiss_gpu_count, faiss_search, index_search,
    index_to_device, search_database, torch_search, write_faiss_index,
)
from vpr.retrieval.pipeline import build_index

Stage = Callable[[str], None]
MB = 1e6
BENCH_TAG = "vpr bench"


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
    for flag, value, low in (("--images", config.extract_images, 2), ("--batch-size", config.batch_size, 1),
                             ("--workers", config.workers, 0), ("--threads", config.threads or 1, 1),
                             ("--sizes", min(config.index_sizes, default=0), 100)):
        if value < low:
            raise UsageError(f"{flag} {value}: must be at least {low}")
    return config


# --- measuring -----------------------------------------------------------------------------------


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
    after, peak = rss_bytes(), _proc_status("VmHWM")
    if before is not None and after is not None:
        memory.held_mb = round((after - before) / MB, 1)
        if resettable and peak is not None:
            memory.peak_mb = round(max(peak - before, 0) / MB, 1)
    if cuda:
        torch.cuda.synchronize(device)
        memory.gpu_peak_mb = round((torch.cuda.max_memory_allocated(device) - gpu_before) / MB, 1)


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


# --- the plain reference -------------------------------------------------------------------------


def reference_extract(
    model: VPRModel, paths: list[Path], *, batch_size: int = 32, device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Descriptors the way research code computes them: PIL open, torchvision transforms per image,
    fp32 forward under `no_grad`, collect numpy; one process, no other tricks."""
    import torchvision.transforms as T

    transform = T.Compose([T.Resize(model.config.input_size), T.ToTensor(), T.Normalize(model.config.mean, model.config.std)])
    model = copy.deepcopy(model).to(device).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[start:start + batch_size]])
            descriptors = model(batch.to(device))
            out.append(torch.nn.functional.normalize(descriptors, dim=1).cpu().numpy())
            if progress:
                progress(start + len(batch), len(paths))
    return np.concatenate(out) if out else np.zeros((0, model.config.descriptor_dim), dtype=np.float32)


def topk_agreement(reference: np.ndarray, candidate: np.ndarray, k: int = 5) -> dict[str, float]:
    """Search the first half of the rows with the second half, with `reference` and with `candidate`
    descriptors: the fraction of queries with the same top-k (indices, in order) and the largest
    difference between their top-k similarities (small when only near-ties swap)."""
    half = len(reference) // 2
    k = min(k, half)
    if half == 0 or k == 0:
        return {"identical": 1.0, "similarity_max_diff": 0.0}
    sim_a, a = torch_search(reference[:half], reference[half:], k)
    sim_b, b = torch_search(candidate[:half], candidate[half:], k)
    return {"identical": float(np.mean(np.all(a == b, axis=1))), "similarity_max_diff": float(np.abs(sim_a - sim_b).max())}


# --- data ----------------------------------------------------------------------------------------


def city_images(config: BenchConfig, workdir: Path, stage: Stage) -> tuple[list[Path], list[Path], dict]:
    """(database paths, query paths, description) of the synthetic city, rendered into `workdir` if needed."""
    root = config.data
    info: dict = {}
    if root is None:
        from vpr.data.synth import generate_city

        stage(f"rendering the '{config.preset}' synthetic city")
        root = workdir / "city"
        info = generate_city(root, preset=config.preset, seed=config.seed)
    database, queries = [], []
    for split in SPLITS:
        base = Path(root) / "images" / split
        if (base / "database").is_dir():
            database += list_images(base / "database")
        if (base / "queries").is_dir():
            queries += list_images(base / "queries")
    if not database or not queries:
        raise UsageError(f"{root}: no ROOT/images/SPLIT/{{database,queries}} images; pass a `vpr synth` folder to --data")
    return database, queries, {"root": str(root), "database": len(database), "queries": len(queries),
                               "preset": info.get("preset"), "image_size": _image_size(database[0])}


def _image_size(path: Path) -> list[int]:
    with Image.open(path) as img:
        return [img.height, img.width]


def photo_copies(sources: list[Path], count: int, size: tuple[int, int] | None, out_dir: Path) -> list[Path]:
    """`count` JPEGs cycling over `sources`, upscaled to `size` (height, width) as a camera delivers them."""
    if size is None:
        return [sources[i % len(sources)] for i in range(count)]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = out_dir / f"{i:06d}.jpg"
        if not path.exists():
            with Image.open(sources[i % len(sources)]) as img:
                img.convert("RGB").resize((size[1], size[0]), Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def replicate(base: np.ndarray, count: int, rng: np.random.Generator, noise: float = 0.1) -> np.ndarray:
    """`count` unit descriptors near the real ones: a random real descriptor moved part of the way
    towards another, plus Gaussian noise of `noise` times the real descriptors' spread around their
    mean, so larger databases keep the structure of real data."""
    dim = base.shape[1]
    spread = float(np.sqrt(np.mean(np.sum((base - base.mean(axis=0)) ** 2, axis=1))))
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, 65536):
        n = min(65536, count - start)
        a, b = base[rng.integers(0, len(base), n)], base[rng.integers(0, len(base), n)]
        t = rng.uniform(0.0, 0.5, (n, 1)).astype(np.float32)
        x = a + t * (b - a) + rng.normal(0.0, noise * spread / np.sqrt(dim), (n, dim)).astype(np.float32)
        out[start:start + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


# --- cases ---------------------------------------------------------------------------------------


def _time_forward(run: Callable[[], object], batches: int, batch_size: int, device: torch.device) -> float:
    """Images/s of `run` (one batch) after warm-up calls (more on CUDA: cuDNN autotuning, compilation):
    the median over batches on the CPU, like the pipelines' steady rate; on CUDA the mean over all
    batches, since a sync per batch would stall the GPU's queue."""
    for _ in range(3 if device.type == "cuda" else 1):
        run()
    sync(device)
    if device.type == "cuda":
        start = time.perf_counter()
        for _ in range(batches):
            run()
        sync(device)
        return batches * batch_size / (time.perf_counter() - start)
    rates = []
    for _ in range(batches):
        start = time.perf_counter()
        run()
        rates.append(batch_size / (time.perf_counter() - start))
    return float(np.median(rates))


def forward_runs(model: VPRModel, config: BenchConfig, dev: torch.device) -> dict[str, Callable[[], object]]:
    """One forward pass of a batch of synthetic tensors, per variant: plain fp32 (NCHW, BN unfolded),
    our inference copy in fp32 and under autocast, and (with `config.compile`) that copy compiled."""
    h, w = config.model.input_size
    uint8 = torch.randint(0, 256, (config.batch_size, 3, h, w), dtype=torch.uint8, device=dev)
    plain = copy.deepcopy(model).to(dev).eval()
    normalised = (uint8.float() / 255.0 - torch.tensor(model.config.mean, device=dev).view(1, 3, 1, 1)) / torch.tensor(
        model.config.std, device=dev).view(1, 3, 1, 1)
    fast = inference_model(model, dev)
    low = amp_dtype(dev)

    def plain_run() -> None:
        with torch.no_grad():
            plain(normalised)

    runs = {"plain_fp32": plain_run, "fast_fp32": lambda: forward_batch(fast, uint8),
            "fast_amp": lambda: forward_batch(fast, uint8, low)}
    if config.compile:
        compiled_model = compiled(fast, dev)
        runs["compiled_amp"] = lambda: forward_batch(compiled_model, uint8, low)
    return runs


def timed_extraction(model: VPRModel, paths: list[Path], config: BenchConfig, cache: Path | None, **options) -> tuple[dict, np.ndarray]:
    """Run `extract_descriptors` (writing its HDF5 cache) and time it: wall and steady-state images/s."""
    clock = BatchClock()
    dev = torch.device(config.device)
    with measure_memory(dev) as memory, cpu_time() as cpu:
        start = time.perf_counter()
        result = extract_descriptors(model, paths, batch_size=config.batch_size, num_workers=config.workers,
                                     device=config.device, cache=cache, progress=clock, **options)
        seconds = time.perf_counter() - start
    steady = clock.steady_rate()
    return {
        "images_per_s": round(len(paths) / seconds, 2), "steady_images_per_s": round(steady, 2) if steady else None,
        "seconds": round(seconds, 2), "rss_peak_mb": memory.peak_mb, "gpu_peak_mb": memory.gpu_peak_mb,
        **{f"{k}_cpu_ms_per_image": round(v * 1000 / len(paths), 2) for k, v in cpu.items()},
    }, result.descriptors


def extraction_case(model: VPRModel, paths: list[Path], config: BenchConfig, workdir: Path, stage: Stage) -> dict:
    """Forward-only vs full pipeline vs the plain reference loop, and how closely their descriptors agree."""
    dev = torch.device(config.device)
    runs = forward_runs(model, config, dev)
    forward: dict[str, float] = {}

    def measure_forward(name: str) -> None:
        stage(f"forward only: {name}" + (" (compiling first)" if name.startswith("compiled") else ""))
        forward[name] = round(_time_forward(runs[name], config.forward_batches, config.batch_size, dev), 2)

    measure_forward("plain_fp32")
    pipeline: dict[str, dict] = {}
    variants = {"fp32": {}, "amp": {"amp": True}}
    if config.compile:
        variants["amp_compiled"] = {"amp": True, "compile": True}
    if dev.type == "cuda":
        variants["amp_gpu_decode"] = {"amp": True, "decode_on_device": True, "compile": config.compile}

    def forward_key(options: dict) -> str:
        """The forward-only case a pipeline variant is compared with (same precision, same compilation)."""
        return "compiled_amp" if options.get("compile") else "fast_amp" if options.get("amp") else "fast_fp32"

    descriptors = {}
    for name, options in variants.items():
        if forward_key(options) not in forward:  # measured right before its pipeline, so both see the same load
            measure_forward(forward_key(options))
        stage(f"full pipeline from JPEG ({name})" + (" (compiling first)" if options.get("compile") else ""))
        pipeline[name], descriptors[name] = timed_extraction(model, paths, config, workdir / f"cache-{name}", **options)
    stage("plain reference loop (PIL + torchvision transforms per image, fp32)")
    clock = BatchClock()
    with cpu_time() as ref_cpu:
        start = time.perf_counter()
        reference = reference_extract(model, paths, batch_size=config.batch_size, device=config.device, progress=clock)
        ref_seconds = time.perf_counter() - start
    ref_rate = len(paths) / ref_seconds
    ref_steady = clock.steady_rate() or ref_rate
    agreement = {
        name: {"max_abs_diff": float(np.abs(desc - reference).max()),
               **{f"top5_{key}": value for key, value in topk_agreement(reference, desc, 5).items()}}
        for name, desc in descriptors.items()
    }
    return {
        "images": len(paths), "batch_size": config.batch_size, "workers": config.workers,
        "amp_dtype": str(amp_dtype(dev)).replace("torch.", ""),
        "forward_only_images_per_s": forward,
        "pipeline": pipeline,
        "reference": {"images_per_s": round(ref_rate, 2), "seconds": round(ref_seconds, 2),
                      "steady_images_per_s": round(ref_steady, 2),
                      "main_cpu_ms_per_image": round(ref_cpu["main"] * 1000 / len(paths), 2)},
        "pipeline_vs_forward": {  # steady state, against the forward pass at the same precision
            name: round(p["steady_images_per_s"] / forward[forward_key(variants[name])], 3)
            if p["steady_images_per_s"] else None
            for name, p in pipeline.items()
        },
        "speedup_vs_reference": {name: round(p["images_per_s"] / ref_rate, 2) for name, p in pipeline.items()},
        "steady_speedup_vs_reference": {
            name: round(p["steady_images_per_s"] / ref_steady, 2) for name, p in pipeline.items() if p["steady_images_per_s"]
        },
        "agreement_with_reference": agreement,
    }


def faiss_bytes(index) -> int:
    """Size of a FAISS index as written to disk, which is what it holds in memory."""
    with tempfile.TemporaryDirectory(prefix="vpr-bench-index-") as tmp:
        write_faiss_index(index, Path(tmp) / "index.faiss")
        return (Path(tmp) / "index.faiss").stat().st_size


def _searchers(db: np.ndarray, config: BenchConfig, dev: torch.device, stage: Stage, size: int) -> Iterator[tuple[str, dict, Callable]]:
    """Build each index kind over `db`, yielding (kind, build figures, search function) as `vpr query`
    searches: flat straight on the descriptors, IVF-PQ re-ranked exactly (and, for comparison, without)."""
    kinds = list(INDEX_KINDS) if faiss_available() else []
    for kind in kinds:
        if kind == "ivfpq" and len(db) < 256 * 39:
            continue
        if kind == "flat":
            yield kind, {"build_s": 0.0, "index_mb": 0.0}, (lambda q, k: exact_search(db, q, k))
            continue
        stage(f"{size:,} descriptors: building {kind}")
        with measure_memory() as memory:
            start = time.perf_counter()
            index = build_faiss_index(db, kind, seed=config.seed)
            seconds = time.perf_counter() - start
        build = {"build_s": round(seconds, 3), "index_mb": round(faiss_bytes(index) / MB, 1), "peak_mb": memory.peak_mb}
        yield kind, build, (lambda q, k, index=index, kind=kind: index_search(index, kind, db, q, k))
        if kind == "ivfpq":
            yield "ivfpq-no-rerank", {}, (lambda q, k, index=index: faiss_search(index, q, k))
        if dev.type == "cuda" and faiss_gpu_count() > 0 and kind != "hnsw":
            gpu_index = index_to_device(index, config.device)
            yield f"{kind}-gpu", {}, (lambda q, k, index=gpu_index, kind=kind: index_search(index, kind, db, q, k))
        del index
    if dev.type == "cuda" and faiss_gpu_count() > 0:
        gpu_flat = index_to_device(build_faiss_index(db, "flat"), config.device)
        yield "flat-gpu", {}, (lambda q, k: faiss_search(gpu_flat, q, k))
    half = dev.type == "cuda"
    with measure_memory(dev) as memory:
        start = time.perf_counter()
        resident = search_database(db, config.device, half=half)
        seconds = time.perf_counter() - start
    build = {"build_s": round(seconds, 3), "index_mb": round(resident.numel() * resident.element_size() / MB, 1),
             "gpu_peak_mb": memory.gpu_peak_mb}
    yield ("torch-fp16" if half else "torch"), build, (
        lambda q, k: torch_search(resident, q, k, device=config.device, half=half))


def search_stats(search: Callable, queries: np.ndarray, config: BenchConfig, dev: torch.device) -> tuple[dict, np.ndarray]:
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


def index_and_search_case(
    base_db: np.ndarray, base_q: np.ndarray, config: BenchConfig, stage: Stage,
) -> tuple[list[dict], list[dict], PCA | None, dict[str, Callable]]:
    """Build rows and search rows for each database size, and the largest size's PCA and search functions."""
    dev = torch.device(config.device)
    rng = np.random.default_rng(config.seed)
    raw_queries = replicate(base_q, config.num_queries, rng)
    build_rows, search_rows = [], []
    largest: tuple[PCA | None, dict[str, Callable]] = (None, {})
    for size in config.index_sizes:
        stage(f"{size:,} descriptors: replicating real ones")
        raw = replicate(base_db, size, rng)
        pca = None
        row: dict = {"size": size, "kind": "pca"}
        if config.pca_dim:
            stage(f"{size:,} descriptors: PCA fit to {min(config.pca_dim, *raw.shape)}-d")
            with measure_memory() as memory:
                start = time.perf_counter()
                pca = fit_pca(raw, min(config.pca_dim, *raw.shape), seed=config.seed)
                fit_s = time.perf_counter() - start
                start = time.perf_counter()
                db = pca.transform(raw)
                transform_s = time.perf_counter() - start
            row.update(fit_s=round(fit_s, 3), transform_s=round(transform_s, 3), peak_mb=memory.peak_mb)
            build_rows.append(row)
        else:
            db = raw
        del raw
        queries = pca.transform(raw_queries) if pca else raw_queries
        exact = None
        searchers = {}
        for kind, build, search in _searchers(db, config, dev, stage, size):
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
                searchers[kind] = search
        if size == max(config.index_sizes):
            largest = (pca, searchers)
    return build_rows, search_rows, *largest


def query_latency_case(
    model: VPRModel, pca: PCA | None, searchers: dict, paths: list[Path], config: BenchConfig, size: int,
) -> dict:
    """Single-image query, end to end (load, forward, PCA, search), per index kind at the largest size."""
    dev = torch.device(config.device)
    fast = inference_model(model, dev)
    low = amp_dtype(dev) if dev.type == "cuda" else None
    count = min(len(paths), max(10, config.latency_queries // 4))
    out = {"database_size": size, "queries": count, "autocast": str(low).replace("torch.", "") if low else None, "kinds": {}}
    for kind, search in searchers.items():
        stages: dict[str, list[float]] = {"load": [], "forward": [], "pca": [], "search": [], "total": []}
        for i in range(count + 1):
            t0 = time.perf_counter()
            image = image_to_tensor(load_rgb(paths[i % len(paths)]), model.config.input_size)
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


def _measure_build(config: ModelConfig, seed: int, paths: list[Path], workdir: Path, options: dict, results) -> None:
    """Child process of `build_memory_case`: run `build_index` and report its peak RSS above the start."""
    try:
        model = build_model(config, seed=seed)
        images = GeoImageSet(paths=paths, utm=np.zeros((len(paths), 2)), heading=np.zeros(len(paths)), source=workdir)
        with measure_memory() as memory:
            start = time.perf_counter()
            out = workdir.with_name(workdir.name + "-index")  # beside the image folder: an output never lies inside its input
            build_index(images, out, model=model, cache=out.with_name(out.name + ".cache"), **options)
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
        stage(f"build-index memory: {count:,} images (fresh process)")
        options = {"pca_dim": min(config.pca_dim or 0, count) or None, "batch_size": config.batch_size,
                   "num_workers": config.workers, "device": config.device}
        results = context.Queue()
        child = context.Process(target=_measure_build, args=(small, config.seed, paths, folder, options, results))
        child.start()
        row = _child_result(child, results)
        rows.append({"images": count, **row, "descriptors_mb": round(count * small.descriptor_dim * 4 / MB, 1)})
    growth = None
    if len(rows) == 2 and rows[0].get("peak_mb") is not None and rows[1].get("peak_mb") is not None:
        growth = round((rows[1]["peak_mb"] - rows[0]["peak_mb"]) * MB / (rows[1]["images"] - rows[0]["images"]), 1)
    return {"rows": rows, "peak_bytes_per_extra_image": growth, "descriptor_bytes_per_image": small.descriptor_dim * 4}


# --- the whole benchmark -------------------------------------------------------------------------


def machine_info(device: str) -> dict:
    """The machine, library versions and thread settings the figures were measured with."""
    cpu = platform.processor()
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = match.group(1) if match else cpu
    except OSError:
        pass
    info = {
        "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1) if hasattr(os, "sysconf") else None,
        "torch_threads": torch.get_num_threads(), "cpu_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "device": device, "gpu": None, "faiss_gpus": faiss_gpu_count(),
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = {"name": props.name, "memory_gb": round(props.total_memory / 1e9, 1),
                       "capability": f"{props.major}.{props.minor}", "cudnn": torch.backends.cudnn.version()}
    return info


def versions() -> dict:
    """Versions of vpr and the libraries whose speed is measured."""
    import h5py
    import sklearn
    import torchvision
    import PIL

    out = {"vpr": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
           "torchvision": torchvision.__version__, "numpy": np.__version__, "pillow": PIL.__version__,
           "h5py": h5py.__version__, "scikit-learn": sklearn.__version__, "faiss": None}
    if faiss_available():
        import faiss

        out["faiss"] = faiss.__version__
    return out


def is_bench_results(path: Path) -> bool:
    """Whether `path` is a results file `vpr bench` wrote (so a rerun may replace it)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and (data.get("written_by") == BENCH_TAG or {"machine", "versions", "settings"} <= set(data))


def run_bench(config: BenchConfig, stage: Stage | None = None) -> dict:
    """Run every case and return the results (settings, machine, versions and figures) as a dict."""
    stage = stage or (lambda message: None)
    dev = torch.device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
        if faiss_available():
            import faiss

            faiss.omp_set_num_threads(config.threads)
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
        stage(f"writing {config.extract_images} photo-size JPEGs")
        photos = photo_copies(database + queries, config.extract_images, config.jpeg_size, workdir / "photos")
        results["extraction"] = extraction_case(model, photos, config, workdir, stage)
        stage(f"descriptors of the city ({len(database) + len(queries)} images)")
        amp = dev.type == "cuda" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        base_db = extract_descriptors(model, database, batch_size=config.batch_size, num_workers=config.workers,
                                      device=config.device, amp=amp).descriptors
        base_q = extract_descriptors(model, queries, batch_size=config.batch_size, num_workers=config.workers,
                                     device=config.device, amp=amp).descriptors
        build_rows, search_rows, pca, searchers = index_and_search_case(base_db, base_q, config, stage)
        results["index"], results["search"] = build_rows, search_rows
        stage("single-image query latency")
        results["query_latency"] = query_latency_case(model, pca, searchers, photos, config, max(config.index_sizes))
        del searchers
        results["build_index_memory"] = build_memory_case(model, database + queries, config, workdir, stage)
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # Linux reports kB
    results["memory"] = {"peak_rss_mb": round(usage, 1),
                         "gpu_peak_mb": round(torch.cuda.max_memory_allocated(dev) / MB, 1) if dev.type == "cuda" else None}
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results
