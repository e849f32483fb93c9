"""MixVPR (Ali-bey et al., WACV 2023) and DINO-Mix (Huang et al. 2023): the feature-mixer aggregator.

The backbone's map F (C x H x W; ResNet-50 cut after layer3 for MixVPR, DINOv2 ViT-B/14 patch
tokens without the final LayerNorm for DINO-Mix) is read as C rows of length N = H*W (flattened
row-major), X^0 = flatten(F) in R^{C x N}. Each of the L Feature-Mixer blocks is an MLP over the
spatial dimension, shared by all channels, with a residual:
    X^{l+1} = X^l + W2 sigma(W1 LN(X^l))        (row-wise; LN over N, sigma = ReLU, W1: N -> r N, W2: r N -> N)
Then a depth-wise (channel) projection and a row-wise (spatial) projection reduce it to d x r':
    Z = W_d X^L + b_d   (channels C -> d, `channel_proj`),   O = W_r Z^T + b_r   (N -> r' rows, `row_proj`),
and the descriptor is L2(flatten(O)) of size d * r' (flattened as d rows of r': `out_channels x out_rows`).

Published files (plain state dicts despite the .ckpt name; DINO-Mix's is a Lightning checkpoint with
`state_dict`): `backbone.model.*` (torchvision ResNet, no layer4/fc) or `backbone.dino_model.*` (DINOv2,
no final norm), and `aggregator.{mix.L.mix.{0,1,3}, channel_proj, row_proj}`. The models take 320x320
(MixVPR, 20x20 map) or 224x224 (DINO-Mix, 16x16 map) images, resized as VPR-methods-evaluation does:
ToTensor -> Normalize -> Resize(antialias=True), bilinear.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vpr.data.images import IMAGENET_MEAN, IMAGENET_STD
from vpr.errors import CheckpointError, UsageError
from vpr.models import vit
from vpr.models.registry import Converted, Head, Layout, PublishedFile, merged_options
from vpr.models.statedict import dinov2_without_norm, numbered, refuse_unused, take, with_prefix

# The published MixVPR (4096-d) hyperparameters: `--head mixvpr` builds it.
DEFAULTS = {"out_channels": 1024, "out_rows": 4, "mix_depth": 4, "mlp_ratio": 1.0}
MIXVPR_URL = "https://drive.google.com/file/d/{ID}/view"
MIXVPR_FILES = {  # descriptor size -> (Google Drive id, file name, out_channels, out_rows), as in MixVPR's README
    4096: ("1vuz3PvnR7vxnDDLQrdHJaOA04SQrtk5L", "resnet50_MixVPR_4096_channels(1024)_rows(4).ckpt", 1024, 4),
    512: ("1khiTUNzZhfV2UUupZoIsPIbsMRBYVDqj", "resnet50_MixVPR_512_channels(256)_rows(2).ckpt", 256, 2),
    128: ("1DQnefjk1hVICOEYPwE4-CZAZOvi1NSJz", "resnet50_MixVPR_128_channels(64)_rows(2).ckpt", 64, 2),
}
DINOMIX_URL = "https://github.com/GaoShuang98/DINO-Mix/releases/download/v1.0.0/dinov2_vitb14_mix.ckpt"
# Torchvision ResNet children as vpr's trunk numbers them (nn.Sequential of conv1, bn1, relu, maxpool, layer1..4).
RESNET_CHILDREN = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
RESNET_DEPTHS = {6: "resnet50", 23: "resnet101", 36: "resnet152"}  # Bottleneck blocks in layer3


class FeatureMixerLayer(nn.Module):
    """One Feature-Mixer block over the N = H*W spatial positions: x + W2 ReLU(W1 LN(x)) (MixVPR's keys)."""

    def __init__(self, in_dim: int, mlp_ratio: float = 1.0) -> None:
        super().__init__()
        hidden = int(in_dim * mlp_ratio)
        self.mix = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, in_dim))
        for module in self.mix:
            if isinstance(module, nn.Linear):  # the authors' initialisation (for training from scratch)
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mix(x)


