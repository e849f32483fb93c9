"""QAA (Xiao et al. 2025): query-based adaptive aggregation, on DINOv2 ViT-B/14.

Two sets of Q learnt queries (Q = 256) refine themselves by self-attention (then LayerNorm):
    F = LN(Q_f + MHA(Q_f, Q_f, Q_f))   (Q x d, d = cluster_dim: the "feature" queries)
    S = LN(Q_s + MHA(Q_s, Q_s, Q_s))   (Q x C: the "score" queries)
The score queries cross-attend to the patch tokens X (N x C) of the image, giving K cluster scores per query:
    P = W_k LN(MHA(S, X, X)) + b_k  [then LN over K when out_norm]    (Q x K, a 1x1 conv C -> K)
and the descriptor aggregates the feature queries with those scores,
    V_{d,k} = sum_q F_{q,d} P_{q,k},   V <- V / ||V_{:,k}||  (L2 over d, per cluster),   v = L2(flatten(V))
(d x K = 128 x 64 = 8192 for QAA-8192; optionally L2(MLP(CLS)) of token_dim dims first). `dust_bin`
is stored in the files but unused by the forward pass.

Published files: Hugging Face xjh19972/QAA-{1024,2048,4096,8192} (PyTorchModelHubMixin): model.safetensors
with `backbone.model.*` (torch.hub DINOv2) + `aggregator.*`, and config.json with the hyperparameters
that the tensors do not show (heads, the LayerNorm flags, the backbone's final norm): vpr reads
config.json from the folder of the .safetensors when present, else uses QAA's defaults.
Preprocessing as VPR-methods-evaluation: Resize(322x322, antialias) on the float tensor, multiples of 14.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vpr.errors import CheckpointError
from vpr.models import vit
from vpr.models.registry import Converted, Head, Layout, PublishedFile, merged_options
from vpr.models.statedict import numbered, refuse_unused, take, with_prefix

HF = "https://huggingface.co/xjh19972/QAA-{DIM}/resolve/main/model.safetensors"
DEFAULTS = {"num_clusters": 64, "cluster_dim": 128, "token_dim": 0, "num_queries": 256, "feature_nheads": 16,
            "score_nheads": 16, "self_attn_out_norm": True, "out_norm": False}


class QuerySelfAttn(nn.Module):
    """Learnt queries refined by self-attention: LN(Q + MHA(Q, Q, Q)) (LN when `out_norm`)."""

    def __init__(self, dim: int, queries: int, heads: int, out_norm: bool = True) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(1, queries, dim))
        self.self_attn = nn.MultiheadAttention(dim, num_heads=heads, batch_first=True)
        self.norm_q = nn.LayerNorm(dim)
        self.out_norm = out_norm

    def forward(self) -> torch.Tensor:
        q = self.queries + self.self_attn(self.queries, self.queries, self.queries, need_weights=False)[0]
        return self.norm_q(q) if self.out_norm else q


class QueryCrossAttn(nn.Module):
    """Scores: queries cross-attend to the tokens, LN, 1x1 conv to K clusters [, LN]: B x K x Q."""

    def __init__(self, dim: int, clusters: int, heads: int, out_norm: bool = False) -> None:
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, num_heads=heads, batch_first=True)
        self.norm_out = nn.LayerNorm(dim)
        self.conv = nn.Conv1d(dim, clusters, 1)
        self.norm2_out = nn.LayerNorm(clusters)
        self.out_norm = out_norm

    def forward(self, tokens: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        out = self.norm_out(self.cross_attn(q, tokens, tokens, need_weights=False)[0])
        out = self.conv(out.transpose(1, 2)).transpose(1, 2)
        if self.out_norm:
            out = self.norm2_out(out)
        return out.transpose(1, 2)


class QAA(nn.Module):
    """(patch map B x C x h x w, CLS B x C) -> B x (token_dim + cluster_dim * num_clusters)."""

    def __init__(self, channels: int = 768, num_clusters: int = 64, cluster_dim: int = 128, token_dim: int = 0,
                 num_queries: int = 256, feature_nheads: int = 16, score_nheads: int = 16,
                 self_attn_out_norm: bool = True, out_norm: bool = False) -> None:
        super().__init__()
        self.token_dim = token_dim
        if token_dim:
            self.token_features = nn.Sequential(nn.Linear(channels, 512), nn.ReLU(), nn.Linear(512, token_dim))
        self.queries_feature = QuerySelfAttn(cluster_dim, num_queries, feature_nheads, self_attn_out_norm)
        self.queries_score = QuerySelfAttn(channels, num_queries, score_nheads, self_attn_out_norm)
        self.score = QueryCrossAttn(channels, num_clusters, score_nheads, out_norm)
        self.dust_bin = nn.Parameter(torch.tensor(1.0))  # in the published files; unused by QAA's forward

    def forward(self, features: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, t = features
        batch = x.shape[0]
        f = self.queries_feature().transpose(1, 2).expand(batch, -1, -1)  # B x d x Q
        q = self.queries_score().expand(batch, -1, -1)  # B x Q x C
        p = self.score(x.flatten(2).transpose(1, 2), q)  # B x K x Q
        vlad = F.normalize(torch.einsum("bdq,bkq->bdk", f, p), p=2, dim=1).flatten(1)
        if self.token_dim:
            vlad = torch.cat([F.normalize(self.token_features(t), p=2, dim=-1), vlad], dim=-1)
        return F.normalize(vlad, p=2, dim=-1)


def _options(config) -> dict:
    return merged_options(config, DEFAULTS, "qaa")


def build_head(config) -> QAA:
    o = _options(config)
    return QAA(config.channels, int(o["num_clusters"]), int(o["cluster_dim"]), int(o["token_dim"]), int(o["num_queries"]),
               int(o["feature_nheads"]), int(o["score_nheads"]), bool(o["self_attn_out_norm"]), bool(o["out_norm"]))


def descriptor_dim(config) -> int:
    o = _options(config)
    return int(o["token_dim"]) + int(o["num_clusters"]) * int(o["cluster_dim"])


HEADS = (
    Head("qaa", "QAA: learnt feature and score queries, score queries cross-attend to the tokens, d x K aggregation "
         "(head_options: num_clusters, cluster_dim, token_dim, num_queries, heads, norm flags)",
         "cluster_dim x num_clusters (1024 ... 8192)", build_head, descriptor_dim),
)


# ----------------------------------------------------------------------------------- layout

def detect(state: dict[str, torch.Tensor]) -> bool:
    return "aggregator.queries_score.queries" in state and "backbone.model.patch_embed.proj.weight" in state


def _hub_config(path: Path) -> dict:
    """PyTorchModelHubMixin's config.json beside the weights: {"model_config_dict": {...}}, or {}."""
    file = Path(path).parent / "config.json"
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: QAA's config.json is unreadable ({exc}); remove or re-download it") from None
    return data.get("model_config_dict", data) if isinstance(data, dict) else {}


