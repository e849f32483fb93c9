"""Deployment outside PyTorch: any vpr model as one ONNX or OpenVINO graph (normalisation, network, L2 and
optionally the index's PCA), its preprocessing in the file's metadata, int8 by static quantisation, and the
backends that run such graphs wherever vpr describes images (docs/deploy.md)."""

BACKENDS = ("torch", "onnxruntime", "openvino")
FORMATS = ("onnx", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
GRAPH_SUFFIXES = (".onnx", ".xml")


def check_backend(backend: str) -> str:
    """`backend` when it names a backend or an exported graph file, else a `UsageError` saying which are known."""
    from vpr.errors import UsageError

    if isinstance(backend, str) and (backend in BACKENDS or backend.endswith(GRAPH_SUFFIXES)):
        return backend
    raise UsageError(f"`backend` {backend!r}: use one of {', '.join(BACKENDS)}, or a .onnx / .xml file `export_model` wrote")
