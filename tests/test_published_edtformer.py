"""EDTformer files (Tong-Jin01/EDTformer's EDTformer.pth) load strictly and give the paper's descriptor,
restated here: DINOv2 with parallel side adapters, learnt queries through simplified decoder blocks,
channel and row projections; the 322x322 preprocessing is stored."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import perturb_weights, truncated_load_error
from vpr.data.images import preprocess
from vpr.errors import CheckpointError
from vpr.models.methods import edtformer
from vpr.models.checkpoints import load_checkpoint
from vpr.models.inference import forward_batch
from vpr.models.model import ModelConfig, VPRModel
from vpr.models.vit import DinoV2, interpolate_pos_embed

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BLOCKS = 2
SCALED = ("qkv.weight", "in_proj_weight", "D_fc1.weight")  # attention and the adapters' down-projections x4


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    backbone = perturb_weights(edtformer.EDTformerDinoV2("dinov2_vitb14", blocks=BLOCKS), gen, SCALED)
    head = perturb_weights(edtformer.EDTformer(768, queries=8, out_channels=16, out_rows=4), gen, SCALED)
    state = {f"module.backbone.{k}": v for k, v in backbone.state_dict().items()}
    state |= {f"module.{k}": v for k, v in head.state_dict().items()}
    path = tmp_path_factory.mktemp("edt") / "EDTformer.pth"
    torch.save({"epoch_num": 1, "model_state_dict": state}, path)
    return path, {k.removeprefix("module."): v for k, v in state.items()}


def mha(state: dict, p: str, q: torch.Tensor, kv: torch.Tensor, heads: int = 16) -> torch.Tensor:
    """Multi-head attention (batch first) from nn.MultiheadAttention's packed in_proj."""
    w, b = state[p + "in_proj_weight"].chunk(3), state[p + "in_proj_bias"].chunk(3)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
    qh, kh, vh = split(F.linear(q, w[0], b[0])), split(F.linear(kv, w[1], b[1])), split(F.linear(kv, w[2], b[2]))
    att = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1]), dim=-1) @ vh
    return F.linear(att.transpose(1, 2).flatten(2), state[p + "out_proj.weight"], state[p + "out_proj.bias"])


def restated(state: dict, images: torch.Tensor) -> torch.Tensor:
    """y_l = A_l(y_{l-1} + x_l), T = LN(y_L); M = fc(T); Q <- LN1(Q + SA(Q)), Q <- LN2(Q + CA(Q, M)); W_r (W_c Q)^T."""
    vit = DinoV2("dinov2_vitb14", blocks=BLOCKS, final_norm=False).eval()
    vit.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("backbone.")
                         and not k.startswith(("backbone.adapters.", "backbone.norm."))})
    n, _, h, w = images.shape
    x = torch.cat([vit.cls_token.expand(n, -1, -1), vit.patch_embed(images)], dim=1)
    x = x + interpolate_pos_embed(vit.pos_embed, h, w)
    y = x
    for i, block in enumerate(vit.blocks):
        x = block(x)
        z = y + x
        a = f"backbone.adapters.{i}."
        y = z + 0.5 * F.linear(F.gelu(F.linear(z, state[a + "D_fc1.weight"], state[a + "D_fc1.bias"])),
                               state[a + "D_fc2.weight"], state[a + "D_fc2.bias"])
    t = F.layer_norm(y, (768,), state["backbone.norm.weight"], state["backbone.norm.bias"], eps=1e-6)
    m = F.linear(t, state["fc.weight"], state["fc.bias"])
    q = state["queries"].expand(n, -1, -1)
    for i in range(2):
        p = f"decoder.layers.{i}."
        q = F.layer_norm(q + mha(state, p + "self_attn.", q, q), (768,), state[p + "norm1.weight"], state[p + "norm1.bias"])
        q = F.layer_norm(q + mha(state, p + "multihead_attn.", q, m), (768,), state[p + "norm2.weight"], state[p + "norm2.bias"])
    o = F.linear(F.linear(q, state["channel_proj.weight"], state["channel_proj.bias"]).transpose(1, 2),
                 state["row_proj.weight"], state["row_proj.bias"])
    return F.normalize(o.flatten(1), dim=1)


def test_edtformer_file_loads_strictly_and_gives_the_papers_descriptor(published):
    path, state = published
    model, pca = load_checkpoint(path)
    c = model.config
    assert pca is None and (c.backbone, c.head, c.backbone_options) == (edtformer.BACKBONE, "edtformer", {"blocks": BLOCKS})
    assert c.head_options == {"queries": 8, "heads": 16, "layers": 2, "out_channels": 16, "out_rows": 4}
    assert c.descriptor_dim == 64 and c.input_size == (322, 322)
    assert (c.resize, c.multiple, c.interpolation, c.resampler) == ("fixed", 14, "bilinear", "torch")
    converted = edtformer.convert(state, path, {})
    with torch.device("meta"):
        fresh = VPRModel(ModelConfig(**converted.config))
    assert set(converted.weights) == set(fresh.state_dict()) and len(converted.weights) == len(state)
    images = torch.randn(2, 3, 42, 56)
    with torch.no_grad():
        ours = model(images)
        torch.testing.assert_close(ours, restated(state, images), atol=1e-5, rtol=0)
    assert ours.shape == (2, 64) and torch.allclose(ours.norm(dim=1), torch.ones(2))
    pixels = preprocess(Image.new("RGB", (50, 30), (20, 130, 90)), c.preprocess)
    assert pixels.shape == (3, 322, 322) and forward_batch(model, pixels[None]).shape == (1, 64)


def test_default_edtformer_head_is_the_published_4096():
    config = ModelConfig(backbone=edtformer.BACKBONE, head="edtformer", input_size=(322, 322), multiple=14)
    with torch.device("meta"):
        model = VPRModel(config)
    assert config.descriptor_dim == 4096 and model.head.queries.shape == (1, 64, 768)
    assert len(model.backbone.adapters) == 12 and model.backbone.adapters[0].D_fc1.weight.shape == (4, 768)


def test_damaged_edtformer_files_name_the_method(tmp_path, published):
    path, state = published
    assert "EDTformer" in truncated_load_error(path, tmp_path / "EDTformer.pth")
    broken = tmp_path / "broken.pth"
    torch.save({"model_state_dict": {k: v for k, v in state.items() if k != "row_proj.weight"}}, broken)
    with pytest.raises(CheckpointError, match="not a EDTformer checkpoint: missing row_proj.weight"):
        load_checkpoint(broken)
