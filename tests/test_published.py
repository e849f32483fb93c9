"""Published checkpoints (CosPlace, EigenPlaces, pytorch-NetVlad, Patch-NetVLAD, VG benchmark) load
into vpr models whose descriptors equal those of the published architectures with the same weights.

The reference networks (helpers_published.py) re-state each repository's model from its code and paper (layer
by layer, with the repositories' own parameter names), independently of vpr's implementation.
"""

from __future__ import annotations

import json
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from typer.testing import CliRunner

from cli.app import app
from vpr.errors import CheckpointError, UsageError
from vpr.models.backbones import build_backbone
from vpr.models.checkpoints import load_checkpoint
from vpr.models.formats import import_published

from helpers_published import (
    CHANNELS, RefBenchmarkNet, RefCosPlaceNet, RefFlatten, RefGeM, RefL2Norm, RefNanneNet, assert_published_defaults,
    describe, images, random_net, ref_trunk, reference,
)


@pytest.mark.parametrize("backbone,dim", [("resnet18", 64), ("vgg16", 128)])
def test_cosplace_hub_files_give_the_published_descriptors(tmp_path, backbone, dim):
    ref = random_net(RefCosPlaceNet, backbone, dim, seed=1)
    path = tmp_path / f"{backbone}_{dim}_cosplace.pth"
    torch.save(ref.state_dict(), path)  # hubconf: load_state_dict_from_url gives this raw state dict
    model, pca = load_checkpoint(path)
    assert pca is None and model.config.head == "cosplace" and model.config.descriptor_dim == dim
    assert model.config.backbone == backbone
    assert_published_defaults(model)
    x = images()
    assert torch.allclose(describe(model, None, x), reference(ref, x), atol=1e-5)


COSPLACE_HUB = {  # gmberton/CosPlace hubconf.py AVAILABLE_TRAINED_MODELS
    "vgg16": (64, 128, 256, 512), "resnet18": (32, 64, 128, 256, 512),
    "resnet50": (32, 64, 128, 256, 512, 1024, 2048), "resnet101": (32, 64, 128, 256, 512, 1024, 2048),
    "resnet152": (32, 64, 128, 256, 512, 1024, 2048),
}
EIGENPLACES_HUB = {  # gmberton/EigenPlaces hubconf.py AVAILABLE_TRAINED_MODELS
    "vgg16": (512,), "resnet18": (256, 512), "resnet50": (128, 256, 512, 1024, 2048),
    "resnet101": (128, 256, 512, 1024, 2048),
}


@pytest.mark.parametrize("backbone", sorted(COSPLACE_HUB))
def test_every_published_cosplace_and_eigenplaces_size_is_recognised(backbone):
    with torch.device("meta"):
        trunk = ref_trunk(backbone).state_dict()
    state = {f"backbone.{k}": torch.empty(v.shape, dtype=v.dtype) for k, v in trunk.items()}
    for dim in sorted(set(COSPLACE_HUB[backbone]) | set(EIGENPLACES_HUB.get(backbone, ()))):
        published = dict(state, **{
            "aggregation.1.p": torch.ones(1) * 3, "aggregation.3.weight": torch.empty(dim, CHANNELS[backbone]),
            "aggregation.3.bias": torch.empty(dim),
        })
        model, pca = import_published(published, Path(f"{backbone}_{dim}.pth"))
        assert (model.config.backbone.split("_")[0], model.config.layer, model.config.descriptor_dim) == (backbone, 4, dim)


# ---- pytorch-NetVlad and Patch-NetVLAD -------------------------------------------------------------

def nanne_checkpoint(ref: nn.Module, parallel: bool) -> dict:
    """main.py's save_checkpoint dict; with nGPU > 1 encoder and pool are DataParallel-wrapped."""
    state = ref.state_dict()
    if parallel:
        state = {k.replace("encoder.", "encoder.module.").replace("pool.", "pool.module."): v for k, v in state.items()}
    optimizer = torch.optim.SGD(ref.parameters(), lr=0.001, momentum=0.9)
    return {"epoch": 3, "state_dict": state, "recalls": {1: np.float64(0.8), 5: np.float64(0.9)},
            "best_score": np.float64(0.9), "optimizer": optimizer.state_dict(), "parallel": parallel}


@pytest.mark.parametrize("vladv2,parallel", [(False, False), (True, True)])
def test_pytorch_netvlad_checkpoints_give_the_published_descriptors(tmp_path, vladv2, parallel):
    ref = random_net(RefNanneNet, 4, vladv2, seed=2)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(nanne_checkpoint(ref, parallel), path)
    model, pca = load_checkpoint(path)
    assert pca is None and model.config.backbone == "vgg16"
    assert model.config.head == "netvlad" and model.config.descriptor_dim == 4 * 512
    assert torch.equal(model.head.conv.bias, ref.pool.conv.bias if vladv2 else torch.zeros(4))
    assert_published_defaults(model)
    x = images(1)
    assert torch.allclose(describe(model, None, x), reference(ref, x), atol=1e-5)


