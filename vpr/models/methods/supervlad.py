"""SuperVLAD (Lu et al., NeurIPS 2024): compact VLAD without cluster centres, on DINOv2 ViT-B/14.

With x_i the patch tokens of DINOv2 (after its final LayerNorm) each L2-normalised over channels,
and K clusters plus G "ghost" clusters whose assignments are discarded:
    a_k(x_i) = exp(w_k . x_i) / sum_{k'=1}^{K+G} exp(w_k' . x_i)      (1x1 conv, no bias: soft assignment)
    V_k = sum_i a_k(x_i) x_i,   k = 1..K                               (no centroid: the "super" VLAD)
    V_k <- V_k / ||V_k||  (intra-normalisation),   v = flatten(V) / ||flatten(V)||   (K x 768 = 3072 dims)
SuperVLAD-CrossImage then treats V as K tokens of 768 and runs a cross-image encoder (two post-norm
Transformer encoder layers, 16 heads, FFN 2048, GELU) whose sequence axis is the batch of images,
    Z = LN1(V + MHA(V, V, V)),   E = LN2(Z + W2 GELU(W1 Z + b1) + b2)      (attention over images, per token k)
and the descriptor is L2(flatten(E)).

Cross-image dependency: as for CricaVPR (`vpr.models.methods.cricavpr`), the authors' encoder attends over
the images of a batch. vpr's default `head_options["cross_image"] = "single"` gives each image's
descriptor on its own (the authors' output for a batch of one: VPR-methods-evaluation's queries);
`"batch"` reproduces the batched behaviour (the descriptor then depends on the batch).

Published files (Google Drive, linked from Lu-Feng/SuperVLAD's README; VPR-methods-evaluation stores
them as SuperVLAD.pth / SuperVLAD-CrossImage.pth): {"model_state_dict": DataParallel keys
`module.backbone.*` (DINOv2 ViT-B/14), `module.aggregation.conv.weight` ((K+G) x 768 x 1 x 1) and, for
the cross-image model, `module.encoder.layers.{0,1}.*`}. K, G = 4, 1 (SuperVLAD) or 1, 2 (1-ClusterVLAD).
Preprocessing as VPR-methods-evaluation: ToTensor -> Normalize(ImageNet) -> Resize(322x322, antialias)
-> ResizingWrapper (sides to multiples of 14), bilinear on the float tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vpr.errors import CheckpointError, UsageError
from vpr.models import vit
from vpr.models.registry import Converted, Head, Layout, PublishedFile, merged_options
from vpr.models.statedict import numbered, refuse_unused, take, with_prefix

DRIVE = "https://drive.google.com/file/d/{ID}/view"
FILES = {  # VPR-methods-evaluation's MODELS_INFO / the authors' README
    "SuperVLAD": "1wRkUO4E8s5hNRNNIWcuA8RUvlGob3Tbf",
    "SuperVLAD-CrossImage": "1yomnWGTJko6nf3F2Ju6RWsLhP2EG82tL",
    "1-ClusterVLAD": "1pQcJx9n2-keAh9TttssZkz6D0vjpFWU6",
}
# rows of the assignment conv -> (clusters, ghost clusters) of the published models
PUBLISHED_SPLITS = {5: (4, 1), 3: (1, 2)}
DEFAULTS = {"clusters": 4, "ghost_clusters": 1, "heads": 16, "ffn": 2048, "layers": 0, "cross_image": "single"}
CROSS_DEFAULTS = {**DEFAULTS, "layers": 2}
CROSS_IMAGE = ("single", "batch")


class SuperVLAD(nn.Module):
    """(patch map B x C x h x w, CLS) -> B x K*C; with `layers` > 0 the cross-image encoder follows."""

    def __init__(self, channels: int = 768, clusters: int = 4, ghost_clusters: int = 1, layers: int = 0,
                 heads: int = 16, ffn: int = 2048, cross_image: str = "single") -> None:
        super().__init__()
        if cross_image not in CROSS_IMAGE:
            raise UsageError(f"supervlad head: cross_image '{cross_image}' is not one of {', '.join(CROSS_IMAGE)}")
        self.clusters, self.cross_image = clusters, cross_image
        self.conv = nn.Conv2d(channels, clusters + ghost_clusters, kernel_size=1, bias=False)
        self.encoder = None
        if layers:
            layer = nn.TransformerEncoderLayer(d_model=channels, nhead=heads, dim_feedforward=ffn, activation="gelu",
                                               dropout=0.1, batch_first=False)
            self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)

    def forward(self, features: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = features[0] if isinstance(features, tuple) else features
        x = F.normalize(x, p=2, dim=1)
        assign = F.softmax(self.conv(x).flatten(2), dim=1)[:, :self.clusters]  # B x K x N (ghosts dropped)
        vlad = torch.einsum("bkn,bcn->bkc", assign, x.flatten(2))
        vlad = F.normalize(F.normalize(vlad, p=2, dim=2).flatten(1), p=2, dim=1)
        if self.encoder is None:
            return vlad
        batch, channels = x.shape[0], x.shape[1]
        tokens = vlad.reshape(batch, self.clusters, channels)
        if self.cross_image == "batch":  # the authors' (S=B images, N=K tokens, C)
            encoded = self.encoder(tokens)
        else:  # each image alone: a sequence of one image for each of its K tokens
            encoded = self.encoder(tokens.reshape(1, batch * self.clusters, channels))
        return F.normalize(encoded.reshape(batch, -1), p=2, dim=-1)


def _builder(defaults: dict, name: str):
    def build(config) -> SuperVLAD:
        o = merged_options(config, defaults, name)
        return SuperVLAD(config.channels, int(o["clusters"]), int(o["ghost_clusters"]), int(o["layers"]),
                         int(o["heads"]), int(o["ffn"]), str(o["cross_image"]))

    def dims(config) -> int:
        return int(merged_options(config, defaults, name)["clusters"]) * config.channels

    return build, dims


HEADS = (
    Head("supervlad", "SuperVLAD: centre-free VLAD over L2-normalised tokens, ghost clusters dropped (head_options: "
         "clusters, ghost_clusters)", "K x C (3072; 768 for 1-ClusterVLAD)", *_builder(DEFAULTS, "supervlad")),
    Head("supervlad-crossimage", "SuperVLAD + cross-image Transformer encoder over the K cluster tokens (head_options: "
         "cross_image single|batch, clusters, ghost_clusters, layers)", "K x C (3072)",
         *_builder(CROSS_DEFAULTS, "supervlad-crossimage")),
)


# ----------------------------------------------------------------------------------- layout

def detect(state: dict[str, torch.Tensor]) -> bool:
    conv = state.get("aggregation.conv.weight")
    return conv is not None and conv.dim() == 4 and "aggregation.centroids" not in state \
        and "backbone.blocks.0.attn.qkv.weight" in state


def convert(state: dict[str, torch.Tensor], path: Path, extras: dict) -> Converted:
    """SuperVLAD.pth: `backbone.*` (DINOv2) + `aggregation.conv.weight` [+ `encoder.layers.N.*`]."""
    what = "SuperVLAD"
    proj, conv = take(state, ("backbone.patch_embed.proj.weight", "aggregation.conv.weight"), path, what)
    name = vit.name_for_width(proj.shape[0])
    if name is None or vit.SIZES[name][3] or conv.shape[1] != proj.shape[0]:  # not ViT-G (SwiGLU)
        raise CheckpointError(f"{path}: a {what} checkpoint with a {proj.shape[0]}-wide ViT and a "
                              f"{tuple(conv.shape)} assignment: not a DINOv2 SuperVLAD")
    backbone_options = vit.blocks_option(name, numbered(state, "backbone.blocks."))
    clusters, ghosts = PUBLISHED_SPLITS.get(conv.shape[0], (conv.shape[0] - 1, 1))
    layers = numbered(state, "encoder.layers.")
    backbone = with_prefix(state, "backbone.", "backbone.")
    head = {"head.conv.weight": conv, **with_prefix(state, "encoder.", "head.encoder.")}
    refuse_unused(state, path, what, ("backbone.", "encoder."), ("aggregation.conv.weight",))
    defaults = CROSS_DEFAULTS if layers else DEFAULTS
    config = dict(backbone=name, layer=4, backbone_options=backbone_options, head="supervlad-crossimage" if layers else "supervlad",
                  head_options={**defaults, "clusters": clusters, "ghost_clusters": ghosts, "layers": layers},
                  **vit.dinov2_preprocessing())
    return Converted(config, {**backbone, **head})


LAYOUTS = (
    Layout(
        "supervlad", ("supervlad-crossimage", "1-clustervlad"), "Lu-Feng/SuperVLAD (Google Drive, README)",
        "model_state_dict: backbone.* (DINOv2 ViT-B/14) + aggregation.conv.weight [+ encoder.layers.N.*]",
        tuple(PublishedFile(name, "DINOv2 ViT-B/14", "768" if name == "1-ClusterVLAD" else "3072", "322x322",
                            f"{name}.pth", DRIVE.format(ID=gid)) for name, gid in FILES.items()),
        detect, convert,
    ),
)
