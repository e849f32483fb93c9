"""MixVPR and DINO-Mix files (amaralibey/MixVPR, GaoShuang98/DINO-Mix) load strictly and give the
feature-mixer's descriptors, restated here from the paper; their preprocessing is stored in the config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import truncated_load_error
from vpr.data.images import preprocess
from vpr.errors import CheckpointError, UsageError
from vpr.models.methods import mixvpr
from vpr.models.checkpoints import load_checkpoint
from vpr.models.inference import forward_batch
from vpr.models.model import ModelConfig, VPRModel
from vpr.models.vit import DinoV2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def mixer_state(gen: torch.Generator, channels: int, side: int, out_channels: int, out_rows: int, depth: int) -> dict:
    """MixVPR's `aggregator.*` tensors with random values (LayerNorms and biases away from their init)."""
    hw = side * side
    state = {}
    for i in range(depth):
        p = f"aggregator.mix.{i}.mix."
        state |= {p + "0.weight": torch.rand(hw, generator=gen) + 0.5, p + "0.bias": torch.randn(hw, generator=gen) * 0.2,
                  p + "1.weight": torch.randn(hw, hw, generator=gen) * 0.3, p + "1.bias": torch.randn(hw, generator=gen) * 0.1,
                  p + "3.weight": torch.randn(hw, hw, generator=gen) * 0.3, p + "3.bias": torch.randn(hw, generator=gen) * 0.1}
    state |= {"aggregator.channel_proj.weight": torch.randn(out_channels, channels, generator=gen) * 0.05,
              "aggregator.channel_proj.bias": torch.randn(out_channels, generator=gen) * 0.1,
              "aggregator.row_proj.weight": torch.randn(out_rows, hw, generator=gen) * 0.3,
              "aggregator.row_proj.bias": torch.randn(out_rows, generator=gen) * 0.1}
    return state


def restated_mixer(state: dict, x: torch.Tensor, depth: int) -> torch.Tensor:
    """The paper: X <- X + W2 ReLU(W1 LN(X)) over the flattened map (L times), then W_d X^T, then W_r, L2."""
    x = x.flatten(2)
    for i in range(depth):
        p = f"aggregator.mix.{i}.mix."
        h = F.layer_norm(x, x.shape[-1:], state[p + "0.weight"], state[p + "0.bias"])
        x = x + F.linear(F.relu(F.linear(h, state[p + "1.weight"], state[p + "1.bias"])), state[p + "3.weight"], state[p + "3.bias"])
    z = F.linear(x.transpose(1, 2), state["aggregator.channel_proj.weight"], state["aggregator.channel_proj.bias"])
    o = F.linear(z.transpose(1, 2), state["aggregator.row_proj.weight"], state["aggregator.row_proj.bias"])
    return F.normalize(o.flatten(1), dim=1)


def trunk_to_layer3(resnet: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(images))))
    return resnet.layer3(resnet.layer2(resnet.layer1(x)))


def mixvpr_file(tmp_path, resnet50, name="resnet50_MixVPR_4096_channels(1024)_rows(4).ckpt"):
    """A small MixVPR file as the authors save it: a plain state dict, ResNet-50 without layer4 and fc."""
    state = {f"backbone.model.{k}": v for k, v in resnet50.state_dict().items() if not k.startswith(("layer4.", "fc."))}
    state |= mixer_state(torch.Generator().manual_seed(2), 1024, 4, 8, 3, 2)  # 64x64 input -> 4x4 map
    path = tmp_path / name
    torch.save(state, path)
    return path, state


def test_mixvpr_file_loads_strictly_and_gives_the_papers_descriptor(tmp_path, resnet50):
    path, state = mixvpr_file(tmp_path, resnet50)
    model, pca = load_checkpoint(path)
    c = model.config
    assert pca is None and (c.backbone, c.layer, c.head) == ("resnet50", 3, "mixvpr")
    assert c.head_options == {"in_h": 4, "in_w": 4, "out_channels": 8, "out_rows": 3, "mix_depth": 2, "mlp_ratio": 1.0}
    assert c.descriptor_dim == 24 and c.input_size == (64, 64)
    assert (c.resize, c.multiple, c.interpolation, c.resampler) == ("fixed", 1, "bilinear", "torch")
    # strict: every tensor of the file is used, and the model has no weight the file lacks
    converted = mixvpr.convert_mixvpr(state, path, {})
    with torch.device("meta"):
        fresh = VPRModel(ModelConfig(**converted.config))
    assert set(converted.weights) == set(fresh.state_dict()) and len(converted.weights) == len(state)

    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = restated_mixer(state, trunk_to_layer3(resnet50, images), 2)
        ours = model(images)
    assert ours.shape == (2, 24)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert torch.allclose(ours.norm(dim=1), torch.ones(2))


