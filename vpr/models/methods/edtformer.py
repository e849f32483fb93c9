"""EDTformer (Jin et al. 2024): an efficient decoder transformer over DINOv2 tokens.

Backbone: DINOv2 ViT-B/14 with parallel low-rank side adapters (LoPA). The blocks run as usual,
x_l = Block_l(x_{l-1}), and a side path accumulates them,
    y_0 = x_0,   y_l = A_l(y_{l-1} + x_l),   A(z) = z + 0.5 * W2 GELU(W1 z)   (W1: 768 -> 4, W2: 4 -> 768)
and the final LayerNorm is applied to y_L (not x_L): T = LN(y_L) = [t_cls; t_1 .. t_N].

Aggregator: the tokens are projected, M = W_f T + b_f (768 -> 768), and 64 learnt queries Q go
through two simplified decoder blocks (post-norm, no feed-forward; 16 heads):
    Q <- LN1(Q + MHA(Q, Q, Q)),   Q <- LN2(Q + MHA(Q, M, M))
then a channel projection (768 -> 256) and a row projection (64 -> 16),
    O = W_r (Q W_c^T + b_c)^T + b_r  (256 x 16),   descriptor = L2(flatten(O))  (4096 dims).

Published file: EDTformer.pth (GitHub release v1.0.0, behind torch.hub 'Tong-Jin01/EDTformer'):
{"model_state_dict": DataParallel keys `module.backbone.*` (DINOv2 + `adapters.N.D_fc{1,2}`),
`module.fc`, `module.queries`, `module.decoder.layers.{0,1}.*`, `module.channel_proj`, `module.row_proj`}.
Preprocessing: the authors evaluate at 322 x 322 (their --resize default: ToTensor -> Normalize ->
tensor resize, antialiased); VPR-methods-evaluation feeds native-size images with sides rounded to
multiples of 14 (`vpr ... --resize native` gives that).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vpr.errors import CheckpointError
from vpr.models import vit
from vpr.models.registry import Backbone, Converted, Head, Layout, PublishedFile, merged_options
from vpr.models.statedict import numbered, refuse_unused, take, with_prefix

URL = "https://github.com/Tong-Jin01/EDTformer/releases/download/v1.0.0/EDTformer.pth"
BACKBONE = "dinov2_vitb14_edtformer"
DEFAULTS = {"queries": 64, "heads": 16, "layers": 2, "out_channels": 256, "out_rows": 16}
HEAD_PREFIXES = ("fc.", "decoder.", "channel_proj.", "row_proj.")  # the published head's tensors, with `queries`


# ----------------------------------------------------------------------------------- backbone

class SideAdapter(nn.Module):
    """A(z) = z + alpha * W2 GELU(W1 z), low rank (keys `D_fc1`, `D_fc2`)."""

    def __init__(self, dim: int = 768, hidden: int = 4, alpha: float = 0.5) -> None:
        super().__init__()
        self.D_fc1 = nn.Linear(dim, hidden)
        self.D_fc2 = nn.Linear(hidden, dim)
        self.alpha = alpha

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.alpha * self.D_fc2(F.gelu(self.D_fc1(z)))


class EDTformerDinoV2(vit.DinoV2):
    """DINOv2 with EDTformer's parallel side adapters; returns (LN(y_L) patch map, LN(y_L) CLS)."""

    def __init__(self, name: str = "dinov2_vitb14", blocks: int | None = None) -> None:
        super().__init__(name, blocks=blocks)
        dim = vit.SIZES[name][0]
        self.adapters = nn.ModuleList(SideAdapter(dim) for _ in range(self.depth))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = y = self.tokens(images)
        for block, adapter in zip(self.blocks, self.adapters):
            x = block(x)
            y = adapter(y + x)
        return self.split(self.norm(y), images)


BACKBONES = (
    Backbone(BACKBONE, "DINOv2 ViT-B/14 with EDTformer's parallel low-rank side adapters: (patch map, CLS) of 768 "
             "channels", {4: 768},
             vit.vit_builder(EDTformerDinoV2, "dinov2_vitb14", BACKBONE), vit=True, preprocessing=vit.dinov2_preprocessing()),
)


# ----------------------------------------------------------------------------------- head

