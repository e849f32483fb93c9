"""Models as in the papers: backbone -> head -> L2; checkpoints that rebuild them safely."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vpr.errors import CheckpointError, UsageError
from vpr.models.backbones import build_backbone
from vpr.models.checkpoints import load_checkpoint, save_checkpoint
from vpr.models.heads import GeM, NetVLAD
from vpr.models.model import ModelConfig, build_model
from vpr.models.pca import fit_pca


@pytest.mark.parametrize("name,layer,channels", [("resnet18", 4, 512), ("resnet18", 3, 256), ("resnet50", 4, 2048), ("vgg16", 4, 512)])
def test_backbones_output_the_documented_feature_maps(name, layer, channels):
    torch.manual_seed(0)
    features = build_backbone(name, layer).eval()(torch.rand(1, 3, 64, 64))
    stride = {("resnet18", 3): 16, ("vgg16", 4): 16}.get((name, layer), 32)
    assert features.shape == (1, channels, 64 // stride, 64 // stride)


def test_unknown_backbone_and_bad_layer_are_usage_errors():
    with pytest.raises(UsageError, match="resnet18"):
        ModelConfig(backbone="alexnet")
    with pytest.raises(UsageError, match="layer"):
        ModelConfig(backbone="vgg16", layer=3)


def test_gem_matches_its_formula():
    x = torch.rand(2, 3, 4, 5) + 0.1
    expected = x.pow(3).mean(dim=(2, 3)).pow(1 / 3)
    assert torch.allclose(GeM(p=3.0)(x), expected, atol=1e-6)


@pytest.mark.parametrize("head,dim", [("cosplace", 128), ("netvlad", 8 * 512)])
def test_heads_give_unit_descriptors_of_the_configured_size(head, dim):
    model = build_model(ModelConfig(head=head, descriptor_dim=128, num_clusters=8, input_size=(48, 64)))
    with torch.no_grad():
        out = model(torch.rand(3, 3, 48, 64))
    assert out.shape == (3, dim) and model.config.descriptor_dim == dim
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)


def test_netvlad_equals_the_paper_sum_over_residuals():
    torch.manual_seed(0)
    layer = NetVLAD(in_channels=6, num_clusters=3, alpha=2.0)
    x = torch.rand(2, 6, 4, 5)
    xn = F.normalize(x, dim=1).flatten(2)  # N x C x HW
    a = F.softmax(torch.einsum("kc,nci->nki", layer.conv.weight[:, :, 0, 0], xn) + layer.conv.bias[None, :, None], dim=1)
    expected = torch.stack([
        torch.stack([sum(a[n, k, i] * (xn[n, :, i] - layer.centroids[k]) for i in range(xn.shape[2])) for k in range(3)])
        for n in range(2)
    ])
    expected = F.normalize(F.normalize(expected, dim=2).flatten(1), dim=1)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_checkpoint_rebuilds_the_same_model_and_pca(tmp_path, tiny_model):
    images = torch.rand(2, 3, 48, 64)
    pca = fit_pca(torch.rand(80, 64).numpy(), 16, whiten=True)
    path = save_checkpoint(tiny_model, tmp_path / "m.pt", pca=pca)
    model, loaded_pca = load_checkpoint(path)
    assert model.config == tiny_model.config
    with torch.no_grad():
        assert torch.equal(model(images), tiny_model(images))
    assert (loaded_pca.components == pca.components).all() and loaded_pca.whiten


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_with_an_arbitrary_pickle_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format": "vpr-checkpoint", "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_checkpoint(path)
    assert "pwned" not in capsys.readouterr().out


def test_missing_and_foreign_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


def test_offline_pretrained_weights_give_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        build_backbone("resnet18", pretrained=tmp_path / "missing.pth")


def test_pca_fits_the_data_and_a_large_sample_gives_the_same_projection():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(64, 64)))[0][:, :8]  # an 8-d subspace of 64-d space
    data = (rng.normal(size=(5000, 8)) * np.arange(8, 0, -1)) @ basis.T + 0.01 * rng.normal(size=(5000, 64))
    data = data.astype(np.float32)
    full = fit_pca(data, 8)
    sampled = fit_pca(data, 8, max_samples=2000)
    projected = np.linalg.norm(full.components @ basis, axis=1)
    assert projected.min() > 0.999  # every component lies in the data's subspace
    agreement = np.abs(np.sum(full.transform(data[:200]) * sampled.transform(data[:200]), axis=1))
    assert agreement.min() > 0.99
    wide = fit_pca(data[:40], 16, whiten=True)  # fewer rows than dimensions: the SVD path
    assert wide.components.shape == (16, 64) and np.all(np.isfinite(wide.scale))


def test_pca_equals_scikit_learns():
    """The chunked covariance path gives scikit-learn's PCA: mean, components (signs included), variances."""
    from sklearn.decomposition import PCA as SklearnPCA

    rng = np.random.default_rng(1)
    data = (rng.normal(size=(3000, 48)) * np.linspace(3, 0.1, 48)).astype(np.float32)
    ours = fit_pca(data, 12, whiten=True)
    theirs = SklearnPCA(n_components=12, whiten=True, svd_solver="covariance_eigh").fit(data)
    np.testing.assert_allclose(ours.mean, theirs.mean_, atol=1e-5)
    np.testing.assert_allclose(ours.components, theirs.components_, atol=1e-4)
    np.testing.assert_allclose(1.0 / ours.scale ** 2, theirs.explained_variance_, rtol=1e-4)
