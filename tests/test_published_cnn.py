"""SFRS (OpenIBL vgg16_netvlad: VGG16 NetVLAD + PCA-whitening layer) and AP-GeM (dirtorch ResNet GeM + FC
+ sklearn whitening) files load strictly and give their authors' descriptors, restated here; their
preprocessing is stored in the config."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from conftest import perturb_batchnorm
from vpr.data.images import preprocess
from vpr.errors import CheckpointError
from vpr.models.methods import apgem, sfrs
from vpr.models.checkpoints import load_checkpoint
from vpr.models.inference import forward_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")
OPENIBL_MEAN = (0.48501960784313836, 0.4579568627450961, 0.4076039215686255)


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights with BatchNorm statistics and biases away from their init."""
    gen = torch.Generator().manual_seed(seed)
    perturb_batchnorm(model, gen)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
    return model.eval()


# ----------------------------------------------------------------------------------- SFRS
@pytest.fixture(scope="module")
def vgg16_trunk():
    torch.manual_seed(0)
    return perturbed(torch.nn.Sequential(*list(torchvision.models.vgg16(weights=None).features)[:-2]), 1)


def sfrs_state(trunk: torch.nn.Module, clusters: int = 4, dim: int = 16) -> dict:
    """OpenIBL's EmbedNetPCA state dict with K = `clusters` (a small NetVLAD) and a `dim`-d PCA layer."""
    gen = torch.Generator().manual_seed(2)
    state = {f"base_model.base.{k}": v for k, v in trunk.state_dict().items()}
    state["net_vlad.centroids"] = torch.rand(clusters, 512, generator=gen)
    state["net_vlad.conv.weight"] = torch.randn(clusters, 512, 1, 1, generator=gen) * 5
    state["pca_layer.weight"] = torch.randn(dim, clusters * 512, 1, 1, generator=gen)
    state["pca_layer.bias"] = torch.randn(dim, generator=gen)
    return state


def restated_sfrs(state: dict, trunk: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """OpenIBL's forward: L2 local features, softmax(conv) without bias, residual sums, intra-norm, L2,
    the PCA conv, L2."""
    x = F.normalize(trunk(images), dim=1).flatten(2)  # N x C x HW
    a = F.softmax(torch.einsum("kc,nci->nki", state["net_vlad.conv.weight"][:, :, 0, 0], x), dim=1)
    c = state["net_vlad.centroids"]
    vlad = torch.einsum("nki,nci->nkc", a, x) - a.sum(dim=2)[:, :, None] * c[None]
    vlad = F.normalize(F.normalize(vlad, dim=2).flatten(1), dim=1)
    y = F.linear(vlad, state["pca_layer.weight"][:, :, 0, 0], state["pca_layer.bias"])
    return F.normalize(y, dim=1)


def test_sfrs_loads_strictly_and_gives_openibl_descriptors(tmp_path, vgg16_trunk):
    state = sfrs_state(vgg16_trunk)
    path = tmp_path / "vgg16_netvlad.pth"
    torch.save(state, path)
    model, pca = load_checkpoint(path)
    c = model.config
    assert (c.backbone, c.head, c.num_clusters, c.descriptor_dim) == ("vgg16", "netvlad", 4, 4 * 512)
    assert (c.resize, c.input_size, c.interpolation, c.resampler, c.multiple) == ("fixed", (480, 640), "bilinear", "pil", 1)
    assert c.mean == OPENIBL_MEAN and c.std == (1 / 255,) * 3
    assert pca is not None and (pca.in_dim, pca.out_dim) == (2048, 16)
    pixels = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(3)) * 255
    got = torch.from_numpy(pca.transform(forward_batch(model, pixels).numpy()))
    with torch.no_grad():  # OpenIBL's Normalize(mean, std=1/255): pixels 0..255 minus the mean
        expected = restated_sfrs(state, vgg16_trunk, pixels - torch.tensor(OPENIBL_MEAN).view(1, 3, 1, 1) * 255)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
    img = Image.fromarray((torch.rand(32, 64, 3) * 255).byte().numpy())
    assert tuple(preprocess(img, c.preprocess).shape) == (3, 480, 640)


def test_sfrs_without_pca_layer_is_plain_netvlad(tmp_path, vgg16_trunk):
    state = {k: v for k, v in sfrs_state(vgg16_trunk).items() if not k.startswith("pca_layer.")}
    path = tmp_path / "netvlad.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)  # an OpenIBL training checkpoint
    model, pca = load_checkpoint(path)
    assert pca is None and model.config.descriptor_dim == 2048


def test_sfrs_wrong_files(tmp_path, vgg16_trunk):
    state = sfrs_state(vgg16_trunk)
    path = tmp_path / "vgg16_netvlad.pth"
    torch.save({k: v for k, v in state.items() if k != "base_model.base.28.weight"}, path)
    with pytest.raises(CheckpointError, match="SFRS.*not VGG16"):
        load_checkpoint(path)
    torch.save({**state, "pca_layer.weight": state["pca_layer.weight"][:, :100]}, path)
    with pytest.raises(CheckpointError, match="SFRS.*pca_layer.weight"):
        load_checkpoint(path)
    torch.save({k: v for k, v in state.items() if k != "net_vlad.conv.weight"}, path)
    with pytest.raises(CheckpointError, match="SFRS.*missing net_vlad.conv.weight"):
        load_checkpoint(path)