def whitened_pca_layer(conv: nn.Conv2d, samples: torch.Tensor) -> None:
    """Patch-NetVLAD's add_pca.py: weight = (U diag(1/sqrt(lambda)))^T, bias = -weight mu."""
    mu = samples.mean(dim=0)
    u, s, _ = torch.linalg.svd((samples - mu).T.double(), full_matrices=False)
    d = conv.out_channels
    lams = (s[:d] ** 2 / (len(samples) - 1)).float()
    weight = (u[:, :d].float() / lams.sqrt()).T
    with torch.no_grad():
        conv.weight.copy_(weight[:, :, None, None])
        conv.bias.copy_(-weight @ mu)


def test_patch_netvlad_wpca_is_imported_as_a_whitening_pca(tmp_path):
    ref = random_net(RefNanneNet, 4, False, 16, seed=3)
    with torch.no_grad():
        samples = ref.pool(ref.encoder(torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(4))))
    whitened_pca_layer(ref.WPCA[0], samples)
    path = tmp_path / "pittsburgh_WPCA16.pth.tar"
    torch.save({"num_pcs": 16, "state_dict": ref.state_dict()}, path)
    model, pca = load_checkpoint(path)
    assert pca is not None and pca.whiten and (pca.in_dim, pca.out_dim) == (4 * 512, 16)
    x = images(2)
    assert torch.allclose(describe(model, pca, x), reference(ref, x), atol=1e-4)


# ---- deep-visual-geo-localization-benchmark ---------------------------------------------------------

def benchmark_checkpoint(ref: nn.Module) -> dict:
    """train.py's checkpoint: the model is wrapped in DataParallel, recalls is a numpy array."""
    return {"epoch_num": 4, "model_state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()},
            "optimizer_state_dict": torch.optim.Adam(ref.parameters()).state_dict(),
            "recalls": np.array([80.1, 90.2, 93.0, 95.5]), "best_r5": np.float64(90.2), "not_improved_num": 0}


@pytest.mark.parametrize("backbone,cut,aggregation,fc_dim", [
    ("resnet18", "conv4", "netvlad", None),
    ("resnet18", "conv5", "netvlad", 32),
    ("resnet50", "conv4", "gem", None),
    ("resnet18", "conv5", "gem", 64),
    ("vgg16", "conv5", "netvlad", None),
])
def test_benchmark_checkpoints_give_the_published_descriptors(tmp_path, backbone, cut, aggregation, fc_dim):
    ref = random_net(RefBenchmarkNet, backbone, cut, aggregation, fc_dim, seed=5)
    path = tmp_path / "best_model.pth"
    torch.save(benchmark_checkpoint(ref), path)
    model, pca = load_checkpoint(path)
    assert model.config.layer == (3 if cut == "conv4" else 4)
    assert model.config.head == ("netvlad" if aggregation == "netvlad" else "cosplace")
    assert (pca is not None) == (aggregation == "netvlad" and fc_dim is not None)
    assert_published_defaults(model)
    x = images(3)
    expected = F.normalize(reference(ref, x), dim=1)  # vpr descriptors are unit vectors (GeM alone is not)
    assert torch.allclose(describe(model, pca, x), expected, atol=1e-5)


# ---- format detection and errors --------------------------------------------------------------------

@pytest.fixture(scope="module")
def cosplace_file(tmp_path_factory) -> tuple[Path, nn.Module]:
    ref = random_net(RefCosPlaceNet, "resnet18", 32, seed=6)
    path = tmp_path_factory.mktemp("published") / "ResNet18_32_cosplace.pth"
    torch.save(ref.state_dict(), path)
    return path, ref


def test_format_can_be_forced_by_name_or_alias(cosplace_file):
    path, ref = cosplace_file
    x = images(4)
    expected = reference(ref, x)
    for fmt in ("cosplace", "EigenPlaces", "auto"):
        model, _ = load_checkpoint(path, fmt)
        assert torch.allclose(describe(model, None, x), expected, atol=1e-5)
    with pytest.raises(UsageError, match="cosplace"):
        load_checkpoint(path, "cosplace-v2")


def test_a_wrongly_forced_format_names_the_missing_keys(cosplace_file):
    with pytest.raises(CheckpointError, match="missing pool.centroids, pool.conv.weight"):
        load_checkpoint(cosplace_file[0], "netvlad")
    with pytest.raises(CheckpointError, match="not a vpr checkpoint"):
        load_checkpoint(cosplace_file[0], "vpr")


