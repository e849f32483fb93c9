"""MegaLoc (Berton & Masone, "MegaLoc: One Retrieval to Place Them All", 2025): a DINOv2 ViT-B/14 and a
SALAD aggregator (`vpr.models.methods.salad.SALAD`, equations there) with wider clusters, then a linear layer:
    x = SALAD(t_1..t_n, t_{n+1}) in R^{g + m*l}   (m = 64 clusters of l = 256 dims, g = 256: 16640-d, L2-normalised)
    y = L2(W x + b) in R^8448                     (`linear`, W: 8448 x 16640)
The published model takes images at their native size and resizes each side to the nearest multiple
of 14 itself (torchvision's tensor resize, bilinear, antialias=True) after ImageNet normalisation.

Layout `megaloc`: gmberton/MegaLoc's `model.safetensors` (Hugging Face gberton/MegaLoc): `backbone.*` (its own
DINOv2 ViT-B/14 with DINOv2's key names, no `mask_token`) + `aggregator.agg.{token_features, cluster_features,
score, dust_bin}` + `aggregator.linear.{weight, bias}`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vpr.errors import CheckpointError
from vpr.models import vit
from vpr.models.registry import Converted, Head, Layout, PublishedFile, merged_options
from vpr.models.methods.salad import (NATIVE_14, SALAD, dinov2_backbone, require_vit,
                              salad_options, salad_weights)
from vpr.models.statedict import refuse_unused, take, with_prefix

# The published MegaLoc's hyperparameters: `--head megaloc` builds it.
DEFAULTS = {"num_clusters": 64, "cluster_dim": 256, "token_dim": 256, "mlp_dim": 512, "out_dim": 8448}
MEGALOC_URL = "https://huggingface.co/gberton/MegaLoc/resolve/main/model.safetensors"


class MegaLocHead(nn.Module):
    """SALAD (`agg`) then a Linear (`linear`) and L2: (patch map, CLS) -> B x out_dim."""

    def __init__(self, channels: int = 768, num_clusters: int = 64, cluster_dim: int = 256, token_dim: int = 256,
                 mlp_dim: int = 512, out_dim: int = 8448) -> None:
        super().__init__()
        self.agg = SALAD(channels, num_clusters, cluster_dim, token_dim, mlp_dim)
        self.linear = nn.Linear(self.agg.out_dim, out_dim)

    def forward(self, features: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.linear(self.agg(features)), dim=-1)


def head_options(config) -> dict:
    options = merged_options(config, DEFAULTS, "megaloc")
    return {k: int(v) for k, v in options.items()}


def build_head(config) -> MegaLocHead:
    require_vit(config, "megaloc")
    return MegaLocHead(config.channels, **head_options(config))


def descriptor_dim(config) -> int:
    return head_options(config)["out_dim"]


HEADS = (
    Head("megaloc", "MegaLoc: the SALAD aggregator (64 clusters of 256 dims + 256-d token) then Linear -> L2 "
         "(head_options: num_clusters, cluster_dim, token_dim, mlp_dim, out_dim)", "out_dim (8448)",
         build_head, descriptor_dim),
)


def detect_megaloc(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("aggregator.agg.") for k in state)  # any part of it: a damaged file is named


def convert_megaloc(state: dict[str, torch.Tensor], path: Path, extras: dict) -> Converted:
    """MegaLoc: `backbone.*` (DINOv2 ViT) + `aggregator.agg.*` (SALAD) + `aggregator.linear.*`."""
    method = "MegaLoc"
    options = salad_options(state, "aggregator.agg.", path, method)
    linear_w, linear_b = take(state, ("aggregator.linear.weight", "aggregator.linear.bias"), path, method)
    salad_dim = options["token_dim"] + options["num_clusters"] * options["cluster_dim"]
    if linear_w.dim() != 2 or linear_w.shape[1] != salad_dim or linear_b.shape != linear_w.shape[:1]:
        raise CheckpointError(f"{path}: a {method} checkpoint whose aggregator.linear {list(linear_w.shape)} does not "
                              f"fit its {salad_dim}-d SALAD output (expected [D, {salad_dim}])")
    options["out_dim"] = int(linear_w.shape[0])
    name, weights = dinov2_backbone(state, "backbone.", path, method)
    refuse_unused(state, path, method, ("backbone.", "aggregator.agg.", "aggregator.linear."))
    # (MegaLoc's ViT has no mask_token: dinov2_backbone gives vpr's unused one zeros.)
    salad_keys = {k: v for k, v in options.items() if k != "out_dim"}
    head = {**salad_weights(state, "aggregator.agg.", salad_keys, "head.agg.", path, method),
            **with_prefix(state, "aggregator.linear.", "head.linear.")}
    config = dict(backbone=name, layer=4, head="megaloc", head_options=options, descriptor_dim=options["out_dim"],
                  **vit.dinov2_preprocessing("native"))
    return Converted(config, {**weights, **head})


LAYOUTS = (
    Layout("megaloc", (), "gmberton/MegaLoc (torch.hub get_trained_model; Hugging Face gberton/MegaLoc)",
           "backbone.{cls_token, pos_embed, patch_embed.*, blocks.N.*, norm.*} + aggregator.agg.{token_features, "
           "cluster_features, score, dust_bin} + aggregator.linear.{weight, bias}",
           (PublishedFile("MegaLoc", "DINOv2 ViT-B/14", "8448", NATIVE_14, "model.safetensors", MEGALOC_URL),),
           detect_megaloc, convert_megaloc),
)