def convert(state: dict[str, torch.Tensor], path: Path, extras: dict) -> Converted:
    """QAA's model.safetensors: `backbone.model.*` (DINOv2) + `aggregator.*`; flags from config.json."""
    what = "QAA"
    prefix = "backbone.model."
    proj, qf, conv = take(state, (prefix + "patch_embed.proj.weight", "aggregator.queries_feature.queries",
                                  "aggregator.score.conv.weight"), path, what)
    name = vit.name_for_width(proj.shape[0])
    if name is None or vit.SIZES[name][3]:  # not ViT-G (SwiGLU)
        raise CheckpointError(f"{path}: a {what} checkpoint with a {proj.shape[0]}-wide ViT, not a DINOv2 size")
    hub = _hub_config(path)
    agg = hub.get("agg_config", {})
    norm_layer = bool(hub.get("backbone_config", {}).get("norm_layer", False))
    token = state.get("aggregator.token_features.2.weight")
    options = {**DEFAULTS, **{k: agg[k] for k in DEFAULTS if k in agg},
               "num_clusters": int(conv.shape[0]), "cluster_dim": int(qf.shape[2]), "num_queries": int(qf.shape[1]),
               "token_dim": int(token.shape[0]) if token is not None else 0}
    trunk = with_prefix(state, prefix, "backbone.")
    if not norm_layer:  # the authors' backbone skips DINOv2's final norm unless norm_layer: dropped on purpose
        trunk = {k: v for k, v in trunk.items() if not k.startswith("backbone.norm.")}
    refuse_unused(state, path, what, (prefix, "aggregator."))
    backbone_options = {**({} if norm_layer else {"final_norm": False}), **vit.blocks_option(name, numbered(state, prefix + "blocks."))}
    config = dict(backbone=name, layer=4, head="qaa", head_options=options, backbone_options=backbone_options,
                  **vit.dinov2_preprocessing())
    return Converted(config, {**trunk, **with_prefix(state, "aggregator.", "head.")})


LAYOUTS = (
    Layout(
        "qaa", (), "xjh19972/QAA (Hugging Face xjh19972/QAA-{1024,2048,4096,8192}, PyTorchModelHubMixin)",
        "backbone.model.* (DINOv2) + aggregator.{queries_feature, queries_score, score, dust_bin} [+ config.json]",
        tuple(PublishedFile("QAA", "DINOv2 ViT-B/14", str(dim), "322x322", "model.safetensors", HF.format(DIM=dim))
              for dim in (8192, 4096, 2048, 1024)),
        detect, convert,
    ),
)
