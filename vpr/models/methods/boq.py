"""BoQ, "A Place is Worth a Bag of Learnable Queries" (Ali-bey, Chaib-draa, Giguère, CVPR 2024).

The backbone's map F (C x H x W: ResNet-50 cut after layer3, or DINOv2 ViT-B/14 patch tokens
WITHOUT its final LayerNorm) is projected by a 3x3 convolution to d channels and read as N = H*W
tokens (row-major), each layer-normalised:
    X^0 = LN(flatten(Conv3x3(F)))                                         X^0 in R^{N x d}
Each of the L BoQ blocks refines the tokens with a transformer encoder layer (post-norm, ReLU MLP
of width 4d, h = d/64 heads) and lets its own bag of M learned queries Q^i in R^{M x d} look at them:
    X^i   = LN(Y + W2 ReLU(W1 Y)),  Y = LN(X^{i-1} + MHA(X^{i-1}, X^{i-1}, X^{i-1}))   (`encoder`)
    Q~^i  = LN(Q^i + MHA(Q^i, Q^i, Q^i))                  (self-attention of the queries, `self_attn`, `norm_q`;
                                                           independent of the image)
    O^i   = LN(MHA(Q~^i, X^i, X^i))                        (cross-attention, `cross_attn`, `norm_out`)
with MHA(Q, K, V) = concat_h softmax((Q W_q^h)(K W_k^h)^T / sqrt(d/h)) (V W_v^h) W_o (+ biases).
The L outputs are stacked, O = [O^1; ...; O^L] in R^{LM x d}, and a linear map over the LM query
outputs reduces them to r rows:
    D = O^T W_r^T + b_r in R^{d x r},        descriptor = L2(flatten(D))  of size d * r.
Published: ResNet-50 d=512, M=64, L=2, r=32 -> 16384-d at 384x384; DINOv2 ViT-B/14 d=384, M=64,
L=2, r=32 -> 12288-d at 322x322 (the sizes VPR-methods-evaluation forces; resized as it does:
ToTensor -> Normalize -> Resize(antialias=True), bilinear).

Published files (GitHub release v1.0 of amaralibey/Bag-of-Queries, plain state dicts loaded
strictly by its hubconf.py): `backbone.net.{0,1,4,5,6}.*` (torchvision conv1, bn1, layer1..3) or
`backbone.dino.*` (DINOv2, its `norm` present but never applied by the authors' forward), plus
`aggregator.{proj_c, norm_input, boqs.i.{encoder.*, queries, self_attn, norm_q, cross_attn, norm_out}, fc}`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vpr.data.images import IMAGENET_MEAN, IMAGENET_STD
from vpr.errors import CheckpointError, UsageError
from vpr.models import vit
from vpr.models.registry import Converted, Head, Layout, PublishedFile, merged_options
from vpr.models.statedict import dinov2_without_norm, numbered, refuse_unused, take, with_prefix

RELEASE = "https://github.com/amaralibey/Bag-of-Queries/releases/download/v1.0/"
# The published hyperparameters: `--head boq` builds them (d = 384 on a ViT, 512 on a CNN, as published).
DEFAULTS = {"num_queries": 64, "num_layers": 2, "row_dim": 32}
OPTIONS = ("proj_channels", "num_queries", "num_layers", "row_dim", "heads")
# the authors' ResNet input: a 384 x 384 float resize (antialiased) after Normalize, as VPR-methods-evaluation runs it
RESNET_PREPROCESSING = dict(input_size=(384, 384), resize="fixed", multiple=1, interpolation="bilinear", resampler="torch",
                            mean=IMAGENET_MEAN, std=IMAGENET_STD)
# The authors' ResNet trunk nn.Sequential(conv1, bn1, relu, maxpool, layer1, layer2, layer3) numbers its
# children as vpr's torchvision trunk cut after layer3 does: `backbone.net.N.*` -> `backbone.N.*`.
RESNET_DEPTHS = {6: "resnet50", 23: "resnet101", 36: "resnet152"}  # Bottleneck blocks in layer3


class BoQBlock(nn.Module):
    """One BoQ block: encoder layer over the tokens, then M learned queries cross-attend to them."""

    def __init__(self, dim: int, num_queries: int, heads: int) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(d_model=dim, nhead=heads, dim_feedforward=4 * dim, dropout=0.0,
                                                  batch_first=True)
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim))
        self.self_attn = nn.MultiheadAttention(dim, num_heads=heads, batch_first=True)
        self.norm_q = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads=heads, batch_first=True)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.encoder(x)
        q = self.queries
        q = self.norm_q(q + self.self_attn(q, q, q, need_weights=False)[0])  # the same for every image: once
        q = q.expand(x.shape[0], -1, -1)
        out = self.cross_attn(q, x, x, need_weights=False)[0]
        return x, self.norm_out(out)


class BoQ(nn.Module):
    """Feature maps B x C x H x W (or a ViT's (patch map, CLS)) -> B x (proj_channels * row_dim), L2-normalised."""

    def __init__(self, in_channels: int, proj_channels: int = 512, num_queries: int = 64, num_layers: int = 2,
                 row_dim: int = 32, heads: int | None = None) -> None:
        super().__init__()
        heads = heads or max(1, proj_channels // 64)  # the authors' rule: d / 64 heads
        if proj_channels % heads:
            raise UsageError(f"boq head: proj_channels {proj_channels} is not divisible by heads {heads}")
        self.proj_c = nn.Conv2d(in_channels, proj_channels, kernel_size=3, padding=1)
        self.norm_input = nn.LayerNorm(proj_channels)
        self.boqs = nn.ModuleList(BoQBlock(proj_channels, num_queries, heads) for _ in range(num_layers))
        self.fc = nn.Linear(num_layers * num_queries, row_dim)

    def forward(self, features: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = features[0] if isinstance(features, tuple) else features  # BoQ reads the patch tokens only
        x = self.norm_input(self.proj_c(x).flatten(2).transpose(1, 2))  # X^0: B x N x d
        outs = []
        for block in self.boqs:
            x, out = block(x)
            outs.append(out)
        out = self.fc(torch.cat(outs, dim=1).transpose(1, 2))  # B x d x r
        return F.normalize(out.flatten(1), p=2, dim=-1)


def _options(config) -> dict:
    """The head's hyperparameters: head_options over the published defaults."""
    options = merged_options(config, {k: DEFAULTS.get(k) for k in OPTIONS}, "boq")
    if options.get("proj_channels") is None:
        options["proj_channels"] = 384 if config.backbone in vit.SIZES else 512
    if options.get("heads") is None:
        options["heads"] = max(1, int(options["proj_channels"]) // 64)
    return {k: int(v) for k, v in options.items()}


def build_head(config) -> BoQ:
    options = _options(config)
    return BoQ(config.channels, options["proj_channels"], options["num_queries"], options["num_layers"],
               options["row_dim"], options["heads"])


def descriptor_dim(config) -> int:
    options = _options(config)
    return options["proj_channels"] * options["row_dim"]


HEADS = (
    Head("boq", "BoQ: 3x3 projection, L blocks of (encoder layer + M learned queries cross-attending), "
         "linear over the L*M outputs (head_options: proj_channels, num_queries, num_layers, row_dim, heads)",
         "proj_channels x row_dim (16384 ResNet-50, 12288 DINOv2)", build_head, descriptor_dim),
)


# ----------------------------------------------------------------------------------- layout

def head_options(state: dict[str, torch.Tensor], path: Path) -> tuple[dict, int]:
    """BoQ's hyperparameters from the `aggregator.*` shapes, and the channels it expects."""
    proj, fc, queries = take(state, ("aggregator.proj_c.weight", "aggregator.fc.weight", "aggregator.boqs.0.queries"),
                             path, "BoQ")
    layers = numbered(state, "aggregator.boqs.")
    dim = int(proj.shape[0])
    if queries.dim() != 3 or queries.shape[2] != dim or fc.shape[1] != layers * queries.shape[1]:
        raise CheckpointError(f"{path}: a BoQ checkpoint with inconsistent shapes (queries {tuple(queries.shape)}, "
                              f"fc {tuple(fc.shape)}, {layers} blocks of width {dim})")
    (ffn,) = take(state, ("aggregator.boqs.0.encoder.linear1.weight",), path, "BoQ")
    if ffn.shape[0] != 4 * dim:
        raise CheckpointError(f"{path}: a BoQ checkpoint whose encoder MLP is {ffn.shape[0]} wide, not 4 x {dim}")
    # the number of heads is not in the shapes: the authors always use d / 64
    options = {"proj_channels": dim, "num_queries": int(queries.shape[1]), "num_layers": layers,
               "row_dim": int(fc.shape[0]), "heads": max(1, dim // 64)}
    return options, int(proj.shape[1])


def _resnet(state: dict[str, torch.Tensor], path: Path) -> tuple[dict, dict]:
    """`backbone.net.*` (torchvision children 0, 1, 4, 5, 6) -> vpr's ResNet trunk cut after layer3."""
    take(state, ("backbone.net.0.weight", "backbone.net.1.running_var", "backbone.net.6.0.conv3.weight"), path, "BoQ")
    trunk = with_prefix(state, "backbone.net.", "backbone.")
    children = {k.split(".")[1] for k in trunk}
    if not children <= {"0", "1", "4", "5", "6"}:
        raise CheckpointError(f"{path}: a BoQ checkpoint with a ResNet trunk beyond layer3 "
                              f"(children {', '.join(sorted(children))}); the published trunk stops at layer3")
    blocks = numbered(trunk, "backbone.6.")
    name = RESNET_DEPTHS.get(blocks)
    if name is None:
        raise CheckpointError(f"{path}: a BoQ checkpoint with a ResNet of {blocks} layer3 blocks; "
                              "only ResNet-50/101/152 trunks are supported")
    config = dict(backbone=name, layer=3, **RESNET_PREPROCESSING)
    return config, trunk


def _dinov2(state: dict[str, torch.Tensor], path: Path) -> tuple[dict, dict]:
    """`backbone.dino.*` (torch.hub DINOv2) -> vpr's DinoV2 without the final LayerNorm."""
    # The authors' DinoV2.forward runs the blocks and drops the CLS token; it never applies `dino.norm`
    # (their hubconf keeps the module only so the file loads strictly): those two tensors are unused.
    name, trunk, backbone_options = dinov2_without_norm(state, "backbone.dino.", path, "BoQ")
    # DINOv2 needs sides that are multiples of 14: a --resize override is rounded as the DINOv2 tools do
    config = dict(backbone=name, layer=4, backbone_options=backbone_options, **vit.dinov2_preprocessing())
    return config, trunk


def detect_boq(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("aggregator.boqs.") for k in state) and "aggregator.proj_c.weight" in state


def convert_boq(state: dict[str, torch.Tensor], path: Path, extras: dict) -> Converted:
    """BoQ's VPRModel (hubconf.py): `backbone.net.*` (ResNet) or `backbone.dino.*` (DINOv2) + `aggregator.*`."""
    options, channels = head_options(state, path)
    if any(k.startswith("backbone.dino.") for k in state):
        config, trunk = _dinov2(state, path)
        backbone_prefix = "backbone.dino."
    elif any(k.startswith("backbone.net.") for k in state):
        config, trunk = _resnet(state, path)
        backbone_prefix = "backbone.net."
    else:
        raise CheckpointError(f"{path}: a BoQ checkpoint without its backbone (no backbone.net.* or backbone.dino.*); "
                              "the file is truncated or not one of the published BoQ models")
    refuse_unused(state, path, "BoQ", (backbone_prefix, "aggregator."))
    config.update(head="boq", head_options=options)
    expected = vit.vit_channels(config["backbone"]) if config["backbone"] in vit.SIZES else 1024
    if channels != expected:
        raise CheckpointError(f"{path}: a BoQ checkpoint whose projection reads {channels} channels, "
                              f"but its {config['backbone']} backbone gives {expected}")
    return Converted(config, {**trunk, **with_prefix(state, "aggregator.", "head.")})


LAYOUTS = (
    Layout(
        "boq", ("bag-of-queries",), "amaralibey/Bag-of-Queries (release v1.0, torch.hub get_trained_boq)",
        "backbone.net.* (ResNet to layer3) | backbone.dino.* (DINOv2) + "
        "aggregator.{proj_c, norm_input, boqs.N.{encoder, queries, self_attn, norm_q, cross_attn, norm_out}, fc}",
        (PublishedFile("BoQ", "ResNet-50 (to layer3)", "16384", "384x384", "resnet50_16384.pth",
                       RELEASE + "resnet50_16384.pth"),
         PublishedFile("BoQ", "DINOv2 ViT-B/14", "12288", "322x322", "dinov2_12288.pth", RELEASE + "dinov2_12288.pth")),
        detect_boq, convert_boq,
    ),
)
