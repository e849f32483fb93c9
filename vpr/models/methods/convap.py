"""Conv-AP (Ali-bey et al., "GSV-Cities", Neurocomputing 2022): channel-wise pooling then spatial pooling.

For the backbone's map F (C x H x W, ResNet-50 after layer4):
    G = W * F + b            a 1x1 convolution reducing the channels C -> d (`channel_pool`)
    P = AAP_{s1 x s2}(G)     adaptive average pooling to an s1 x s2 grid: P_{k,i,j} = mean of G_k over cell (i, j)
    descriptor = L2(flatten(P))   of size d * s1 * s2 (flattened channel-major, as torch's flatten)
Published: `resnet50_ConvAP_{d}_2x2.ckpt` for d = 128, 512, 1024, 2048 (512- to 8192-d), plain state dicts
`backbone.model.*` (torchvision ResNet-50, no fc) + `aggregator.channel_pool.{weight, bias}`, trained and
evaluated at 320x320 (VPR-methods-evaluation resizes the normalised tensor with Resize([320, 320]), bilinear,
antialiased).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vpr.errors import CheckpointError
from vpr.data.images import IMAGENET_MEAN, IMAGENET_STD
from vpr.models.methods.mixvpr import resnet_trunk
from vpr.models.registry import Converted, Head, Layout, PublishedFile, merged_options
from vpr.models.statedict import refuse_unused, take, with_prefix

# The reference tool's default Conv-AP (8192-d): `--head convap` builds it.
DEFAULTS = {"out_channels": 2048, "s1": 2, "s2": 2}
URL = "https://drive.google.com/drive/folders/1VYPw9uGD11NgiGFgfWueLt3noJYOIuhL"
FILES = {512: "resnet50_ConvAP_128_2x2.ckpt", 2048: "resnet50_ConvAP_512_2x2.ckpt",
         4096: "resnet50_ConvAP_1024_2x2.ckpt", 8192: "resnet50_ConvAP_2048_2x2.ckpt"}


class ConvAP(nn.Module):
    """Feature maps B x C x H x W -> B x (out_channels * s1 * s2), L2-normalised."""

    def __init__(self, in_channels: int, out_channels: int = 2048, s1: int = 2, s2: int = 2) -> None:
        super().__init__()
        self.channel_pool = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=True)
        self.pool = nn.AdaptiveAvgPool2d((s1, s2))  # no weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.pool(self.channel_pool(x)).flatten(1), p=2, dim=1)


def _options(config) -> dict:
    options = merged_options(config, DEFAULTS, "convap")
    return {k: int(v) for k, v in options.items()}


def build_head(config) -> ConvAP:
    return ConvAP(config.channels, **_options(config))


def descriptor_dim(config) -> int:
    options = _options(config)
    return options["out_channels"] * options["s1"] * options["s2"]


HEADS = (
    Head("convap", "Conv-AP: 1x1 conv to out_channels, adaptive average pooling to s1 x s2 (head_options: "
         "out_channels, s1, s2)", "out_channels x s1 x s2 (512, 2048, 4096, 8192)", build_head, descriptor_dim),
)


def detect(state: dict[str, torch.Tensor]) -> bool:  # any part of it, so that a damaged file is named
    return any(k.startswith("aggregator.channel_pool.") for k in state) and any(k.startswith("backbone.model.") for k in state)


def convert(state: dict[str, torch.Tensor], path: Path, extras: dict) -> Converted:
    """GSV-Cities' VPRModel: `backbone.model.*` (torchvision ResNet) + `aggregator.channel_pool.*`."""
    weight, _ = take(state, ("aggregator.channel_pool.weight", "aggregator.channel_pool.bias"), path, "Conv-AP")
    if weight.ndim != 4 or tuple(weight.shape[2:]) != (1, 1):
        raise CheckpointError(f"{path}: a Conv-AP checkpoint whose channel_pool is not a 1x1 convolution")
    name, layer, weights = resnet_trunk(state, "backbone.model.", path, "Conv-AP")
    refuse_unused(state, path, "Conv-AP", ("backbone.model.", "aggregator.channel_pool."))
    # The pooling grid has no weights; the published files say it in their name (..._2x2.ckpt), all 2x2.
    grid = re.search(r"_(\d+)x(\d+)\.[^.]+$", Path(path).name)
    s1, s2 = (int(grid[1]), int(grid[2])) if grid else (2, 2)
    config = dict(backbone=name, layer=layer, head="convap",
                  head_options={"out_channels": int(weight.shape[0]), "s1": s1, "s2": s2},
                  input_size=(320, 320), resize="fixed", multiple=1, interpolation="bilinear", resampler="torch",
                  mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return Converted(config, {**weights, **with_prefix(state, "aggregator.channel_pool.", "head.channel_pool.")})


LAYOUTS = (
    Layout(
        "convap", ("conv-ap", "gsv-cities"), "amaralibey/gsv-cities (README: model.load_state_dict(torch.load(FILE)))",
        "backbone.model.* (ResNet-50) + aggregator.channel_pool.{weight, bias}",
        tuple(PublishedFile("Conv-AP", "ResNet-50", str(dim), "320x320", file, URL) for dim, file in FILES.items()),
        detect, convert,
    ),
)