class MixVPR(nn.Module):
    """Feature maps B x C x H x W (or a ViT's (patch map, CLS)) -> B x (out_channels * out_rows), L2-normalised."""

    def __init__(self, in_channels: int, in_h: int, in_w: int, out_channels: int = 1024, mix_depth: int = 4,
                 mlp_ratio: float = 1.0, out_rows: int = 4) -> None:
        super().__init__()
        self.in_h, self.in_w = in_h, in_w
        hw = in_h * in_w
        self.mix = nn.Sequential(*(FeatureMixerLayer(hw, mlp_ratio) for _ in range(mix_depth)))
        self.channel_proj = nn.Linear(in_channels, out_channels)
        self.row_proj = nn.Linear(hw, out_rows)

    def forward(self, features: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = features[0] if isinstance(features, tuple) else features  # DINO-Mix mixes the patch tokens only
        if tuple(x.shape[-2:]) != (self.in_h, self.in_w):
            raise UsageError(
                f"MixVPR mixes a {self.in_h}x{self.in_w} feature map but got {x.shape[-2]}x{x.shape[-1]}: "
                "keep the model's input size (drop `resize`)"
            )
        x = self.mix(x.flatten(2))  # B x C x N, mixed along N
        x = self.channel_proj(x.transpose(1, 2))  # B x N x d
        x = self.row_proj(x.transpose(1, 2))  # B x d x r'
        return F.normalize(x.flatten(1), p=2, dim=-1)


def backbone_stride(config) -> int:
    """Pixels per feature-map cell of the config's backbone."""
    if config.backbone in vit.SIZES:
        return vit.PATCH
    if config.backbone == "vgg16":
        return 16
    return 16 if config.layer == 3 else 32


def _options(config) -> dict:
    """The head's hyperparameters: head_options over the published defaults; the map size from the input size."""
    defaults = {**DEFAULTS, "in_h": None, "in_w": None}
    if "in_h" not in config.head_options or "in_w" not in config.head_options:
        stride = backbone_stride(config)
        rounding = (lambda side: -(-side // stride)) if config.backbone.startswith("resnet") else (lambda side: side // stride)
        defaults.update(in_h=rounding(config.input_size[0]), in_w=rounding(config.input_size[1]))  # ResNet's padded
        # strided convs round up (120 px -> 8 cells at stride 16), VGG's pooling and ViT's whole patches down
    return merged_options(config, defaults, "mixvpr")


def build_head(config) -> MixVPR:
    options = _options(config)
    return MixVPR(config.channels, int(options["in_h"]), int(options["in_w"]), int(options["out_channels"]),
                  int(options["mix_depth"]), float(options["mlp_ratio"]), int(options["out_rows"]))


def descriptor_dim(config) -> int:
    options = _options(config)
    return int(options["out_channels"]) * int(options["out_rows"])


HEADS = (
    Head("mixvpr", "MixVPR feature-mixer: L spatial MLP blocks, channel and row projections (head_options: "
         "out_channels, out_rows, mix_depth, mlp_ratio)", "out_channels x out_rows (4096, 512, 128)",
         build_head, descriptor_dim),
)


# ----------------------------------------------------------------------------------- layouts

def resnet_trunk(state: dict[str, torch.Tensor], prefix: str, path: Path, method: str) -> tuple[str, int, dict]:
    """A torchvision ResNet under `prefix` (`backbone.model.`): (name, layer cut, tensors under vpr's `backbone.N.` keys)."""
    take(state, (f"{prefix}conv1.weight", f"{prefix}layer3.0.conv3.weight"), path, method)
    blocks = {int(k[len(prefix) + 7:].split(".")[0]) for k in state if k.startswith(f"{prefix}layer3.")}
    name = RESNET_DEPTHS.get(len(blocks))
    if name is None:
        raise CheckpointError(f"{path}: a {method} checkpoint with a ResNet of {len(blocks)} layer3 blocks; "
                              "only ResNet-50/101/152 trunks are supported")
    layer = 4 if any(k.startswith(f"{prefix}layer4.") for k in state) else 3
    weights = {}
    for key, tensor in with_prefix(state, prefix, "").items():
        child, _, rest = key.partition(".")
        if child not in RESNET_CHILDREN:
            raise CheckpointError(f"{path}: a {method} checkpoint with an unexpected trunk tensor {prefix}{key}")
        weights[f"backbone.{RESNET_CHILDREN[child]}.{rest}"] = tensor
    return name, layer, weights


def mixer_options(state: dict[str, torch.Tensor], path: Path, method: str) -> dict:
    """MixVPR's hyperparameters from its `aggregator.*` shapes (the map is square in every published model)."""
    channel_w, row_w = take(state, ("aggregator.channel_proj.weight", "aggregator.row_proj.weight"), path, method)
    depth = numbered(state, "aggregator.mix.")
    if depth == 0:
        raise CheckpointError(f"{path}: not a {method} checkpoint: missing aggregator.mix.0.*")
    hw = row_w.shape[1]
    side = math.isqrt(hw)
    if side * side != hw:
        raise CheckpointError(f"{path}: a {method} checkpoint mixing {hw} positions, not a square map")
    (hidden,) = take(state, ("aggregator.mix.0.mix.1.weight",), path, method)
    return {"in_h": side, "in_w": side, "out_channels": int(channel_w.shape[0]), "out_rows": int(row_w.shape[0]),
            "mix_depth": depth, "mlp_ratio": hidden.shape[0] / hw}


MIXER_PREFIXES = ("aggregator.mix.", "aggregator.channel_proj.", "aggregator.row_proj.")


def _has(state: dict[str, torch.Tensor], prefixes: str | tuple[str, ...]) -> bool:
    return any(k.startswith(prefixes) for k in state)


def detect_mixvpr(state: dict[str, torch.Tensor]) -> bool:  # any part of it, so that a damaged file is named
    return _has(state, MIXER_PREFIXES) and _has(state, "backbone.model.")


def convert_mixvpr(state: dict[str, torch.Tensor], path: Path, extras: dict) -> Converted:
    """MixVPR's VPRModel: `backbone.model.*` (torchvision ResNet cut after layer3) + `aggregator.*`."""
    options = mixer_options(state, path, "MixVPR")
    name, layer, weights = resnet_trunk(state, "backbone.model.", path, "MixVPR")
    stride = 16 if layer == 3 else 32
    head = with_prefix(state, "aggregator.", "head.")
    refuse_unused(state, path, "MixVPR", ("backbone.model.", "aggregator."))
    config = dict(backbone=name, layer=layer, head="mixvpr", head_options=options,
                  input_size=(options["in_h"] * stride, options["in_w"] * stride), resize="fixed", multiple=1,
                  interpolation="bilinear", resampler="torch", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return Converted(config, {**weights, **head})


def detect_dinomix(state: dict[str, torch.Tensor]) -> bool:
    return _has(state, MIXER_PREFIXES) and _has(state, "backbone.dino_model.")


def convert_dinomix(state: dict[str, torch.Tensor], path: Path, extras: dict) -> Converted:
    """DINO-Mix: `backbone.dino_model.*` (torch.hub DINOv2 with `norm` and `head` emptied) + `aggregator.*`."""
    options = mixer_options(state, path, "DINO-Mix")
    prefix = "backbone.dino_model."
    # The authors replace DINOv2's final norm (and head) by empty nn.Sequential(): no tensors (a norm in the file is
    # one their forward never applies), no final LayerNorm.
    name, trunk, backbone_options = dinov2_without_norm(state, prefix, path, "DINO-Mix")
    refuse_unused(state, path, "DINO-Mix", (prefix, "aggregator."))
    config = dict(backbone=name, layer=4, head="mixvpr", head_options=options, backbone_options=backbone_options,
                  input_size=(options["in_h"] * vit.PATCH, options["in_w"] * vit.PATCH), resize="fixed", multiple=1,
                  interpolation="bilinear", resampler="torch", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return Converted(config, {**trunk, **with_prefix(state, "aggregator.", "head.")})


LAYOUTS = (
    Layout(
        "mixvpr", (), "amaralibey/MixVPR (README: model.load_state_dict(torch.load(FILE)))",
        "backbone.model.* (ResNet to layer3) + aggregator.{mix.N.mix.{0,1,3}, channel_proj, row_proj}",
        tuple(PublishedFile("MixVPR", "ResNet-50 (to layer3)", str(dim), "320x320", file, MIXVPR_URL.format(ID=gid))
              for dim, (gid, file, _, _) in MIXVPR_FILES.items()),
        detect_mixvpr, convert_mixvpr,
    ),
    Layout(
        "dinomix", ("dino-mix",), "GaoShuang98/DINO-Mix (release v1.0.0, Lightning checkpoint)",
        "state_dict: backbone.dino_model.* (DINOv2, no final norm) + aggregator.{mix.N.*, channel_proj, row_proj}",
        (PublishedFile("DINO-Mix", "DINOv2 ViT-B/14", "4096", "224x224", "dinov2_vitb14_mix.ckpt", DINOMIX_URL),),
        detect_dinomix, convert_dinomix,
    ),
)
