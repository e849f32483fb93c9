"""`vpr export-model`: an index's or checkpoint's model as one ONNX or OpenVINO graph, its preprocessing in the file."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import JSON, console, print_json, warn_random_init
from vpr import api


def export_model_cmd(
    source: Path = typer.Argument(..., help="An index directory (its model, and with --pca its PCA) or a checkpoint file (vpr's or a published one)."),
    out: Path = typer.Option(..., "--out", "-o", help="The file to write: MODEL.onnx, or MODEL.xml for OpenVINO (with MODEL.bin beside it); replaced only if vpr wrote it."),
    fmt: str = typer.Option("onnx", "--format", help="onnx, openvino or tensorrt (TensorRT needs an NVIDIA GPU with TensorRT)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, fp16, bf16 (OpenVINO: fp32 weights run in bf16) or int8 (static quantisation calibrated on --calibration or the index's database)."),
    pca: bool = typer.Option(False, "--pca", help="Include the PCA that turns the model's descriptors into the index's (and a checkpoint's own PCA)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="With --precision int8: a folder or manifest of images to calibrate on (default: up to 64 of the index's database images)."),
    checkpoint_format: Optional[str] = typer.Option(None, "--checkpoint-format", help="For a checkpoint file: its layout, as `vpr build-index --format` takes it (default: detected)."),
    json_out: bool = JSON,
) -> None:
    """Export a model to ONNX or OpenVINO: backbone, aggregator, L2 (and the index's PCA with --pca) as one graph
    taking 0..255 RGB pixels, with its preprocessing and descriptor size in the file's metadata."""
    report = api.export_model(source, out, fmt=fmt, precision=precision, pca=pca, calibration=calibration,
                              checkpoint_format=checkpoint_format)
    warn_random_init(report["random_init"], f"the model of {source}")
    if json_out:
        print_json(report)
        return
    meta = report["metadata"]
    size = meta["vpr.preprocessing"]
    console.print(f"wrote {', '.join(report['files'])} ({report['format']} {report['precision']}, "
                  f"{report['bytes'] / 1e6:.1f} MB, {meta['vpr.descriptor_dim']}-d) in {report['seconds']:.1f}s")
    console.print(f"input: {size}", soft_wrap=True, highlight=False)
    agreement = report["int8_cosine_to_fp32"]
    if agreement is not None:
        console.print(f"int8 vs fp32 on {agreement['images']} calibration images: cosine mean {agreement['mean']:.5f}, "
                      f"least {agreement['min']:.5f}; measure its recall with `vpr eval QUERIES --backend {report['out']}`")