class DecoderBlock(nn.Module):
    """EDTformer's simplified decoder block (SA_CA): Q = LN1(Q + SA(Q)); Q = LN2(Q + CA(Q, M)); no FFN."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=0.1, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(dim, heads, dropout=0.1, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, q: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        q = self.norm1(q + self.self_attn(q, q, q, need_weights=False)[0])
        return self.norm2(q + self.multihead_attn(q, memory, memory, need_weights=False)[0])


class EDTformer(nn.Module):
    """(patch map B x C x h x w, CLS B x C) -> B x (out_channels * out_rows)."""

    def __init__(self, channels: int = 768, queries: int = 64, heads: int = 16, layers: int = 2,
                 out_channels: int = 256, out_rows: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, channels)
        self.queries = nn.Parameter(torch.zeros(1, queries, channels))
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(DecoderBlock(channels, heads) for _ in range(layers))
        self.channel_proj = nn.Linear(channels, out_channels)
        self.row_proj = nn.Linear(queries, out_rows)

    def forward(self, features: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        patches, cls = features
        tokens = torch.cat([cls[:, None], patches.flatten(2).transpose(1, 2)], dim=1)  # [cls; patches] row-major
        memory = self.fc(tokens)
        q = self.queries.expand(tokens.shape[0], -1, -1)
        for layer in self.decoder.layers:
            q = layer(q, memory)
        out = self.row_proj(self.channel_proj(q).transpose(1, 2))  # B x out_channels x out_rows
        return F.normalize(out.flatten(1), p=2, dim=-1)


def _options(config) -> dict:
    return merged_options(config, DEFAULTS, "edtformer")


def build_head(config) -> EDTformer:
    o = _options(config)
    return EDTformer(config.channels, int(o["queries"]), int(o["heads"]), int(o["layers"]), int(o["out_channels"]),
                     int(o["out_rows"]))


def descriptor_dim(config) -> int:
    o = _options(config)
    return int(o["out_channels"]) * int(o["out_rows"])


HEADS = (
    Head("edtformer", "EDTformer: 64 learnt queries through simplified decoder blocks over the tokens, channel and "
         "row projections (head_options: queries, heads, layers, out_channels, out_rows)", "out_channels x out_rows (4096)",
         build_head, descriptor_dim),
)


# ----------------------------------------------------------------------------------- layout

def detect(state: dict[str, torch.Tensor]) -> bool:
    return "backbone.adapters.0.D_fc1.weight" in state and "queries" in state and "decoder.layers.0.norm1.weight" in state


def convert(state: dict[str, torch.Tensor], path: Path, extras: dict) -> Converted:
    """EDTformer.pth: `backbone.*` (DINOv2 + side adapters) + `fc`, `queries`, `decoder.layers.N`, `channel_proj`, `row_proj`."""
    what = "EDTformer"
    proj, queries, channel_w, row_w, _ = take(state, ("backbone.patch_embed.proj.weight", "queries", "channel_proj.weight",
                                                      "row_proj.weight", "fc.weight"), path, what)
    if proj.shape[0] != 768:
        raise CheckpointError(f"{path}: a {what} checkpoint with a {proj.shape[0]}-wide ViT; EDTformer uses ViT-B/14 (768)")
    layers = numbered(state, "decoder.layers.")
    head_keys = [k for k in state if k.startswith(HEAD_PREFIXES) or k == "queries"]
    refuse_unused(state, path, what, ("backbone.", *HEAD_PREFIXES), ("queries",))
    options = {**DEFAULTS, "queries": int(queries.shape[1]), "layers": layers, "out_channels": int(channel_w.shape[0]),
               "out_rows": int(row_w.shape[0])}
    config = dict(backbone=BACKBONE, layer=4, head="edtformer", head_options=options,
                  backbone_options=vit.blocks_option("dinov2_vitb14", numbered(state, "backbone.blocks.")),
                  **vit.dinov2_preprocessing())
    weights = {**with_prefix(state, "backbone.", "backbone."), **{f"head.{k}": state[k] for k in head_keys}}
    return Converted(config, weights)


LAYOUTS = (
    Layout(
        "edtformer", (), "Tong-Jin01/EDTformer (release v1.0.0, torch.hub 'EDTformer')",
        "model_state_dict: backbone.* (DINOv2 + adapters.N.*) + fc, queries, decoder.layers.N.*, channel_proj, row_proj",
        (PublishedFile("EDTformer", "DINOv2 ViT-B/14 + side adapters", "4096", "322x322", "EDTformer.pth", URL),),
        detect, convert,
    ),
)