def test_mixvpr_preprocessing_is_the_reference_tools_resize(tmp_path, resnet50):
    path, _ = mixvpr_file(tmp_path, resnet50)
    model, _ = load_checkpoint(path)
    img = Image.new("RGB", (50, 30), (200, 30, 90))
    pixels = preprocess(img, model.config.preprocess)
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 64, 64)
    descriptors = forward_batch(model, pixels[None])
    assert descriptors.shape == (1, 24) and torch.allclose(descriptors.norm(dim=1), torch.ones(1))
    with pytest.raises(UsageError, match="4x4 feature map"):
        model(torch.zeros(1, 3, 96, 96))  # a --resize override the mixer cannot take


def test_default_mixvpr_head_is_the_published_4096(resnet50):
    config = ModelConfig(backbone="resnet50", layer=3, head="mixvpr", input_size=(320, 320))
    with torch.device("meta"):
        head = VPRModel(config).head
    assert config.descriptor_dim == 4096 and len(head.mix) == 4
    assert head.channel_proj.weight.shape == (1024, 1024) and head.row_proj.weight.shape == (4, 400)


def test_damaged_mixvpr_files_name_the_method(tmp_path, resnet50):
    path, state = mixvpr_file(tmp_path, resnet50)
    assert "MixVPR" in truncated_load_error(path, tmp_path / "resnet50_MixVPR_512_channels(256)_rows(2).ckpt")
    broken = tmp_path / "broken.ckpt"
    torch.save({k: v for k, v in state.items() if not k.startswith("aggregator.mix.")}, broken)
    with pytest.raises(CheckpointError, match="not a MixVPR checkpoint: missing aggregator.mix.0"):
        load_checkpoint(broken)
    torch.save({k: v for k, v in state.items() if k != "backbone.model.layer2.1.bn2.weight"}, broken)
    with pytest.raises(CheckpointError, match="mixvpr") as info:
        load_checkpoint(broken)
    assert "\n" not in str(info.value)


def test_dinomix_lightning_file_loads_strictly_and_mixes_unnormalised_patch_tokens(tmp_path):
    """DINO-Mix: DINOv2 patch tokens without the final LayerNorm (the authors empty it), then MixVPR.
    Small: ViT-S/14 with two blocks and a 28x28 input (2x2 patches)."""
    torch.manual_seed(3)
    vit = DinoV2("dinov2_vits14", blocks=2, final_norm=False).eval()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name.endswith("bias") or name in ("pos_embed", "cls_token"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    state = {f"backbone.dino_model.{k}": v for k, v in vit.state_dict().items()}
    state |= mixer_state(gen, 384, 2, 6, 2, 2)
    path = tmp_path / "dinov2_vitb14_mix.ckpt"
    torch.save({"epoch": 3, "global_step": 10, "state_dict": state}, path)

    model, _ = load_checkpoint(path)
    c = model.config
    assert (c.backbone, c.head, c.backbone_options) == ("dinov2_vits14", "mixvpr", {"final_norm": False, "blocks": 2})
    assert c.input_size == (28, 28) and c.descriptor_dim == 12 and c.resampler == "torch" and c.multiple == 1
    converted = mixvpr.convert_dinomix(state, path, {})
    with torch.device("meta"):
        fresh = VPRModel(ModelConfig(**converted.config))
    assert set(converted.weights) == set(fresh.state_dict()) and len(converted.weights) == len(state)

    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = restated_mixer(state, vit(images)[0], 2)
        ours = model(images)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert preprocess(Image.new("RGB", (40, 20)), c.preprocess).shape == (3, 28, 28)


def test_published_mixvpr_and_dinomix_files_are_listed():
    files = [entry.file for layout in mixvpr.LAYOUTS for entry in layout.published]
    assert "resnet50_MixVPR_4096_channels(1024)_rows(4).ckpt" in files and "dinov2_vitb14_mix.ckpt" in files


def test_a_mixvpr_file_without_its_projections_is_still_named(tmp_path, resnet50):
    path, state = mixvpr_file(tmp_path, resnet50)
    torch.save({k: v for k, v in state.items() if not k.startswith("aggregator.channel_proj.")}, path)
    with pytest.raises(CheckpointError, match="not a MixVPR checkpoint: missing aggregator.channel_proj.weight"):
        load_checkpoint(path)
