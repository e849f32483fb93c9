"""The exported graph: 0..255 RGB pixels in, unit descriptors out, and the metadata a consumer needs to feed it.

    x = (pixels - 255 mean) / (255 std);  d = L2(aggregator(backbone(x)));  each PCA step: d = L2(s * ((d - mu) W^T))

(the checkpoint's PCA, then the index's, as `IndexBundle.project` applies them).
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from vpr.errors import UsageError
from vpr.models.model import VPRModel
from vpr.models.pca import PCA

INPUT, OUTPUT = "images", "descriptors"
FORMAT_VERSION = "vpr-deploy 1"
INPUT_NOTE = "float32 N x 3 x H x W, RGB, 0..255 as decoded and resized (not normalised); output float32 N x D, unit rows"


class Deployable(nn.Module):
    """A model as one graph: normalise the 0..255 batch, run the network, L2, and the index's PCA when given."""

    def __init__(self, model: VPRModel, pcas: Sequence[PCA] = ()) -> None:
        super().__init__()
        self.model = model
        config = model.config
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
        self.steps = len(pcas)
        for i, pca in enumerate(pcas):
            self.register_buffer(f"pca{i}_mean", torch.as_tensor(pca.mean, dtype=torch.float32))
            self.register_buffer(f"pca{i}_matrix", torch.as_tensor(pca.components * pca.scale[:, None], dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        descriptors = nn.functional.normalize(self.model((images - self.mean) / self.std).float(), dim=1)
        for i in range(self.steps):
            centred = descriptors - getattr(self, f"pca{i}_mean")
            descriptors = nn.functional.normalize(centred @ getattr(self, f"pca{i}_matrix").T, dim=1)
        return descriptors


def example_size(model: VPRModel) -> tuple[int, int]:
    """An input size the model takes: its fixed size, else its default side rounded to its multiple."""
    config = model.config
    height, width = config.input_size
    if config.resize != "fixed":
        multiple = max(config.multiple, 1)
        height = width = max(multiple, (min(height, width) // multiple) * multiple)
    return int(height), int(width)


def metadata(model: VPRModel, pcas: Sequence[PCA], precision: str, fingerprint: str,
             size: tuple[int, int] | None) -> dict[str, str]:
    """What a consumer needs to feed the graph (`size`: the one input size it takes, None for any): preprocessing,
    descriptor size, the model and its fingerprint."""
    config = model.config
    preprocessing = {"graph_size": list(size) if size else None,
        "resize": config.resize, "input_size": list(config.input_size), "multiple": config.multiple,
        "interpolation": config.interpolation, "resampler": config.resampler, "mean": list(config.mean),
        "std": list(config.std), "input": INPUT_NOTE, "input_name": INPUT, "output_name": OUTPUT,
    }
    dim = pcas[-1].out_dim if pcas else config.descriptor_dim
    return {
        "vpr.format": FORMAT_VERSION, "vpr.preprocessing": json.dumps(preprocessing), "vpr.descriptor_dim": str(dim),
        "vpr.model": json.dumps(config.to_dict()), "vpr.pca": ",".join(str(p.out_dim) for p in pcas) or "none",
        "vpr.precision": precision, "vpr.fingerprint": fingerprint, "vpr.random_init": str(bool(model.random_init)).lower(),
    }


def dynamic_size(model: VPRModel) -> bool:
    """Whether one graph takes every input size: native-size CNN methods. A ViT's position embeddings are
    interpolated by a scale the exporter fixes at the traced size, so a ViT graph has one size."""
    from vpr.models.vit import DinoV2

    return model.config.resize != "fixed" and not any(isinstance(m, DinoV2) for m in model.modules())


def onnx_bytes(model: VPRModel, pcas: Sequence[PCA] = (), size: tuple[int, int] | None = None) -> bytes:
    """The fp32 ONNX graph of `model` (and its PCA steps) with a dynamic batch and, where `dynamic_size`, dynamic
    height and width; else for inputs of `size` (default: the model's own), exported by torch's dynamo exporter."""
    wrapper = Deployable(model, pcas).eval()
    height, width = size or example_size(model)
    example = torch.zeros(2, 3, height, width)
    dims = {0: torch.export.Dim("batch", min=1, max=4096)}
    if dynamic_size(model):
        dims[2] = torch.export.Dim("height", min=8, max=8192)
        dims[3] = torch.export.Dim("width", min=8, max=8192)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, (example,), dynamo=True, dynamic_shapes={"images": dims},
                                        input_names=[INPUT], output_names=[OUTPUT], verbose=False)
            program.save(buffer)
    except Exception as exc:  # the exporter raises many kinds; the method is then not exportable as is
        raise UsageError(f"{model.config.head} on {model.config.backbone} does not export to ONNX: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    graph = buffer.getvalue()
    _check_dynamic_batch(graph, model)
    return graph


def _check_dynamic_batch(graph: bytes, model: VPRModel) -> None:
    """Refuse a graph whose batch size the exporter fixed (a forward that reads the batch as a Python number)."""
    import onnx

    dims = onnx.load_from_string(graph).graph.input[0].type.tensor_type.shape.dim
    if dims and dims[0].HasField("dim_value"):
        raise UsageError(f"{model.config.head} on {model.config.backbone} exports only with a batch of "
                         f"{dims[0].dim_value}: its forward reads the batch size as a number; it cannot be exported as is")
