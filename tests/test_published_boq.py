"""BoQ files (amaralibey/Bag-of-Queries release v1.0: ResNet-50 16384-d, DINOv2 ViT-B/14 12288-d) load
strictly and give the paper's descriptor, restated here with plain tensor algebra; the preprocessing
(384x384 / 322x322, torchvision's float resize) is stored in the config."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from vpr.data.images import preprocess
from vpr.errors import CheckpointError
from vpr.models.methods import boq
from vpr.models.checkpoints import load_checkpoint
from vpr.models.inference import forward_batch
from vpr.models.model import ModelConfig, VPRModel
from vpr.models.vit import DinoV2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def aggregator_state(gen: torch.Generator, channels: int, dim: int, queries: int, layers: int, rows: int) -> dict:
    """BoQ's `aggregator.*` tensors (the authors' module names) with random values, norms and biases off their init."""
    r = lambda *shape, s=1.0: torch.randn(*shape, generator=gen) * s  # noqa: E731
    u = lambda n: torch.rand(n, generator=gen) + 0.5  # noqa: E731
    state = {"aggregator.proj_c.weight": r(dim, channels, 3, 3, s=0.05), "aggregator.proj_c.bias": r(dim, s=0.1),
             "aggregator.norm_input.weight": u(dim), "aggregator.norm_input.bias": r(dim, s=0.1)}
    for i in range(layers):
        p = f"aggregator.boqs.{i}."
        for attn in ("encoder.self_attn.", "self_attn.", "cross_attn."):
            state |= {p + attn + "in_proj_weight": r(3 * dim, dim, s=dim ** -0.5), p + attn + "in_proj_bias": r(3 * dim, s=0.1),
                      p + attn + "out_proj.weight": r(dim, dim, s=dim ** -0.5), p + attn + "out_proj.bias": r(dim, s=0.1)}
        state |= {p + "encoder.linear1.weight": r(4 * dim, dim, s=dim ** -0.5), p + "encoder.linear1.bias": r(4 * dim, s=0.1),
                  p + "encoder.linear2.weight": r(dim, 4 * dim, s=(4 * dim) ** -0.5), p + "encoder.linear2.bias": r(dim, s=0.1)}
        for norm in ("encoder.norm1.", "encoder.norm2.", "norm_q.", "norm_out."):
            state |= {p + norm + "weight": u(dim), p + norm + "bias": r(dim, s=0.1)}
        state[p + "queries"] = r(1, queries, dim)
    state |= {"aggregator.fc.weight": r(rows, layers * queries, s=0.3), "aggregator.fc.bias": r(rows, s=0.1)}
    return state


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: dict, p: str, heads: int) -> torch.Tensor:
    """MHA(Q, K, V) = concat_h softmax(Q W_q^h (K W_k^h)^T / sqrt(d/h)) V W_v^h, then W_o."""
    w, b = state[p + "in_proj_weight"], state[p + "in_proj_bias"]
    d = q.shape[-1]
    split = lambda t: t.unflatten(-1, (heads, d // heads)).transpose(1, 2)  # noqa: E731  B x h x n x d/h
    qh, kh, vh = (split(F.linear(t, w[i * d:(i + 1) * d], b[i * d:(i + 1) * d])) for i, t in enumerate((q, k, v)))
    a = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    return F.linear((a @ vh).transpose(1, 2).flatten(2), state[p + "out_proj.weight"], state[p + "out_proj.bias"])


def restated_boq(state: dict, fmap: torch.Tensor, heads: int) -> torch.Tensor:
    """The paper: X = LN(conv3x3(F)); per block X <- Enc(X), Q~ = LN(Q + MHA(Q,Q,Q)), O = LN(MHA(Q~,X,X)); fc over [O]; L2."""
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], state[p + "weight"], state[p + "bias"])  # noqa: E731
    x = F.conv2d(fmap, state["aggregator.proj_c.weight"], state["aggregator.proj_c.bias"], padding=1)
    x = ln(x.flatten(2).transpose(1, 2), "aggregator.norm_input.")
    outs, i = [], 0
    while f"aggregator.boqs.{i}.queries" in state:
        p = f"aggregator.boqs.{i}."
        y = ln(x + attention(x, x, x, state, p + "encoder.self_attn.", heads), p + "encoder.norm1.")
        mlp = F.linear(F.relu(F.linear(y, state[p + "encoder.linear1.weight"], state[p + "encoder.linear1.bias"])),
                       state[p + "encoder.linear2.weight"], state[p + "encoder.linear2.bias"])
        x = ln(y + mlp, p + "encoder.norm2.")
        q = state[p + "queries"].expand(x.shape[0], -1, -1)
        q = ln(q + attention(q, q, q, state, p + "self_attn.", heads), p + "norm_q.")
        outs.append(ln(attention(q, x, x, state, p + "cross_attn.", heads), p + "norm_out."))
        i += 1
    o = F.linear(torch.cat(outs, dim=1).transpose(1, 2), state["aggregator.fc.weight"], state["aggregator.fc.bias"])
    return F.normalize(o.flatten(1), dim=1)


def resnet_file(tmp_path, resnet50, name="resnet50_16384.pth"):
    """A small BoQ ResNet file as the authors save it: backbone.net.{0,1,4,5,6} = conv1, bn1, layer1..3."""
    children = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6}
    state = {f"backbone.net.{children[k.split('.')[0]]}.{k.split('.', 1)[1]}": v
             for k, v in resnet50.state_dict().items() if k.split(".")[0] in children}
    state |= aggregator_state(torch.Generator().manual_seed(2), 1024, 128, 4, 2, 3)  # d=128: 2 heads
    path = tmp_path / name
    torch.save(state, path)
    return path, state


def trunk_to_layer3(resnet: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(images))))
    return resnet.layer3(resnet.layer2(resnet.layer1(x)))


def small_dino(final_norm: bool) -> DinoV2:
    """A 2-block DINOv2 ViT-S/14 with layer scales, norms and position embeddings away from their init."""
    torch.manual_seed(3)
    vit = DinoV2("dinov2_vits14", blocks=2, final_norm=final_norm).eval()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, t in vit.named_parameters():
            if name.endswith("gamma"):
                t.copy_(torch.rand(t.shape, generator=gen) * 0.5 + 0.2)
            elif "norm" in name and name.endswith("weight"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith(("bias", "cls_token", "pos_embed", "mask_token")):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.2)
    return vit


def dino_file(tmp_path, name="dinov2_12288.pth"):
    """A small BoQ DINOv2 file: backbone.dino.* as torch.hub's DINOv2 (with its final `norm` and
    `mask_token`, which the authors' forward never uses) + aggregator.*."""
    state = {f"backbone.dino.{k}": v for k, v in small_dino(final_norm=True).state_dict().items()}
    state |= aggregator_state(torch.Generator().manual_seed(5), 384, 128, 4, 2, 3)
    path = tmp_path / name
    torch.save(state, path)
    return path, state


