"""SuperVLAD files (Lu-Feng/SuperVLAD: SuperVLAD, SuperVLAD-CrossImage, 1-ClusterVLAD) load strictly and
give the paper's descriptor, restated here (centre-free VLAD with ghost clusters, then the cross-image
encoder per image or over the batch); their preprocessing (322x322, multiples of 14) is stored."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import perturb_weights, restated_encoder, truncated_load_error
from vpr.data.images import preprocess
from vpr.errors import CheckpointError
from vpr.models.methods import supervlad
from vpr.models.checkpoints import load_checkpoint
from vpr.models.inference import forward_batch
from vpr.models.model import ModelConfig, VPRModel
from vpr.models.vit import DinoV2

pytestmark = pytest.mark.usefixtures("one_torch_thread")
C = 384  # small: DINOv2 ViT-S/14 with two blocks


def supervlad_file(tmp_path, rows: int, layers: int, name: str):
    """A file as the authors' train.py saves it: DataParallel keys under model_state_dict."""
    torch.manual_seed(rows + layers)
    gen = torch.Generator().manual_seed(7)
    vit = perturb_weights(DinoV2("dinov2_vits14", blocks=2), gen)
    state = {f"module.backbone.{k}": v for k, v in vit.state_dict().items()}
    state["module.aggregation.conv.weight"] = torch.randn(rows, C, 1, 1, generator=gen) * 3.0
    if layers:
        layer = torch.nn.TransformerEncoderLayer(C, 16, 2048, activation="gelu", dropout=0.1)
        encoder = perturb_weights(torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False), gen)
        state |= {f"module.encoder.{k}": v for k, v in encoder.state_dict().items()}
    path = tmp_path / name
    torch.save({"epoch_num": 2, "model_state_dict": state, "best_r5": 90.0}, path)
    return path, {k.removeprefix("module."): v for k, v in state.items()}, vit


def restated(state: dict, patches: torch.Tensor, clusters: int, batch_mode: bool = False) -> torch.Tensor:
    """a = softmax_k(w_k . x_i) over K + G clusters; V_k = sum_i a_k x_i for the K real ones; intra-norm, L2."""
    x = F.normalize(patches.flatten(2), dim=1)  # B x C x N
    w = state["aggregation.conv.weight"][:, :, 0, 0]
    a = torch.softmax(torch.einsum("kc,bcn->bkn", w, x), dim=1)
    v = torch.stack([(a[:, k:k + 1] * x).sum(-1) for k in range(clusters)], dim=1)  # B x K x C
    v = F.normalize(F.normalize(v, dim=2).flatten(1), dim=1)
    if "encoder.layers.0.norm1.weight" not in state:
        return v
    tokens = v.reshape(len(v), clusters, -1)
    encoded = restated_encoder(state, tokens) if batch_mode else torch.cat([restated_encoder(state, t[None]) for t in tokens])
    return F.normalize(encoded.flatten(1), dim=1)


@pytest.mark.parametrize("rows, layers, name, head, clusters", [
    (5, 0, "SuperVLAD.pth", "supervlad", 4),
    (5, 2, "SuperVLAD-CrossImage.pth", "supervlad-crossimage", 4),
    (3, 0, "1-ClusterVLAD.pth", "supervlad", 1),
])
def test_supervlad_files_load_strictly_and_give_the_papers_descriptor(tmp_path, rows, layers, name, head, clusters):
    path, state, vit = supervlad_file(tmp_path, rows, layers, name)
    model, pca = load_checkpoint(path)
    c = model.config
    assert pca is None and (c.backbone, c.head, c.backbone_options) == ("dinov2_vits14", head, {"blocks": 2})
    assert (c.head_options["clusters"], c.head_options["ghost_clusters"]) == (clusters, rows - clusters)
    assert c.descriptor_dim == clusters * C and c.input_size == (322, 322)
    assert (c.resize, c.multiple, c.interpolation, c.resampler) == ("fixed", 14, "bilinear", "torch")
    converted = supervlad.convert(state, path, {})
    with torch.device("meta"):
        fresh = VPRModel(ModelConfig(**converted.config))
    assert set(converted.weights) == set(fresh.state_dict()) and len(converted.weights) == len(state)

    images = torch.randn(3, 3, 42, 56)
    with torch.no_grad():
        patches = vit(images)[0]
        ours = model(images)
        torch.testing.assert_close(ours, restated(state, patches, clusters), atol=1e-5, rtol=0)
        assert ours.shape == (3, clusters * C) and torch.allclose(ours.norm(dim=1), torch.ones(3))
        torch.testing.assert_close(model(images[2:]), ours[2:], atol=1e-5, rtol=0)  # batch-independent by default
        if layers:
            model.head.cross_image = "batch"  # the authors' batched encoder: descriptors mix across the batch
            batched = model(images)
            torch.testing.assert_close(batched, restated(state, patches, clusters, batch_mode=True), atol=1e-5, rtol=0)
            assert (batched - ours).abs().max() > 1e-3


def test_supervlad_preprocessing_is_the_reference_tools_resize(tmp_path):
    path, _, _ = supervlad_file(tmp_path, 5, 0, "SuperVLAD.pth")
    model, _ = load_checkpoint(path)
    pixels = preprocess(Image.new("RGB", (50, 30), (20, 130, 90)), model.config.preprocess)
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 322, 322)
    descriptors = forward_batch(model, pixels[None])
    assert descriptors.shape == (1, 4 * C) and torch.allclose(descriptors.norm(dim=1), torch.ones(1))


def test_default_supervlad_heads_are_the_published_ones():
    for head, layers in (("supervlad", 0), ("supervlad-crossimage", 2)):
        config = ModelConfig(backbone="dinov2_vitb14", head=head, input_size=(322, 322), multiple=14)
        with torch.device("meta"):
            model = VPRModel(config)
        assert config.descriptor_dim == 3072 and model.head.conv.weight.shape == (5, 768, 1, 1)
        assert (model.head.encoder is None) == (layers == 0)
        if layers:
            assert len(model.head.encoder.layers) == 2 and model.head.cross_image == "single"


def test_damaged_supervlad_files_name_the_method(tmp_path):
    path, state, _ = supervlad_file(tmp_path, 5, 0, "SuperVLAD.pth")
    assert "SuperVLAD" in truncated_load_error(path, tmp_path / "SuperVLAD-CrossImage.pth")
    broken = tmp_path / "broken.pth"
    torch.save({"model_state_dict": {k: v for k, v in state.items() if k != "backbone.patch_embed.proj.weight"}}, broken)
    with pytest.raises(CheckpointError, match="not a SuperVLAD checkpoint: missing backbone.patch_embed.proj.weight"):
        load_checkpoint(broken)
    torch.save({"model_state_dict": {**state, "aggregation.extra": torch.zeros(2)}}, broken)
    with pytest.raises(CheckpointError, match="SuperVLAD checkpoint with unexpected tensors: aggregation"):
        load_checkpoint(broken)


def test_published_supervlad_files_are_listed():
    (layout,) = supervlad.LAYOUTS
    assert [entry.file for entry in layout.published] == ["SuperVLAD.pth", "SuperVLAD-CrossImage.pth", "1-ClusterVLAD.pth"]
