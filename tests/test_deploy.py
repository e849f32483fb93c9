"""Deployment outside PyTorch: a model exported as one graph gives vpr's descriptors in ONNX Runtime (and OpenVINO),
its preprocessing is in the file, every backend answers the same index, int8 stays close to fp32, and a graph or
precision that cannot be made is refused in one line without writing anything."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import run_cli
from vpr import api
from vpr.data.datasets import load_image_set
from vpr.data.images import load_rgb, preprocess
from vpr.deploy.export import export_model
from vpr.errors import OutputError

VPR = Path(sys.executable).with_name("vpr")
FAMILIES = [  # one per aggregator family of `vpr models` that fits CI: CNN heads, and a ViT one
    ("resnet18", "cosplace", {}), ("resnet18", "netvlad", {}), ("resnet18", "convap", {}),
    ("resnet18", "mixvpr", {"layer": 3}), ("resnet18", "boq", {"layer": 3}), ("dinov2_vits14", "salad", {}),
]


def perturbed(model):
    """Every weight moved off its initial value (LayerScale's 1e-5, zero biases), so that every layer matters."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model


def model_inputs(model, paths):
    return torch.stack([preprocess(load_rgb(p), model.config.preprocess, str(p)) for p in paths])


@pytest.mark.parametrize("backbone,head,options", FAMILIES, ids=[f"{b}-{h}" for b, h, _ in FAMILIES])
def test_the_exported_graph_gives_vprs_descriptors_in_onnx_runtime(backbone, head, options, places, tmp_path):
    model = perturbed(api.new_model(backbone, head=head, **options)[0])
    paths = load_image_set(places / "queries").paths[:3]
    expected = api.describe(model, paths, api.ExtractOptions(num_workers=0))
    out = tmp_path / "model.onnx"
    export_model(model, out)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": model_inputs(model, paths).float().numpy()})[0]
    assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-4
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    preprocessing = json.loads(meta["vpr.preprocessing"])
    assert int(meta["vpr.descriptor_dim"]) == expected.shape[1] and preprocessing["mean"] == list(model.config.mean)
    assert preprocessing["input_size"] == list(model.config.input_size) and preprocessing["input_name"] == "images"


def test_with_pca_the_graph_gives_the_index_space(places, places_index, tmp_path, monkeypatch, capsys):
    index = api.Index.load(places_index, device="cpu")
    out = tmp_path / "idx.onnx"
    code, _, err = run_cli(monkeypatch, capsys, "export-model", places_index, "--out", out, "--pca")
    assert code == 0, err
    paths = load_image_set(places / "queries").paths[:4]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": model_inputs(index.bundle.model, paths).float().numpy()})[0]
    assert np.abs(got - index.describe(paths)).max() < 1e-4


def test_every_backend_answers_the_same_index(places, places_index, tmp_path, monkeypatch, capsys):
    answers = {}
    for backend in ("torch", "onnxruntime"):
        code, out, err = run_cli(monkeypatch, capsys, "eval", places / "queries", "--index", places_index, "--backend",
                                 backend, "--device", "cpu", "--workers", 0, "--json")
        assert code == 0, (backend, err)
        answers[backend] = json.loads(out)["recall"]
    if _has("openvino"):  # in a subprocess: OpenVINO's thread pools left in the test process crash later forks
        result = subprocess.run([str(VPR), "eval", str(places / "queries"), "--index", str(places_index), "--backend",
                                 "openvino", "--device", "cpu", "--workers", "0", "--json"], capture_output=True, timeout=600)
        assert result.returncode == 0, result.stderr.decode()
        answers["openvino"] = json.loads(result.stdout)["recall"]
    assert all(recall == answers["torch"] for recall in answers.values()), answers
    code, out, err = run_cli(monkeypatch, capsys, "build-index", places / "database", "--out", tmp_path / "ort-idx",
                             "--backend", "onnxruntime", "--dim", 64, "--resize", "48x64", "--json")
    assert code == 0, err


def test_int8_stays_close_to_fp32_and_runs_as_a_backend(places, places_index, tmp_path, monkeypatch, capsys):
    out = tmp_path / "int8.onnx"
    code, _, err = run_cli(monkeypatch, capsys, "export-model", places_index, "--out", out, "--precision", "int8")
    assert code == 0, err
    paths = load_image_set(places / "queries").paths
    fp32 = api.Index.load(places_index, device="cpu").describe(paths)
    int8 = api.Index.load(places_index, device="cpu", backend=str(out)).describe(paths)
    assert (fp32 * int8).sum(axis=1).min() > 0.95
    code, stdout, err = run_cli(monkeypatch, capsys, "query", paths[0], "--index", places_index, "--backend", out, "--json")
    assert code == 0, err and json.loads(stdout)[0]["matches"]


def test_refusals_are_one_line_and_write_nothing(places, places_index, tmp_path, monkeypatch, capsys):
    photo = load_image_set(places / "queries").paths[0]
    theirs = tmp_path / "theirs.onnx"
    theirs.write_bytes(b"someone else's model")
    other = tmp_path / "other.onnx"
    export_model(api.new_model("resnet18", head="cosplace", descriptor_dim=32)[0], other)
    cases = [
        (("export-model", places_index, "--out", tmp_path / "m.onnx", "--precision", "bf16"), "no bf16 CPU kernels"),
        (("export-model", places_index, "--out", tmp_path / "m.engine", "--format", "tensorrt"), "tensorrt"),
        (("export-model", places_index, "--out", tmp_path / "m.txt"), "ends in .onnx"),
        (("export-model", places_index, "--out", theirs), "not a model graph written by vpr"),
        (("export-model", places_index, "--out", tmp_path / "m.onnx", "--format", "coreml"), "--format 'coreml'"),
        (("export-model", tmp_path / "missing", "--out", tmp_path / "m.onnx"), "no such index folder"),
        (("query", photo, "--index", places_index, "--backend", other), "exported from another model"),
        (("query", photo, "--index", places_index, "--backend", "tflite"), "--backend 'tflite'"),
    ]
    for args, expected in cases:
        code, _, err = run_cli(monkeypatch, capsys, *args)
        assert code != 0 and expected in err and len(err.strip().splitlines()) == 1, (args, err)
    assert theirs.read_bytes() == b"someone else's model" and not (tmp_path / "m.onnx").exists()


def test_an_openvino_export_reads_back_with_its_metadata(places, places_index, tmp_path):
    if not _has("openvino"):
        pytest.skip("openvino is not installed (pip install -e '.[deploy]')")
    bundle = api.Index.load(places_index, device="cpu").bundle
    out = tmp_path / "m.xml"
    result = subprocess.run([str(VPR), "export-model", str(places_index), "--out", str(out), "--format", "openvino",
                             "--precision", "fp16", "--json"], capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr.decode()
    report = json.loads(result.stdout)
    assert sorted(report["files"]) == sorted([str(out), str(tmp_path / "m.bin")])
    assert report["metadata"]["vpr.precision"] == "fp16"
    assert int(report["metadata"]["vpr.descriptor_dim"]) == bundle.model.config.descriptor_dim
    photo = load_image_set(places / "queries").paths[0]
    result = subprocess.run([str(VPR), "query", str(photo), "--index", str(places_index), "--backend", str(out),
                             "--json"], capture_output=True, timeout=600)  # its metadata read back: same model
    assert result.returncode == 0, result.stderr.decode()
    with pytest.raises(OutputError, match="not a model graph written by vpr"):
        (tmp_path / "n.bin").write_bytes(b"x")
        export_model(bundle.model, tmp_path / "n.xml", fmt="openvino")


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_serve_answers_through_onnx_runtime_as_through_torch(places, places_index):
    from fastapi.testclient import TestClient

    from vpr.serve import ServeConfig, create_app

    photo = load_image_set(places / "queries").paths[3]
    ids = {}
    for backend in ("torch", "onnxruntime"):
        with TestClient(create_app(ServeConfig(index=places_index, device="cpu", backend=backend, allowed_hosts=("testserver",)))) as client:
            assert client.get("/info").json()["backend"] == backend
            body = client.post("/query", files=[("images", (photo.name, photo.read_bytes(), "image/jpeg"))]).json()
            ids[backend] = [m["id"] for m in body["results"][0]["matches"]]
    assert ids["onnxruntime"] == ids["torch"]
