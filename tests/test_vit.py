"""DINOv2 backbones: the authors' key names (so their files load strictly), DINOv2's position-embedding
interpolation (offset, bicubic, no antialias), and the facets AnyLoc reads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vpr.models.statedict import dinov2_keys
from vpr.models.vit import DinoV2, interpolate_pos_embed


def small_vit(**options) -> DinoV2:
    torch.manual_seed(0)
    vit = DinoV2("dinov2_vits14", blocks=2, **options).eval()
    with torch.no_grad():  # random layer scales and position embeddings: every part matters
        for name, param in vit.named_parameters():
            if name.endswith("gamma") or name == "pos_embed":
                param.normal_(0.0, 0.5)
    return vit


def test_key_names_are_dinov2s():
    keys = set(DinoV2("dinov2_vits14", blocks=1).state_dict())
    assert {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "norm.weight",
            "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.ls1.gamma",
            "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "blocks.0.ls2.gamma"} <= keys


def test_vit_g_takes_dinov2s_swiglu_weights():
    """DINOv2's ViT-G SwiGLU is w12 (1536 -> 2 x 4096) and w3 (4096 -> 1536): timm's packed fc1/fc2."""
    with torch.device("meta"):
        vit = DinoV2("dinov2_vitg14", blocks=1)
    shapes = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    published = {"blocks.0.mlp.w12.weight": (8192, 1536), "blocks.0.mlp.w3.weight": (1536, 4096)}
    assert {k: shapes[k] for k in dinov2_keys(published)} == {"blocks.0.mlp.fc1.weight": (8192, 1536),
                                                              "blocks.0.mlp.fc2.weight": (1536, 4096)}


def test_position_embeddings_at_518_are_the_stored_ones():
    pos = torch.randn(1, 1 + 37 * 37, 8)
    assert interpolate_pos_embed(pos, 518, 518) is pos


@pytest.mark.parametrize(("height", "width"), [(224, 224), (322, 434), (434, 322)])
def test_position_embeddings_follow_dinov2s_offset_rule(height, width):
    """Restated: bicubic on the 37 x 37 grid with scale factors ((H/14 + 0.1) / 37, (W/14 + 0.1) / 37)."""
    pos = torch.randn(1, 1 + 37 * 37, 8, generator=torch.Generator().manual_seed(1))
    h0, w0 = height // 14, width // 14
    grid = pos[:, 1:].reshape(1, 37, 37, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, scale_factor=((h0 + 0.1) / 37, (w0 + 0.1) / 37), mode="bicubic", antialias=False)
    expected = torch.cat([pos[:, :1], expected.permute(0, 2, 3, 1).reshape(1, h0 * w0, 8)], dim=1)
    ours = interpolate_pos_embed(pos, height, width)
    assert torch.equal(ours, expected)
    by_size = F.interpolate(grid, size=(h0, w0), mode="bicubic", antialias=False)  # without the offset
    assert not torch.allclose(ours[:, 1:], by_size.permute(0, 2, 3, 1).reshape(1, h0 * w0, 8), atol=1e-4)


def test_forward_gives_a_patch_map_and_the_cls_token_and_tells_patch_positions_apart():
    vit = small_vit()
    image = torch.randn(1, 3, 56, 84)
    patches, cls = vit(image)
    assert patches.shape == (1, 384, 4, 6) and cls.shape == (1, 384)
    transposed, _ = vit(image.transpose(2, 3).contiguous())  # same pixels, other layout: other positions
    assert transposed.shape == (1, 384, 6, 4)
    assert not torch.allclose(patches, transposed.transpose(2, 3), atol=1e-3)


def test_the_value_facet_is_the_last_blocks_qkv_projection():
    vit = small_vit(facet="value")
    full = small_vit()
    image = torch.randn(2, 3, 42, 42)
    values, cls = vit(image)
    with torch.no_grad():
        x = full.patch_embed(image)
        x = torch.cat([full.cls_token.expand(2, -1, -1), x], dim=1) + interpolate_pos_embed(full.pos_embed, 42, 42)
        x = full.blocks[0](x)
        v = full.blocks[1].attn.qkv(full.blocks[1].norm1(x))[..., 2 * 384:]
    assert torch.allclose(values.flatten(2).transpose(1, 2), v[:, 1:], atol=1e-6) and torch.allclose(cls, v[:, 0], atol=1e-6)
    assert math.isclose(float(vit.norm(torch.ones(1, 384)).sum()), 384.0)  # no final LayerNorm on a facet


def test_fast_paths_run_on_a_vit_fused_attention_and_bf16():
    """Attention goes through PyTorch's scaled_dot_product_attention; bf16 autocast keeps the descriptor."""
    from vpr.models.inference import forward_batch, inference_model
    from vpr.models.model import ModelConfig, build_model

    config = ModelConfig(backbone="dinov2_vits14", backbone_options={"blocks": 2}, head="salad",
                         head_options={"num_clusters": 4, "cluster_dim": 8, "token_dim": 8, "mlp_dim": 16},
                         input_size=(56, 56), multiple=14, resampler="torch")
    model = inference_model(build_model(config, seed=0), torch.device("cpu"))
    assert all(block.attn.fused_attn for block in model.backbone.blocks)
    batch = torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fp32 = forward_batch(model, batch)
    bf16 = forward_batch(model, batch, torch.bfloat16)
    assert fp32.shape == (2, config.descriptor_dim) and bf16.dtype == torch.float32
    assert float(torch.nn.functional.cosine_similarity(fp32, bf16).min()) > 0.99


def test_an_input_that_is_not_whole_patches_is_refused_with_the_size_to_use():
    from vpr.errors import UsageError

    with pytest.raises(UsageError, match="50x56 input is not a multiple of 14.*42x56"):
        small_vit()(torch.randn(1, 3, 50, 56))


def test_a_cnn_head_on_a_vit_is_a_usage_error_naming_the_heads_that_fit():
    from vpr.errors import UsageError
    from vpr.models.model import ModelConfig

    with pytest.raises(UsageError, match="cosplace head pools a CNN feature map.*salad"):
        ModelConfig(backbone="dinov2_vitb14", head="cosplace")
