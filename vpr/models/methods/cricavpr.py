"""CricaVPR (Lu et al., CVPR 2024): cross-image correlation-aware representations.

Backbone: DINOv2 ViT-B/14 whose every block carries a multi-scale convolutional adapter (MulConvAdapter)
added to the MLP branch with weight 0.2, inside the layer scale:
    x' = x + ls1 * Attn(LN1(x)),   x'' = x' + ls2 * (MLP(LN2(x')) + 0.2 * Adapter(LN2(x')))
    Adapter(t) = W_up (u + [conv1x1(u); conv3x3(conv1x1(u)); conv5x5(conv1x1(u))]),  u = ReLU(W_down t)
(each conv is Conv2d + BatchNorm2d(eps 1e-3) + ReLU over the patch grid, the CLS token passing through as u).

Aggregation: with P the L2-normalised patch map (each token to unit norm over channels) on the
16 x 16 grid of a 224 x 224 input and GeM(X) = (mean_{i,j} X_ij^p)^(1/p) (p learnt, init 3):
    g_0 = CLS token (after the final LayerNorm)
    g_1..g_4  = GeM over the 2 x 2 regions of P (rows/cols 0:8 | 8:16)
    g_5..g_13 = GeM over the 3 x 3 regions of P (rows/cols 0:5 | 5:11 | 11:16)
The 14 region descriptors G = [g_0 .. g_13] (14 x 768) of each image go through the cross-image
encoder, two post-norm Transformer encoder layers (16 heads, FFN 2048, GELU) whose sequence axis is
the *batch of images*: for region r, the B images' g_r attend to each other,
    Z = LN1(G + MHA(G, G, G)),   E = LN2(Z + W2 GELU(W1 Z + b1) + b2)      (attention over images)
and the descriptor is L2(flatten(E)) of 14 x 768 = 10752 dims.

Cross-image dependency. In the authors' code a descriptor depends on the other images of its batch
(VPR-methods-evaluation extracts queries one at a time and the database in batches of 4, CricaVPR's
own eval in batches of 16). vpr makes a descriptor a function of its image alone by default:
`head_options["cross_image"] = "single"` runs the encoder on a sequence of one image (exactly the
authors' output for a batch of one, i.e. VPR-methods-evaluation's queries), so indexes, caches and
distributed extraction are reproducible. `"batch"` reproduces the authors' batched behaviour exactly
(the encoder attends over the images of each forward batch; results then depend on batch size and order).

Published file: CricaVPR.pth (GitHub release v1.0, the file behind `torch.hub.load('Lu-Feng/CricaVPR',
'trained_model')`): {"model_state_dict": DataParallel keys `module.backbone.*` (DINOv2 + adapters),
`module.aggregation.1.p` (GeM), `module.encoder.layers.{0,1}.*`}. Preprocessing as VPR-methods-evaluation:
ToTensor -> Normalize(ImageNet) -> ResizingWrapper(224): a 224 x 224 tensor resize, bilinear, antialiased.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vpr.data.images import IMAGENET_MEAN, IMAGENET_STD
from vpr.errors import CheckpointError, UsageError
from vpr.models import vit
from vpr.models.layers import GeM
from vpr.models.registry import Backbone, Converted, Head, Layout, PublishedFile, merged_options
from vpr.models.statedict import numbered, refuse_unused, take, with_prefix

URL = "https://github.com/Lu-Feng/CricaVPR/releases/download/v1.0/CricaVPR.pth"
BACKBONE = "dinov2_vitb14_cricavpr"
ADAPTER_WEIGHT = 0.2  # the adapter's weight inside the MLP branch (block.py)
# 2 x 2 and 3 x 3 regions of the 16 x 16 patch grid, as (row slice, col slice), in the authors' order.
REGIONS = tuple((slice(r0, r1), slice(c0, c1)) for r0, r1 in ((0, 8), (8, None)) for c0, c1 in ((0, 8), (8, None))) + \
    tuple((slice(r0, r1), slice(c0, c1)) for r0, r1 in ((0, 5), (5, 11), (11, None)) for c0, c1 in ((0, 5), (5, 11), (11, None)))
MIN_GRID = 12  # the last region starts at row/column 11
DEFAULTS = {"heads": 16, "ffn": 2048, "layers": 2, "cross_image": "single"}
CROSS_IMAGE = ("single", "batch")


# ----------------------------------------------------------------------------------- backbone

class BasicConv2d(nn.Module):
    """Conv2d (bias) + BatchNorm2d (eps 1e-3) + ReLU: the adapter's conv unit (keys `conv`, `bn`)."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=True, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class MulConvAdapter(nn.Module):
    """CricaVPR's adapter: down-projection, three conv branches (1x1, 3x3, 5x5) over the patch grid, up-projection."""

    def __init__(self, dim: int = 768, hidden: int = 384, ch1x1: int = 192, ch3x3red: int = 24, ch3x3: int = 96,
                 ch5x5red: int = 24, ch5x5: int = 96) -> None:
        super().__init__()
        self.branch1 = BasicConv2d(hidden, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv2d(hidden, ch3x3red, kernel_size=1),
                                     BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(hidden, ch5x5red, kernel_size=1),
                                     BasicConv2d(ch5x5red, ch5x5, kernel_size=5, padding=2))
        self.D_fc1 = nn.Linear(dim, hidden)
        self.D_fc2 = nn.Linear(hidden, dim)
        self.grid: tuple[int, int] | None = None  # (rows, cols) of the patch grid, set by the backbone per forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = F.relu(self.D_fc1(x))  # B x (1 + h*w) x hidden
        batch, tokens, hidden = u.shape
        rows, cols = self.grid if self.grid is not None else (int((tokens - 1) ** 0.5),) * 2
        grid = u[:, 1:].reshape(batch, rows, cols, hidden).permute(0, 3, 1, 2)
        conv = torch.cat([self.branch1(grid), self.branch2(grid), self.branch3(grid)], dim=1)
        conv = conv.reshape(batch, hidden, rows * cols).permute(0, 2, 1)
        return self.D_fc2(torch.cat([u[:, :1], conv], dim=1) + u)


