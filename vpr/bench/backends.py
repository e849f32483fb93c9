"""The backends case (`vpr bench --backend all`): one model through torch fp32 / bf16, ONNX Runtime fp32 / int8 and
OpenVINO fp32 / bf16 / int8, forward only and from JPEG files, beside a plain ONNX Runtime session (the anchor:
`ort.InferenceSession(...).run` on a numpy batch); single-image latency; int8's agreement with fp32."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from vpr.bench import BACKEND_VARIANTS
from vpr.bench.config import BenchConfig, Stage
from vpr.bench.extraction import _time_forward, timed_extraction
from vpr.data.images import load_rgb, preprocess
from vpr.deploy.export import export_model
from vpr.deploy.graph import INPUT, example_size, onnx_bytes
from vpr.models.model import VPRModel
from vpr.retrieval.extract import Describer
from vpr.retrieval.options import ExtractOptions

VARIANTS = BACKEND_VARIANTS
LATENCY_RUNS = 20


def _options(name: str, files: dict[str, Path]) -> dict:
    """The extraction flags of a variant: its backend (an int8 file for the int8 ones) and amp for bf16."""
    engine, precision = name.rsplit("_", 1)
    backend = str(files[name]) if precision == "int8" else engine
    return {"backend": backend, "amp": precision == "bf16"}


def backends_case(model: VPRModel, photos: list[Path], calibration: list[Path], config: BenchConfig, workdir: Path,
                  stage: Stage, variants: tuple[str, ...] = VARIANTS) -> dict:
    """Images/s forward only and through the JPEG pipeline per variant, the anchor session, latency, int8 cosine."""
    rule = model.config.preprocess
    height, width = example_size(model) if model.config.resize != "fixed" else model.config.input_size
    batch = torch.randint(0, 256, (config.batch_size, 3, height, width), dtype=torch.uint8)
    files: dict[str, Path] = {}
    inputs = [preprocess(load_rgb(p), rule, str(p)) for p in calibration] if any(
        name.endswith("int8") for name in variants) else []
    for name in variants:
        if name.endswith("int8"):
            engine = name.split("_")[0]
            stage(f"exporting and calibrating {name}")
            out = workdir / f"{name}.{'onnx' if engine == 'onnxruntime' else 'xml'}"
            export_model(model, out, fmt="onnx" if engine == "onnxruntime" else "openvino", precision="int8",
                         calibration=lambda: inputs)
            files[name] = out
    forward, pipeline, latency, descriptors = {}, {}, {}, {}
    stage("forward only: plain ONNX Runtime session (anchor)")
    forward["plain_onnxruntime_fp32"] = round(_anchor_rate(model, batch, config), 2)
    for name in variants:
        options = _options(name, files)
        describer = Describer(model, ExtractOptions(batch_size=config.batch_size, device="cpu", **options))
        stage(f"forward only: {name}")
        forward[name] = round(_time_forward(lambda: describer.forward(batch), config.forward_batches, config.batch_size,
                                            torch.device("cpu")), 2)
        one = batch[:1]
        describer.forward(one)
        times = []
        for _ in range(LATENCY_RUNS):
            start = time.perf_counter()
            describer.forward(one)
            times.append(time.perf_counter() - start)
        latency[name] = round(float(np.median(times)) * 1000, 2)
        stage(f"full pipeline from JPEG ({name})")
        pipeline[name], descriptors[name] = timed_extraction(model, photos, config, None, **options)
    ratios = {name: round(p["steady_images_per_s"] / forward[name], 3) if p["steady_images_per_s"] else None
              for name, p in pipeline.items()}
    agreement = {}
    for name in variants:
        reference = "torch_fp32" if "torch_fp32" in descriptors else None
        if reference and name != reference:
            cosine = (descriptors[name] * descriptors[reference]).sum(axis=1)
            agreement[name] = {"mean_cosine_to_torch_fp32": round(float(cosine.mean()), 6),
                               "min_cosine_to_torch_fp32": round(float(cosine.min()), 6)}
    fastest = max((v for k, v in forward.items() if k != "plain_onnxruntime_fp32" and "fp32" in k), default=None)
    return {
        "images": len(photos), "batch_size": config.batch_size, "input_size": [int(height), int(width)],
        "forward_only_images_per_s": forward, "pipeline": pipeline, "pipeline_vs_forward": ratios,
        "single_image_latency_ms": latency, "agreement": agreement,
        "fastest_fp32_vs_plain_onnxruntime": round(fastest / forward["plain_onnxruntime_fp32"], 3) if fastest else None,
    }


def _anchor_rate(model: VPRModel, batch: torch.Tensor, config: BenchConfig) -> float:
    """Images/s of `ort.InferenceSession(graph).run` on a float32 numpy batch: what a user writes by hand."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes(model, size=tuple(batch.shape[2:])), providers=["CPUExecutionProvider"])
    images = batch.float().numpy()
    return _time_forward(lambda: session.run(None, {INPUT: images}), config.forward_batches, config.batch_size,
                         torch.device("cpu"))