def assert_strict(state: dict, path) -> None:
    """Every tensor of the file is used, and the model has no weight the file lacks (except DINOv2's unused norm)."""
    converted = boq.convert_boq(state, path, {})
    with torch.device("meta"):
        fresh = VPRModel(ModelConfig(**converted.config))
    assert set(converted.weights) == set(fresh.state_dict())
    dropped = set(state) - {k for k in state if not k.startswith("backbone.dino.norm.")}
    assert len(converted.weights) == len(state) - len(dropped)


def test_resnet_file_loads_strictly_and_gives_the_papers_descriptor(tmp_path, resnet50):
    path, state = resnet_file(tmp_path, resnet50)
    model, pca = load_checkpoint(path)
    c = model.config
    assert pca is None and (c.backbone, c.layer, c.head) == ("resnet50", 3, "boq")
    assert c.head_options == {"proj_channels": 128, "num_queries": 4, "num_layers": 2, "row_dim": 3, "heads": 2}
    assert c.descriptor_dim == 384 and c.input_size == (384, 384)
    assert (c.resize, c.multiple, c.interpolation, c.resampler) == ("fixed", 1, "bilinear", "torch")
    assert_strict(state, path)
    images = torch.randn(2, 3, 64, 64)  # BoQ attends over any number of tokens: 4x4 here
    with torch.no_grad():
        expected = restated_boq(state, trunk_to_layer3(resnet50, images), heads=2)
        ours = model(images)
    assert ours.shape == (2, 384)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert torch.allclose(ours.norm(dim=1), torch.ones(2))


