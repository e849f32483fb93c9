"""CricaVPR files (Lu-Feng/CricaVPR's CricaVPR.pth) load strictly and give the paper's descriptor,
restated here: DINOv2 blocks with the multi-scale conv adapter, CLS + 13 GeM regions, and the
cross-image encoder (per image by default, over the batch on request); preprocessing is stored."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import perturb_weights, restated_encoder, truncated_load_error
from vpr.data.images import preprocess
from vpr.errors import CheckpointError, UsageError
from vpr.models.methods import cricavpr
from vpr.models.checkpoints import load_checkpoint
from vpr.models.inference import forward_batch
from vpr.models.model import ModelConfig, VPRModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BLOCKS = 2  # a ViT-B/14 with 2 of its 12 blocks keeps the file small; the layout is otherwise CricaVPR.pth's


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A CricaVPR.pth as train.py saves it: DataParallel keys under model_state_dict, plus training fields."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    backbone = perturb_weights(cricavpr.CricaDinoV2("dinov2_vitb14", blocks=BLOCKS), gen)
    head = perturb_weights(cricavpr.CricaVPR(768), gen)
    with torch.no_grad():
        head.gem.p.fill_(3.4)
    state = {f"module.backbone.{k}": v for k, v in backbone.state_dict().items()}
    state["module.aggregation.1.p"] = head.gem.p.detach().clone()
    state |= {f"module.{k}": v for k, v in head.state_dict().items() if k.startswith("encoder.")}
    path = tmp_path_factory.mktemp("crica") / "CricaVPR.pth"
    torch.save({"epoch_num": 4, "model_state_dict": state, "best_r5": 95.0, "not_improved_num": 0}, path)
    return path, {k.removeprefix("module."): v for k, v in state.items()}


def restated_adapter(state: dict, p: str, t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Adapter(t) = W_up(u + [conv1x1 u; conv3x3 conv1x1 u; conv5x5 conv1x1 u]), u = ReLU(W_down t), CLS passing as u."""
    def unit(x, q, pad):  # conv + BN(eps 1e-3, running statistics) + ReLU
        x = F.conv2d(x, state[q + "conv.weight"], state[q + "conv.bias"], padding=pad)
        return F.relu(F.batch_norm(x, state[q + "bn.running_mean"], state[q + "bn.running_var"],
                                   state[q + "bn.weight"], state[q + "bn.bias"], False, 0.0, 1e-3))
    u = F.relu(F.linear(t, state[p + "D_fc1.weight"], state[p + "D_fc1.bias"]))
    grid = u[:, 1:].reshape(u.shape[0], rows, cols, -1).permute(0, 3, 1, 2)
    conv = torch.cat([unit(grid, p + "branch1.", 0), unit(unit(grid, p + "branch2.0.", 0), p + "branch2.1.", 1),
                      unit(unit(grid, p + "branch3.0.", 0), p + "branch3.1.", 2)], dim=1)
    conv = conv.flatten(2).transpose(1, 2)
    return F.linear(torch.cat([u[:, :1], conv], dim=1) + u, state[p + "D_fc2.weight"], state[p + "D_fc2.bias"])


def restated_head(state: dict, patches: torch.Tensor, cls: torch.Tensor, batch_mode: bool) -> torch.Tensor:
    """CLS + GeM of the 2x2 (0:8 | 8:) and 3x3 (0:5 | 5:11 | 11:) regions of the L2-normalised map, encoder, L2."""
    p = state["aggregation.1.p"]
    x = F.normalize(patches, dim=1)
    gem = lambda r: r.clamp(min=1e-6).pow(p).mean(dim=(-2, -1)).pow(1 / p)
    cuts2, cuts3 = ((0, 8), (8, 16)), ((0, 5), (5, 11), (11, 16))
    tokens = [cls] + [gem(x[:, :, a:b, c:d]) for cuts in (cuts2, cuts3) for a, b in cuts for c, d in cuts]
    tokens = torch.stack(tokens, dim=1)  # B x 14 x C
    if batch_mode:  # the authors' batch_first=False: the images of the batch are the sequence
        encoded = restated_encoder(state, tokens)
    else:
        encoded = torch.cat([restated_encoder(state, t[None]) for t in tokens])
    return F.normalize(encoded.flatten(1), dim=1)