def _adapter_block_class():
    from timm.models.vision_transformer import Block

    class AdapterBlock(Block):
        """timm's ViT block with CricaVPR's adapter: x += ls2 * (MLP(LN2 x) + 0.2 * Adapter(LN2 x))."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.adapter = MulConvAdapter(self.norm2.normalized_shape[0])

        def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
            x = x + self.ls1(self.attn(self.norm1(x)))
            y = self.norm2(x)
            return x + self.ls2(self.mlp(y) + ADAPTER_WEIGHT * self.adapter(y))

    return AdapterBlock


class CricaDinoV2(vit.DinoV2):
    """DINOv2 ViT-B/14 with a MulConvAdapter in every block (DINOv2 keys + `blocks.N.adapter.*`)."""

    def __init__(self, name: str = "dinov2_vitb14", blocks: int | None = None) -> None:
        super().__init__(name, blocks=blocks)
        dim, _, heads, _ = vit.SIZES[name]
        block = _adapter_block_class()
        self.blocks = nn.ModuleList(
            block(dim, heads, qkv_bias=True, init_values=1e-5, norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(self.depth)
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grid = (images.shape[-2] // vit.PATCH, images.shape[-1] // vit.PATCH)
        for block in self.blocks:
            block.adapter.grid = grid
        return super().forward(images)


BACKBONES = (
    Backbone(BACKBONE, "DINOv2 ViT-B/14 with CricaVPR's multi-scale conv adapters in every block: "
             "(patch map, CLS) of 768 channels", {4: 768},
             vit.vit_builder(CricaDinoV2, "dinov2_vitb14", BACKBONE), vit=True, preprocessing=vit.dinov2_preprocessing()),
)


# ----------------------------------------------------------------------------------- head

class CricaVPR(nn.Module):
    """(patch map B x C x h x w, CLS B x C) -> B x 14C: CLS + 13 GeM regions through the cross-image encoder."""

    def __init__(self, channels: int = 768, heads: int = 16, ffn: int = 2048, layers: int = 2,
                 cross_image: str = "single") -> None:
        super().__init__()
        if cross_image not in CROSS_IMAGE:
            raise UsageError(f"cricavpr head: cross_image '{cross_image}' is not one of {', '.join(CROSS_IMAGE)}")
        self.cross_image = cross_image
        self.gem = GeM(p=3.0)
        layer = nn.TransformerEncoderLayer(d_model=channels, nhead=heads, dim_feedforward=ffn, activation="gelu",
                                           dropout=0.1, batch_first=False)
        self.encoder = nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)

    def regions(self, patches: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """B x 14 x C: the CLS token and the GeM of the 13 regions of the L2-normalised patch map."""
        if patches.shape[-2] < MIN_GRID or patches.shape[-1] < MIN_GRID:
            raise UsageError(f"CricaVPR pools fixed regions of a 16x16 patch grid but got {patches.shape[-2]}x"
                             f"{patches.shape[-1]}: keep the model's 224x224 input (drop `resize`)")
        patches = F.normalize(patches, p=2, dim=1)
        pooled = [self.gem(patches[:, :, rows, cols]) for rows, cols in REGIONS]
        return torch.stack([cls, *pooled], dim=1)

    def forward(self, features: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        patches, cls = features
        tokens = self.regions(patches, cls)
        batch, count, channels = tokens.shape
        if self.cross_image == "batch":  # the authors' (S=B images, N=14 regions, C): attention across the batch
            encoded = self.encoder(tokens)
        else:  # each image alone: a sequence of one image for each of its B*14 regions
            encoded = self.encoder(tokens.reshape(1, batch * count, channels))
        return F.normalize(encoded.reshape(batch, count * channels), p=2, dim=-1)


def _options(config) -> dict:
    return merged_options(config, DEFAULTS, "cricavpr")


def build_head(config) -> CricaVPR:
    options = _options(config)
    return CricaVPR(config.channels, int(options["heads"]), int(options["ffn"]), int(options["layers"]),
                    str(options["cross_image"]))


def descriptor_dim(config) -> int:
    _options(config)
    return (1 + len(REGIONS)) * config.channels


HEADS = (
    Head("cricavpr", "CricaVPR: CLS + GeM of 2x2 and 3x3 regions, cross-image Transformer encoder (head_options: "
         "cross_image single|batch, heads, ffn, layers)", "14 x C (10752)", build_head, descriptor_dim),
)


# ----------------------------------------------------------------------------------- layout

def detect(state: dict[str, torch.Tensor]) -> bool:
    return "backbone.blocks.0.adapter.D_fc1.weight" in state and "encoder.layers.0.self_attn.in_proj_weight" in state


def convert(state: dict[str, torch.Tensor], path: Path, extras: dict) -> Converted:
    """CricaVPR.pth: `backbone.*` (DINOv2 ViT-B/14 + adapters) + `aggregation.1.p` + `encoder.layers.N.*`."""
    what = "CricaVPR"
    proj, _, _ = take(state, ("backbone.patch_embed.proj.weight", "aggregation.1.p",
                              "encoder.layers.1.self_attn.in_proj_weight"), path, what)
    if proj.shape[0] != 768:
        raise CheckpointError(f"{path}: a {what} checkpoint with a {proj.shape[0]}-wide ViT; CricaVPR uses ViT-B/14 (768)")
    layers = numbered(state, "encoder.layers.")
    backbone = with_prefix(state, "backbone.", "backbone.")
    head = {"head.gem.p": state["aggregation.1.p"], **with_prefix(state, "encoder.", "head.encoder.")}
    refuse_unused(state, path, what, ("backbone.", "encoder."), ("aggregation.1.p",))
    backbone_options = vit.blocks_option("dinov2_vitb14", numbered(state, "backbone.blocks."))
    config = dict(backbone=BACKBONE, layer=4, head="cricavpr", backbone_options=backbone_options,
                  head_options={**DEFAULTS, "layers": layers}, input_size=(224, 224), resize="fixed", multiple=1,
                  interpolation="bilinear", resampler="torch", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return Converted(config, {**backbone, **head})


LAYOUTS = (
    Layout(
        "cricavpr", ("crica",), "Lu-Feng/CricaVPR (release v1.0, torch.hub 'trained_model')",
        "model_state_dict: backbone.* (DINOv2 ViT-B/14 + blocks.N.adapter.*) + aggregation.1.p + encoder.layers.N.*",
        (PublishedFile("CricaVPR", "DINOv2 ViT-B/14 + adapters", "10752", "224x224", "CricaVPR.pth", URL),),
        detect, convert,
    ),
)