def test_dinov2_file_uses_the_patch_tokens_before_the_final_norm(tmp_path):
    path, state = dino_file(tmp_path)
    model, _ = load_checkpoint(path)
    c = model.config
    assert (c.backbone, c.head, c.backbone_options) == ("dinov2_vits14", "boq", {"final_norm": False, "blocks": 2})
    assert c.head_options == {"proj_channels": 128, "num_queries": 4, "num_layers": 2, "row_dim": 3, "heads": 2}
    assert c.descriptor_dim == 384 and c.input_size == (322, 322)
    assert (c.resize, c.multiple, c.interpolation, c.resampler) == ("fixed", 14, "bilinear", "torch")
    assert_strict(state, path)
    images = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        expected = restated_boq(state, small_dino(final_norm=False)(images)[0], heads=2)
        normed = restated_boq(state, small_dino(final_norm=True)(images)[0], heads=2)
        ours = model(images)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert (ours - normed).abs().max() > 1e-3  # the authors' forward skips DINOv2's last LayerNorm


def test_preprocessing_is_the_reference_tools_resize(tmp_path):
    path, _ = dino_file(tmp_path)
    model, _ = load_checkpoint(path)
    img = Image.new("RGB", (50, 30), (200, 30, 90))
    pixels = preprocess(img, model.config.preprocess)
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 322, 322)
    expected = F.interpolate(torch.tensor([200.0, 30.0, 90.0]).view(1, 3, 1, 1).expand(1, 3, 30, 50), size=(322, 322),
                             mode="bilinear", antialias=True, align_corners=False)[0]
    torch.testing.assert_close(pixels, expected)
    descriptors = forward_batch(model, pixels[None])
    assert descriptors.shape == (1, 384) and torch.allclose(descriptors.norm(dim=1), torch.ones(1))


def test_the_published_sizes_are_recognised_from_full_size_files(tmp_path):
    """The two released files, at full size on the meta device: 16384-d at 384x384, 12288-d at 322x322."""
    with torch.device("meta"):
        resnet = torchvision.models.resnet50(weights=None)
        dino = DinoV2("dinov2_vitb14", final_norm=True)
        agg_r = boq.BoQ(1024, 512, 64, 2, 32)
        agg_d = boq.BoQ(768, 384, 64, 2, 32)
    children = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6}
    resnet_state = {f"backbone.net.{children[k.split('.')[0]]}.{k.split('.', 1)[1]}": v
                    for k, v in resnet.state_dict().items() if k.split(".")[0] in children}
    resnet_state |= {f"aggregator.{k}": v for k, v in agg_r.state_dict().items()}
    dino_state = {f"backbone.dino.{k}": v for k, v in dino.state_dict().items()}
    dino_state |= {f"aggregator.{k}": v for k, v in agg_d.state_dict().items()}
    for state, name, backbone, dim, size, heads in ((resnet_state, "resnet50_16384.pth", "resnet50", 16384, (384, 384), 8),
                                                     (dino_state, "dinov2_12288.pth", "dinov2_vitb14", 12288, (322, 322), 6)):
        assert boq.detect_boq(state)
        converted = boq.convert_boq(state, tmp_path / name, {})
        config = ModelConfig(**converted.config)
        assert (config.backbone, config.descriptor_dim, config.input_size) == (backbone, dim, size)
        assert config.head_options["heads"] == heads and config.head_options["num_queries"] == 64
        assert_strict(state, tmp_path / name)


def test_default_boq_head_is_the_published_model():
    resnet = ModelConfig(backbone="resnet50", layer=3, head="boq", input_size=(384, 384))
    dino = ModelConfig(backbone="dinov2_vitb14", head="boq", input_size=(322, 322))
    assert resnet.descriptor_dim == 16384 and dino.descriptor_dim == 12288
    with torch.device("meta"):
        head = VPRModel(dino).head
    assert len(head.boqs) == 2 and head.boqs[0].queries.shape == (1, 64, 384) and head.boqs[0].cross_attn.num_heads == 6


def test_damaged_boq_files_are_refused_naming_boq(tmp_path, resnet50):
    path, state = resnet_file(tmp_path, resnet50)
    for drop, message in (("aggregator.fc.weight", "not a BoQ checkpoint: missing aggregator.fc.weight"),
                          ("backbone.net.", "BoQ checkpoint without its backbone")):
        broken = {k: v for k, v in state.items() if not k.startswith(drop)}
        torch.save(broken, tmp_path / "broken.pth")
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(tmp_path / "broken.pth")
    broken = {k: v for k, v in state.items() if not k.startswith("backbone.net.6.2.")}  # a layer3 block lost
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="boq"):
        load_checkpoint(tmp_path / "broken.pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])  # an interrupted download
    with pytest.raises(CheckpointError, match="BoQ's resnet50_16384.pth"):
        load_checkpoint(path)