def test_an_unknown_layout_lists_what_was_expected_and_found(tmp_path):
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(random_net(torchvision.models.resnet18, seed=9).state_dict(), path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "unknown checkpoint layout" in message and "\n" not in message
    assert all(name in message for name in ("cosplace", "netvlad", "benchmark", "aggregation.3.weight", "pool.centroids"))
    assert "conv1.* (1 tensor)" in message and "layer1.*" in message


def test_unsupported_published_variants_are_refused_clearly(tmp_path):
    after_pool = random_net(RefBenchmarkNet, "resnet18", "conv4", "gem", None, seed=8)
    after_pool.aggregation = nn.Sequential(RefGeM(), RefL2Norm(), RefFlatten())  # --l2 after_pool
    torch.save(benchmark_checkpoint(after_pool), tmp_path / "after_pool.pth")
    with pytest.raises(CheckpointError, match=r"unsupported benchmark aggregation.*found aggregation\.0\.p"):
        load_checkpoint(tmp_path / "after_pool.pth")
    with torch.device("meta"):
        alexnet_trunk = torchvision.models.alexnet(weights=None).features[:-2].state_dict()  # pytorch-NetVlad --arch alexnet
    alexnet = {f"encoder.{k}": torch.zeros(v.shape) for k, v in alexnet_trunk.items()}
    pool = {"pool.centroids": torch.rand(4, 256), "pool.conv.weight": torch.rand(4, 256, 1, 1)}
    torch.save({"state_dict": dict(alexnet, **pool)}, tmp_path / "alexnet_netvlad.pth.tar")
    with pytest.raises(CheckpointError, match="match no supported trunk"):
        load_checkpoint(tmp_path / "alexnet_netvlad.pth.tar")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("payload", [
    {"state_dict": Evil()},
    {"epoch": 1, "state_dict": {"encoder.0.weight": torch.ones(1)}, "recalls": np.array([object()], dtype=object)},
])
def test_published_files_needing_arbitrary_pickles_are_refused(tmp_path, capsys, payload):
    torch.save(payload, tmp_path / "evil.pth.tar")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(tmp_path / "evil.pth.tar")
    assert "pwned" not in capsys.readouterr().out


# ---- CLI ----------------------------------------------------------------------------------------------

def test_build_index_and_query_with_a_published_checkpoint(places, tmp_path, cosplace_file):
    runner = CliRunner()
    out = tmp_path / "idx"
    result = runner.invoke(app, [
        "build-index", str(places / "database"), "--checkpoint", str(cosplace_file[0]), "--resize", "48x64",
        "--out", str(out), "--workers", "0", "--no-cache", "--device", "cpu", "--json",
    ])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["dim"] == 32
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["input_size"] == [48, 64] and manifest["model"]["backbone"] == "resnet18"
    query = sorted((places / "queries").iterdir())[0]
    result = runner.invoke(app, ["query", str(query), "--index", str(out), "-k", "3", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)[0]["matches"]) == 3


def test_format_without_a_checkpoint_is_a_usage_error(places, tmp_path):
    args = ["build-index", str(places / "database"), "--format", "cosplace", "--out", str(tmp_path / "i")]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, UsageError) and "--checkpoint" in str(result.exception)


def test_vpr_models_lists_backbones_sizes_and_formats():
    result = CliRunner().invoke(app, ["models", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert {"vpr", "cosplace", "netvlad", "benchmark"} <= {f["name"] for f in info["formats"]}
    assert {"resnet152", "vgg16", "dinov2_vitb14", "dinov2_vitg14"} <= {b["name"] for b in info["backbones"]}
    cosplace = next(f for f in info["formats"] if f["name"] == "cosplace")
    assert "eigenplaces" in cosplace["aliases"]
    assert any(m["method"] == "EigenPlaces" and m["format"] == "cosplace" and m["url"].startswith("https://")
               for m in info["methods"])
    assert info["published_input_size"] == [480, 640]
    table = CliRunner().invoke(app, ["models"])
    assert table.exit_code == 0 and "benchmark" in table.output and "resnet152" in table.output


# ---- torchvision ImageNet weights -------------------------------------------------------------------

def hub_file(name: str, weights: str, torch_home: Path) -> Path:
    url = torchvision.models.get_model_weights(name).verify(weights).url
    return torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]


def test_named_imagenet_weights_load_from_the_torch_hub_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    weights = random_net(torchvision.models.resnet18, seed=7).state_dict()
    cached = hub_file("resnet18", "IMAGENET1K_V1", tmp_path)
    cached.parent.mkdir(parents=True)
    torch.save(weights, cached)
    trunk = build_backbone("resnet18", pretrained="IMAGENET1K_V1")
    assert torch.equal(trunk[0].weight, weights["conv1.weight"])
    assert torch.equal(trunk[7][1].bn2.running_var, weights["layer4.1.bn2.running_var"])


def test_named_imagenet_weights_offline_and_uncached_say_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CheckpointError, match="offline") as error:
        build_backbone("vgg16", pretrained="IMAGENET1K_V1")
    assert str(hub_file("vgg16", "IMAGENET1K_V1", tmp_path)) in str(error.value) and "pretrained" in str(error.value)
    with pytest.raises(UsageError, match="IMAGENET1K_V2"):
        build_backbone("resnet50", pretrained="IMAGENET_V9")


def test_local_imagenet_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    assert torch.equal(build_backbone("resnet18", pretrained=path)[0].weight, torch.load(path)["conv1.weight"])
    with pytest.raises(CheckpointError, match="not resnet50 ImageNet weights"):
        build_backbone("resnet50", pretrained=path)
