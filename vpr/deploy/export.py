"""`export_model`: a model (and the index's PCA) as an ONNX or OpenVINO file in fp32, fp16, bf16 or int8, with its
preprocessing in the metadata; int8 is static quantisation calibrated on images of the model's own inputs."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from vpr.deploy import FORMATS, PRECISIONS
from vpr.deploy.graph import INPUT, dynamic_size, example_size, metadata, onnx_bytes
from vpr.errors import UsageError
from vpr.fileio import check_replaceable_file, is_tagged_file, tagged_file
from vpr.models.checkpoints import model_fingerprint
from vpr.models.model import VPRModel
from vpr.models.pca import PCA

TAG = "vpr-graph"
CALIBRATION_IMAGES = 64


def check_export(fmt: str, precision: str, out: Path) -> None:
    """Refuse a format, precision or output the export cannot write, before any work."""
    if fmt not in FORMATS:
        raise UsageError(f"`fmt` {fmt!r}: use one of {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise UsageError(f"`precision` {precision!r}: use one of {', '.join(PRECISIONS)}")
    if fmt == "tensorrt":
        reason = "this machine has no NVIDIA GPU" if not torch.cuda.is_available() else "the tensorrt package is not installed"
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise UsageError(f"`fmt` tensorrt builds a TensorRT engine on its GPU and {reason}; export onnx and build "
                             "the engine on the target with TensorRT's trtexec") from None
    if fmt == "onnx" and precision == "bf16":
        raise UsageError("`precision` bf16: ONNX Runtime has no bf16 CPU kernels; use fp16, or `fmt` openvino for bf16")
    suffix = {"onnx": ".onnx", "openvino": ".xml", "tensorrt": ".engine"}[fmt]
    if Path(out).suffix != suffix:
        raise UsageError(f"`out` {out}: a {fmt} file ends in {suffix}; name it e.g. model{suffix}")
    for path in _outputs(Path(out), fmt):
        check_replaceable_file(path, lambda p: is_tagged_file(p, TAG), "model graph", "`out`")


def _outputs(out: Path, fmt: str) -> list[Path]:
    return [out, out.with_suffix(".bin")] if fmt == "openvino" else [out]


def export_model(model: VPRModel, out: Path, *, fmt: str = "onnx", precision: str = "fp32", pcas: Sequence[PCA] = (),
                 calibration: Callable[[], Sequence[torch.Tensor]] | None = None) -> dict:
    """Write `model` (then its `pcas`) as one graph to `out`; int8 needs `calibration`, returning model inputs
    (3 x H x W, 0..255) to calibrate on. Returns what was written: files, precision, metadata."""
    out = Path(out)
    check_export(fmt, precision, out)
    if precision == "int8" and calibration is None:
        raise UsageError("`precision` int8 calibrates on images; give `calibration` (the index's database by default)")
    size = None if dynamic_size(model) else example_size(model)
    meta = metadata(model, pcas, precision, model_fingerprint(model), size)
    graph = onnx_bytes(model, pcas, size=size)
    samples = _calibration_batches(calibration(), size) if precision == "int8" else None
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        source = work / "fp32.onnx"
        source.write_bytes(graph)
        if fmt == "onnx":
            written = _onnx(source, work, precision, meta, samples)
            files = {out: written}
        else:
            files = _openvino(source, work, precision, meta, samples, out)
        agreement = _agreement(source, files[out], samples) if samples is not None else None
        for target, path in files.items():
            with tagged_file(target, TAG) as tmp:
                shutil.copyfile(path, tmp)
    return {"out": str(out), "files": [str(p) for p in files], "format": fmt, "precision": precision, "metadata": meta,
            "bytes": sum(p.stat().st_size for p in files), "int8_cosine_to_fp32": agreement}


def _agreement(fp32: Path, graph: Path, samples: list[np.ndarray]) -> dict:
    """Mean and least cosine between the fp32 graph's descriptors and `graph`'s on the calibration images."""
    def run(path: Path) -> np.ndarray:
        if path.suffix == ".onnx":
            import onnxruntime as ort

            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            return np.concatenate([session.run(None, {INPUT: x})[0] for x in samples])
        import openvino as ov

        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return np.concatenate([next(iter(compiled(x).values())) for x in samples])

    cosine = (run(fp32) * run(graph)).sum(axis=1)
    return {"mean": round(float(cosine.mean()), 6), "min": round(float(cosine.min()), 6), "images": len(samples)}


def _calibration_batches(images: Sequence[torch.Tensor], size: tuple[int, int] | None) -> list[np.ndarray]:
    """Calibration inputs as float32 1 x 3 x H x W arrays (one size per graph where the graph has one)."""
    batches = []
    for image in list(images)[:CALIBRATION_IMAGES]:
        if size is not None and tuple(image.shape[1:]) != tuple(size):
            image = torch.nn.functional.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True)[0]
        batches.append(image[None].float().numpy())
    if not batches:
        raise UsageError("`calibration` gave no images; give a folder of images like the ones the model will see")
    return batches


def _onnx(source: Path, work: Path, precision: str, meta: dict, samples: list[np.ndarray] | None) -> Path:
    """The ONNX file at `precision` with the metadata."""
    import onnx

    path = source
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        path = work / "fp16.onnx"
        onnx.save(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True), str(path))
    elif precision == "int8":
        path = work / "int8.onnx"
        _ort_int8(source, path, samples)
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    final = work / "final.onnx"
    onnx.save(model, str(final))
    return final


def _ort_int8(source: Path, target: Path, samples: list[np.ndarray]) -> None:
    """ONNX Runtime's static QDQ quantisation: int8 weights per channel, uint8 activations calibrated on `samples`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(samples)

        def get_next(self):
            item = next(self.items, None)
            return None if item is None else {INPUT: item}

    prepared = target.with_name("prepared.onnx")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser warns on the root logger for every LayerNorm weight it skips
    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
    finally:
        root.setLevel(level)


def _openvino(source: Path, work: Path, precision: str, meta: dict, samples: list[np.ndarray] | None,
              out: Path) -> dict[Path, Path]:
    """The OpenVINO IR (.xml + .bin) at `precision` (bf16: fp32 weights run with a bf16 hint; int8: the QDQ graph of
    `_ort_int8`) with the metadata."""
    import openvino as ov

    if precision == "int8":  # ONNX Runtime's QDQ graph, which OpenVINO runs in int8: NNCF's kept far less recall
        quantized = work / "int8.onnx"
        _ort_int8(source, quantized, samples)
        source = quantized
    model = ov.convert_model(str(source))
    for key, value in meta.items():
        model.set_rt_info(value, ["vpr", key.removeprefix("vpr.")])
    xml = work / "model.xml"
    ov.save_model(model, str(xml), compress_to_fp16=precision == "fp16")
    return {out: xml, out.with_suffix(".bin"): xml.with_suffix(".bin")}
