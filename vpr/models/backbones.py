"""Backbone factory: torchvision CNN trunks cut where the VPR papers cut them.

ResNets are cut after layer4 (or layer3), VGG16 after conv5_3's ReLU (before the last max-pool),
as in NetVLAD. The layer layout matches torchvision, so ImageNet weights load unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torchvision
from torch import nn

from vpr.errors import CheckpointError, UsageError

log = logging.getLogger(__name__)

BACKBONES = ("resnet18", "resnet50", "resnet101", "vgg16")
RESNET_CHANNELS = {"resnet18": (256, 512), "resnet50": (1024, 2048), "resnet101": (1024, 2048)}


def backbone_channels(name: str, layer: int = 4) -> int:
    """Number of channels of the feature map a backbone produces (validates name and layer)."""
    if layer not in (3, 4) or (name == "vgg16" and layer != 4):
        raise UsageError(f"--layer {layer} is not available for {name}; use 4 (or 3 for ResNets)")
    if name == "vgg16":
        return 512
    if name in RESNET_CHANNELS:
        return RESNET_CHANNELS[name][layer - 3]
    raise UsageError(f"unknown backbone '{name}'; choose one of {', '.join(BACKBONES)}")


def _torchvision_model(name: str, weights: str | Path | None) -> nn.Module:
    """Build the full torchvision classifier, with ImageNet weights by name or from a file."""
    builder = getattr(torchvision.models, name)
    if weights is None:
        return builder(weights=None)
    path = Path(weights)
    if path.suffix in (".pt", ".pth") or path.exists():
        model = builder(weights=None)
        if not path.exists():
            raise CheckpointError(f"{path}: ImageNet weights file not found; give an existing .pth file")
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing and not all(k.startswith(("fc.", "classifier.")) for k in missing):
            raise CheckpointError(f"{path}: not {name} ImageNet weights (missing {missing[:3]}...)")
        return model
    try:
        return builder(weights=str(weights))
    except Exception as exc:  # torchvision raises URLError, ValueError, RuntimeError...
        raise CheckpointError(
            f"{name}: cannot load torchvision weights '{weights}' ({type(exc).__name__}); "
            "you are probably offline: download the .pth elsewhere, then pass its path to --pretrained"
        ) from exc


def build_backbone(name: str, layer: int = 4, pretrained: str | Path | None = None) -> nn.Module:
    """Return the convolutional trunk of `name`, mapping images to a C x H' x W' feature map.

    `pretrained` is None (random init, works offline), a torchvision weights name such as
    "IMAGENET1K_V1", or the path of a torchvision ImageNet state dict.
    """
    backbone_channels(name, layer)
    model = _torchvision_model(name, pretrained)
    if name == "vgg16":
        return nn.Sequential(*list(model.features.children())[:-1])
    children = list(model.children())[:-2]  # drop avgpool and fc
    if layer == 3:
        children = children[:-1]
    return nn.Sequential(*children)