# ----------------------------------------------------------------------------------- AP-GeM
class FakeSklearnPCA:
    """Pickled under scikit-learn's old name, as dirtorch's files hold it; only its attributes travel."""


@pytest.fixture()
def old_sklearn_name(monkeypatch):
    module = types.ModuleType("sklearn.decomposition.pca")
    module.PCA = FakeSklearnPCA
    FakeSklearnPCA.__module__, FakeSklearnPCA.__qualname__ = "sklearn.decomposition.pca", "PCA"
    monkeypatch.setitem(sys.modules, "sklearn.decomposition.pca", module)


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return perturbed(torchvision.models.resnet50(weights=None), 4)


def apgem_state(resnet: torch.nn.Module, dim: int = 32) -> dict:
    gen = torch.Generator().manual_seed(5)
    state = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    state |= {"fc.weight": torch.randn(dim, 2048, generator=gen) * 0.05, "fc.bias": torch.randn(dim, generator=gen) * 0.1,
              "adpool.p": torch.tensor([3.4])}
    return state


def whitening(dim: int = 32) -> FakeSklearnPCA:
    rng = np.random.default_rng(6)
    pca = FakeSklearnPCA()
    pca.components_ = np.linalg.qr(rng.standard_normal((dim, dim)))[0].T
    pca.mean_ = rng.standard_normal(dim) * 0.1
    pca.explained_variance_ = rng.random(dim) * 0.01 + 1e-4
    pca.whiten, pca.n_components_, pca._sklearn_version = True, np.int64(dim), "0.20.3"
    return pca


def restated_apgem(state: dict, resnet: torch.nn.Module, images: torch.Tensor, pca=None) -> torch.Tensor:
    """dirtorch: GeM (clamp 1e-6, no L2 before), FC, L2; then whiten_features(whitenp=0.25) and L2."""
    trunk = torch.nn.Sequential(*list(resnet.children())[:-2])
    p = state["adpool.p"]
    g = trunk(images).clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1 / p)
    d = F.normalize(F.linear(g, state["fc.weight"], state["fc.bias"]), dim=1).double().numpy()
    if pca is None:
        return torch.from_numpy(d).float()
    y = (d - pca.mean_) @ pca.components_.T / np.power(pca.explained_variance_, 0.25)
    return torch.from_numpy(y / np.linalg.norm(y, axis=1, keepdims=True)).float()


def test_apgem_loads_dirtorch_file_with_whitening(tmp_path, resnet50, old_sklearn_name):
    state = apgem_state(resnet50)
    pca_obj = whitening()
    path = tmp_path / "Resnet-101-AP-GeM.pt"
    torch.save({"model_options": {"arch": "resnet50_rmac", "out_dim": 32, "pooling": "gem", "gemp": 3, "without_fc": False},
                "state_dict": {f"module.{k}": v for k, v in state.items()},
                "preprocess": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "input_size": 224},
                "pca": {"Landmarks_clean": pca_obj}, "epoch": 7}, path,
               _use_new_zipfile_serialization=False)  # dirtorch's 2019 files predate torch's zip format
    model, pca = load_checkpoint(path)
    c = model.config
    assert (c.backbone, c.head, c.descriptor_dim) == ("resnet50", "apgem", 32)
    assert (c.resize, c.multiple) == ("native", 1) and c.mean == (0.485, 0.456, 0.406)
    assert pca is not None and (pca.in_dim, pca.out_dim) == (32, 32)
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = torch.from_numpy(pca.transform(F.normalize(model(images), dim=1).numpy()))
        expected = restated_apgem(state, resnet50, images, pca_obj)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
    img = Image.fromarray((torch.rand(50, 70, 3) * 255).byte().numpy())
    assert tuple(preprocess(img, c.preprocess).shape) == (3, 50, 70)  # native size


def test_apgem_plain_state_dict_without_whitening(tmp_path, resnet50):
    state = apgem_state(resnet50)
    path = tmp_path / "apgem.pth"
    torch.save(state, path)
    model, pca = load_checkpoint(path)
    assert pca is None
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(8)) * 255
    with torch.no_grad():
        mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        expected = restated_apgem(state, resnet50, (pixels / 255 - mean) / std)
    torch.testing.assert_close(forward_batch(model, pixels), expected, atol=2e-5, rtol=0)


def test_apgem_resnet101_layout_detected_from_shapes():
    with torch.device("meta"):
        state = {k: v for k, v in torchvision.models.resnet101().state_dict().items() if not k.startswith("fc.")}
        state |= {"fc.weight": torch.empty(2048, 2048), "fc.bias": torch.empty(2048), "adpool.p": torch.empty(1)}
    converted = apgem.convert_apgem(state, Path("not-a-file.pt"), {})
    assert converted.config["backbone"] == "resnet101" and converted.config["descriptor_dim"] == 2048
    assert apgem.detect_apgem(state) and not sfrs.detect_sfrs(state)


def test_apgem_wrong_files(tmp_path, resnet50):
    state = apgem_state(resnet50)
    path = tmp_path / "apgem.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4.2.")}, path)
    with pytest.raises(CheckpointError, match="AP-GeM.*trunk"):
        load_checkpoint(path)
    torch.save({**state, "fc.weight": state["fc.weight"][:, :100]}, path)
    with pytest.raises(CheckpointError, match="AP-GeM.*FC shapes"):
        load_checkpoint(path)
    torch.save({"model_options": {"pooling": "max"}, "state_dict": state}, path)
    with pytest.raises(CheckpointError, match="dirtorch model with options"):
        load_checkpoint(path)
