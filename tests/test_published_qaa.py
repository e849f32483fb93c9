"""QAA files (Hugging Face xjh19972/QAA-*: model.safetensors + config.json) load strictly and give the
paper's descriptor, restated here; the flags only config.json holds are read from beside the weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vpr.errors import CheckpointError
from vpr.models.methods import qaa
from vpr.models.checkpoints import load_checkpoint
from vpr.models.model import ModelConfig, VPRModel
from vpr.models.vit import DinoV2

pytestmark = pytest.mark.usefixtures("one_torch_thread")
C, K, D, Q = 384, 4, 8, 6  # small: ViT-S/14 with two blocks, 4 clusters of 8, 6 queries


def qaa_folder(tmp_path, norm_layer: bool, out_norm: bool):
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(2)
    vit = DinoV2("dinov2_vits14", blocks=2).eval()
    head = qaa.QAA(C, K, D, 0, Q, 2, 16, True, out_norm).eval()
    state = {f"backbone.model.{k}": v for k, v in vit.state_dict().items()}
    state |= {f"aggregator.{k}": v for k, v in head.state_dict().items()}
    with torch.no_grad():
        for k, v in state.items():
            if k.endswith("bias") or k.endswith("queries") or k.endswith("pos_embed"):
                v.copy_(torch.randn(v.shape, generator=gen) * 0.5)
            elif v.dim() == 1 and k.endswith(("weight", "gamma")):
                v.copy_(torch.rand(v.shape, generator=gen) + 0.5)
    folder = tmp_path / "QAA-32"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    config = {"backbone_arch": "dinov2_vits14", "backbone_config": {"norm_layer": norm_layer},
              "agg_config": {"num_channels": C, "num_clusters": K, "cluster_dim": D, "num_queries": Q,
                             "feature_nheads": 2, "score_nheads": 16, "out_norm": out_norm, "token_dim": 0}}
    (folder / "config.json").write_text(json.dumps({"model_config_dict": config}))
    return folder / "model.safetensors", state


def mha(state, p, q, kv, heads):
    w, b = state[p + "in_proj_weight"].chunk(3), state[p + "in_proj_bias"].chunk(3)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
    qh, kh, vh = split(F.linear(q, w[0], b[0])), split(F.linear(kv, w[1], b[1])), split(F.linear(kv, w[2], b[2]))
    att = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1]), dim=-1) @ vh
    return F.linear(att.transpose(1, 2).flatten(2), state[p + "out_proj.weight"], state[p + "out_proj.bias"])


def restated(state, tokens, out_norm):
    """F = LN(Qf + SA(Qf)), S = LN(Qs + SA(Qs)), P = W_k LN(CA(S, X)) [LN], V = F^T P, L2 per cluster, L2."""
    a = "aggregator."
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], state[p + "weight"], state[p + "bias"])
    qf, qs = state[a + "queries_feature.queries"], state[a + "queries_score.queries"]
    f = ln(qf + mha(state, a + "queries_feature.self_attn.", qf, qf, 2), a + "queries_feature.norm_q.")[0]  # Q x D
    s = ln(qs + mha(state, a + "queries_score.self_attn.", qs, qs, 16), a + "queries_score.norm_q.")
    s = s.expand(len(tokens), -1, -1)
    p = ln(mha(state, a + "score.cross_attn.", s, tokens, 16), a + "score.norm_out.")
    p = F.linear(p, state[a + "score.conv.weight"][:, :, 0], state[a + "score.conv.bias"])  # B x Q x K
    if out_norm:
        p = ln(p, a + "score.norm2_out.")
    v = F.normalize(torch.einsum("qd,bqk->bdk", f, p), dim=1)
    return F.normalize(v.flatten(1), dim=1)


@pytest.mark.parametrize("norm_layer, out_norm", [(True, True), (False, False)])
def test_qaa_file_loads_strictly_and_gives_the_papers_descriptor(tmp_path, norm_layer, out_norm):
    path, state = qaa_folder(tmp_path, norm_layer, out_norm)
    model, pca = load_checkpoint(path)
    c = model.config
    assert pca is None and (c.backbone, c.head) == ("dinov2_vits14", "qaa")
    assert c.backbone_options == ({"blocks": 2} if norm_layer else {"final_norm": False, "blocks": 2})
    assert (c.head_options["out_norm"], c.head_options["feature_nheads"]) == (out_norm, 2)
    assert c.descriptor_dim == K * D and c.input_size == (322, 322) and (c.multiple, c.resampler) == (14, "torch")
    converted = qaa.convert(state, path, {})
    with torch.device("meta"):
        fresh = VPRModel(ModelConfig(**converted.config))
    assert set(converted.weights) == set(fresh.state_dict())
    dropped = set(state) - {"backbone.model." + k[9:] for k in converted.weights if k.startswith("backbone.")} \
        - {"aggregator." + k[5:] for k in converted.weights if k.startswith("head.")}
    assert dropped == (set() if norm_layer else {"backbone.model.norm.weight", "backbone.model.norm.bias"})

    images = torch.randn(2, 3, 28, 42)
    vit = DinoV2("dinov2_vits14", blocks=2, final_norm=norm_layer).eval()
    vit.load_state_dict({k[15:]: v for k, v in state.items() if k.startswith("backbone.model.")
                         and (norm_layer or not k.startswith("backbone.model.norm."))})
    with torch.no_grad():
        tokens = vit(images)[0].flatten(2).transpose(1, 2)
        ours = model(images)
        torch.testing.assert_close(ours, restated(state, tokens, out_norm), atol=1e-5, rtol=0)
    assert ours.shape == (2, K * D) and torch.allclose(ours.norm(dim=1), torch.ones(2))


def test_default_qaa_head_is_the_published_8192():
    config = ModelConfig(backbone="dinov2_vitb14", head="qaa", input_size=(322, 322), multiple=14)
    assert config.descriptor_dim == 8192


def test_damaged_qaa_files_name_the_method(tmp_path):
    path, state = qaa_folder(tmp_path, True, False)
    save_file({k: v.contiguous() for k, v in state.items() if k != "aggregator.score.conv.weight"}, path)
    with pytest.raises(CheckpointError, match="not a QAA checkpoint: missing aggregator.score.conv.weight"):
        load_checkpoint(path)
