"""The extraction case: forward pass alone, the full pipeline from JPEG files, and the plain reference loop."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vpr.bench.config import BenchConfig, Stage, extract_options
from vpr.bench.measure import BatchClock, cpu_time, measure_memory, sync
from vpr.bench.reference import reference_extract, topk_agreement
from vpr.models.inference import amp_dtype, compiled, forward_batch, inference_model
from vpr.models.model import VPRModel
from vpr.retrieval.extract import extract_descriptors


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
        result = extract_descriptors(model, paths, extract_options(config, **options), cache=cache, progress=clock)
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
