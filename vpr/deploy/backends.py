"""Inference backends other than torch: a model's exported graph run by ONNX Runtime or OpenVINO, in place of
the torch forward wherever vpr describes images (`Describer`). The graph is exported from the model itself
(fp32; OpenVINO bf16 under `amp`), or read from a file `vpr export-model` wrote (any precision, int8 included),
which must come from the same model."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from vpr.deploy import GRAPH_SUFFIXES
from vpr.deploy.graph import INPUT, dynamic_size, onnx_bytes
from vpr.errors import UsageError
from vpr.models.checkpoints import model_fingerprint
from vpr.models.model import VPRModel

def read_metadata(path: Path) -> dict[str, str]:
    """The `vpr.*` metadata of an exported ONNX (model metadata) or OpenVINO IR (rt_info) file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"`backend` {path}: no such file; give a graph `export_model` wrote")
    try:
        if path.suffix == ".onnx":
            import onnx

            model = onnx.load(str(path), load_external_data=False)
            return {p.key: p.value for p in model.metadata_props if p.key.startswith("vpr.")}
        import openvino as ov

        model = ov.Core().read_model(str(path))
        return {f"vpr.{key}": str(model.get_rt_info(["vpr", key]).astype(str)) for key in _ov_keys(model)}
    except ImportError as exc:
        raise UsageError(f"{path}: reading it needs {exc.name}; pip install -e '.[deploy]'") from exc
    except Exception as exc:  # a damaged or foreign file: the parsers raise many kinds
        raise UsageError(f"{path}: not a readable ONNX or OpenVINO graph ({type(exc).__name__}); export it again") from exc


def _ov_keys(model) -> list[str]:
    info = model.get_rt_info()
    return list(info["vpr"].keys()) if "vpr" in info else []


class GraphRunner:
    """A model's graph on ONNX Runtime or OpenVINO: 0..255 batches (torch, N x 3 x H x W) -> unit descriptors
    (float32 torch, N x D). One compiled graph per input size where the graph has one size (ViT methods)."""

    def __init__(self, model: VPRModel, backend: str, *, amp: bool = False, threads: int | None = None) -> None:
        self.model, self.amp, self.threads = model, amp, threads
        self.file = Path(backend) if str(backend).endswith(GRAPH_SUFFIXES) else None
        self.engine = ("onnxruntime" if self.file.suffix == ".onnx" else "openvino") if self.file else backend
        if self.engine not in ("onnxruntime", "openvino"):
            raise UsageError(f"`backend` {backend!r}: the graph backends are onnxruntime and openvino")
        self._import()
        self.sessions: dict[tuple[int, int] | None, object] = {}
        if self.file is not None:
            meta = read_metadata(self.file)
            if meta.get("vpr.fingerprint") != model_fingerprint(model):
                raise UsageError(f"`backend` {self.file}: exported from another model than this one; export it from "
                                 "this index or checkpoint")
            if meta.get("vpr.pca", "none") != "none":
                raise UsageError(f"`backend` {self.file}: holds the index's PCA; export it without `pca` to run it here")
            size = json.loads(meta["vpr.preprocessing"]).get("graph_size")
            self.fixed = tuple(size) if size else None
            self.sessions[self.fixed] = self._session(self.file)

    def _import(self) -> None:
        try:
            __import__("onnxruntime" if self.engine == "onnxruntime" else "openvino")
            if self.file is None:  # the graph is exported here
                __import__("onnxscript")
        except ImportError as exc:
            raise UsageError(f"`backend` {self.engine} needs {exc.name}; pip install -e '.[deploy]'") from exc

    def _session(self, source: Path | bytes):
        if self.engine == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            if self.threads:
                options.intra_op_num_threads = self.threads
            return ort.InferenceSession(source if isinstance(source, bytes) else str(source), options,
                                        providers=["CPUExecutionProvider"])
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": "bf16" if self.amp else "f32", "PERFORMANCE_HINT": "LATENCY"}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        core = ov.Core()
        if isinstance(source, bytes):
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "model.onnx"
                path.write_bytes(source)
                return core.compile_model(core.read_model(str(path)), "CPU", config)
        return core.compile_model(str(source), "CPU", config)

    def session(self, height: int, width: int):
        """The compiled graph for H x W inputs, exported from the model on first use."""
        if self.file is not None:
            if self.fixed is not None and self.fixed != (height, width):
                raise UsageError(f"`backend` {self.file}: takes {self.fixed[0]}x{self.fixed[1]} inputs, not "
                                 f"{height}x{width}; export it for this size or use the index's fixed size")
            return self.sessions[self.fixed]
        key = None if dynamic_size(self.model) else (height, width)
        if key not in self.sessions:
            self.sessions[key] = self._session(onnx_bytes(self.model, size=(height, width)))
        return self.sessions[key]

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        images = np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())
        session = self.session(*images.shape[2:])
        if self.engine == "onnxruntime":
            out = session.run(None, {INPUT: images})[0]
        else:
            out = next(iter(session(images).values()))
        return torch.nn.functional.normalize(torch.from_numpy(np.asarray(out, dtype=np.float32)), dim=1)