def test_cricavpr_file_loads_strictly_and_gives_the_papers_descriptor(published):
    path, state = published
    model, pca = load_checkpoint(path)
    c = model.config
    assert pca is None and (c.backbone, c.head) == (cricavpr.BACKBONE, "cricavpr")
    assert c.backbone_options == {"blocks": BLOCKS} and c.head_options["cross_image"] == "single"
    assert c.descriptor_dim == 10752 and c.input_size == (224, 224)
    assert (c.resize, c.multiple, c.interpolation, c.resampler) == ("fixed", 1, "bilinear", "torch")
    converted = cricavpr.convert(state, path, {})
    with torch.device("meta"):
        fresh = VPRModel(ModelConfig(**converted.config))
    assert set(converted.weights) == set(fresh.state_dict()) and len(converted.weights) == len(state)

    images = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        patches, cls = model.backbone(images)
        ours = model(images)
        expected = restated_head(state, patches, cls, batch_mode=False)
        model.head.cross_image = "batch"
        ours_batched = model(images)
        model.head.cross_image = "single"
    assert ours.shape == (3, 10752) and torch.allclose(ours.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_batched, restated_head(state, patches, cls, batch_mode=True), atol=1e-5, rtol=0)
    assert (ours_batched - ours).abs().max() > 1e-3  # the batched encoder really mixes images
    with torch.no_grad():  # per image by default: a descriptor does not depend on its batch
        torch.testing.assert_close(model(images[1:2]), ours[1:2], atol=1e-5, rtol=0)


def test_cricavpr_blocks_add_the_adapter_inside_the_mlp_layer_scale(published):
    path, state = published
    model, _ = load_checkpoint(path)
    block = model.backbone.blocks[1]
    x = torch.randn(2, 1 + 4 * 5, 768)
    block.adapter.grid = (4, 5)
    p = "backbone.blocks.1."
    with torch.no_grad():
        x1 = x + state[p + "ls1.gamma"] * block.attn(block.norm1(x))
        y = F.layer_norm(x1, (768,), state[p + "norm2.weight"], state[p + "norm2.bias"], eps=1e-6)
        mlp = F.linear(F.gelu(F.linear(y, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"])),
                       state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
        expected = x1 + state[p + "ls2.gamma"] * (mlp + 0.2 * restated_adapter(state, p + "adapter.", y, 4, 5))
        torch.testing.assert_close(block(x), expected, atol=1e-4, rtol=1e-4)


def test_cricavpr_preprocessing_is_the_reference_tools_resize(published):
    path, _ = published
    model, _ = load_checkpoint(path)
    pixels = preprocess(Image.new("RGB", (50, 30), (200, 30, 90)), model.config.preprocess)
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 224, 224)
    descriptors = forward_batch(model, pixels[None])
    assert descriptors.shape == (1, 10752) and torch.allclose(descriptors.norm(dim=1), torch.ones(1))
    with pytest.raises(UsageError, match="16x16 patch grid"):
        model(torch.zeros(1, 3, 112, 112))  # a --resize the fixed regions cannot take


def test_default_cricavpr_head_is_the_published_one():
    config = ModelConfig(backbone=cricavpr.BACKBONE, head="cricavpr", input_size=(224, 224))
    with torch.device("meta"):
        model = VPRModel(config)
    assert config.descriptor_dim == 10752 and len(model.backbone.blocks) == 12
    assert len(model.head.encoder.layers) == 2 and model.head.cross_image == "single"
    assert model.backbone.blocks[0].adapter.branch3[1].conv.weight.shape == (96, 24, 5, 5)
    with pytest.raises(UsageError, match="cross_image"), torch.device("meta"):
        VPRModel(ModelConfig(backbone=cricavpr.BACKBONE, head="cricavpr", head_options={"cross_image": "all"}))


def test_damaged_cricavpr_files_name_the_method(tmp_path, published):
    path, state = published
    assert "CricaVPR" in truncated_load_error(path, tmp_path / "CricaVPR.pth", path.stat().st_size // 3)
    broken = tmp_path / "broken.pth"
    torch.save({"model_state_dict": {k: v for k, v in state.items() if k != "aggregation.1.p"}}, broken)
    with pytest.raises(CheckpointError, match="not a CricaVPR checkpoint: missing aggregation.1.p"):
        load_checkpoint(broken)


def test_published_cricavpr_file_is_listed():
    (layout,) = cricavpr.LAYOUTS
    assert [entry.file for entry in layout.published] == ["CricaVPR.pth"]
    assert layout.published[0].url.startswith("https://github.com/Lu-Feng/CricaVPR/releases/")
