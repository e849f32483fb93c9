"""Backbone factory: torchvision CNN trunks cut where the VPR papers cut them.

ResNets are cut after layer4 (or layer3). `vgg16` is cut at conv5_3, before its ReLU and the last
max-pool, as in the NetVLAD paper ("cropped at conv5, before ReLU") and the published NetVLAD,
CosPlace, EigenPlaces and benchmark models. The layer layout matches torchvision, so ImageNet
weights load unchanged.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from vpr.errors import CheckpointError, UsageError
from vpr.models import registry

log = logging.getLogger(__name__)

RESNET_CHANNELS = {"resnet18": (256, 512), "resnet50": (1024, 2048), "resnet101": (1024, 2048), "resnet152": (1024, 2048)}
PIXELS_INPUT = {"resize": "fixed", "input_size": (32, 64)}  # SeqSLAM's thumbnails are tiny


def backbone_names() -> tuple[str, ...]:
    """Every `--model` name: torchvision trunks, DINOv2 ViTs and the method modules' backbones."""
    return tuple(registry.backbones())


def backbone_description(name: str) -> str:
    """One line saying what a backbone is."""
    return registry.backbone(name).description


def backbone_channels(name: str, layer: int = 4) -> int:
    """Number of channels of the feature map a backbone produces (validates name and layer)."""
    record = registry.backbone(name)
    if layer not in record.channels:
        cuts = " or ".join(str(cut) for cut in sorted(record.channels, reverse=True))
        what = "ViTs use all their blocks (layer 4)" if record.vit else f"use {cuts}"
        raise UsageError(f"`layer` {layer} is not available for {name}; {what}")
    return record.channels[layer]


def build_backbone(name: str, layer: int = 4, pretrained: str | Path | None = None, options: dict | None = None) -> nn.Module:
    """Return the trunk of `name` cut after `layer`: a CNN mapping images to a C x H' x W' feature map, or a
    ViT returning (patch map, CLS token).

    `pretrained` is None (random init, works offline), a torchvision weights name such as
    "IMAGENET1K_V1" (downloaded once into the torch hub cache), or the path of a torchvision
    ImageNet state dict. `options` go to ViTs (`blocks`, `facet`, `final_norm`) and method backbones.
    """
    backbone_channels(name, layer)
    return registry.backbone(name).build(layer, pretrained, options or {})


def _write_failure(exc: BaseException | None) -> OSError | None:
    """The permission or read-only-filesystem error (an unwritable hub cache) behind `exc`, if any,
    as opposed to a network failure; URLError keeps its cause in `reason`."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and (isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)):
            return exc
        reason = getattr(exc, "reason", None)
        exc = reason if isinstance(reason, BaseException) else exc.__cause__ or exc.__context__
    return None


def _imagenet_state(name: str, weights: str | Path) -> tuple[dict, str]:
    """A torchvision state dict from a local file or a weights name (torch hub cache), weights-only."""
    path = Path(weights)
    if path.suffix in (".pt", ".pth") or path.exists():
        if not path.is_file():
            raise CheckpointError(f"{path}: ImageNet weights file not found; give an existing .pth file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle, zip or refused-global errors
            raise CheckpointError(f"{path}: not a loadable weights-only state dict ({type(exc).__name__})") from exc
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: holds a {type(state).__name__}, expected a torchvision state dict")
        return state, str(path)
    import torchvision  # its import costs about a second (it loads torch._dynamo): only when a trunk is built

    enum = torchvision.models.get_model_weights(name)
    try:
        entry = enum.verify(str(weights))
    except KeyError:
        raise UsageError(
            f"`pretrained` {weights}: not a torchvision weights name for {name}; use one of "
            f"{', '.join(enum.__members__)} or the path of a .pth file"
        ) from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(entry.url).path).name
    try:
        state = torch.hub.load_state_dict_from_url(
            entry.url, map_location="cpu", progress=False, check_hash=True, weights_only=True,
        )
    except Exception as exc:  # URLError, HTTPError, hash mismatch, refused pickle, unwritable cache...
        denied = _write_failure(exc)
        if denied is not None:
            raise CheckpointError(
                f"{cached.parent}: the torch hub cache is not writable ({denied.strerror or type(denied).__name__}), so "
                f"{name} weights {entry} cannot be saved there; set TORCH_HOME to a writable folder "
                f"(e.g. TORCH_HOME=$HOME/.cache/torch) or pass a local .pth file with `pretrained` FILE"
            ) from exc
        if cached.is_file():
            raise CheckpointError(
                f"{cached}: cached {name} weights are not a loadable weights-only state dict "
                f"({type(exc).__name__}); delete the file and retry"
            ) from exc
        raise CheckpointError(
            f"{name}: cannot download torchvision weights {entry} ({type(exc).__name__}); "
            f"you are probably offline: fetch {entry.url} elsewhere and save it as {cached}, "
            "or give the file's path as `pretrained`"
        ) from exc
    return state, str(cached)


def _torchvision_model(name: str, weights: str | Path | None) -> nn.Module:
    """Build the full torchvision classifier, with ImageNet weights by name or from a file."""
    import torchvision

    if weights is None:
        return getattr(torchvision.models, name)(weights=None)
    state, source = _imagenet_state(name, weights)
    model = getattr(torchvision.models, name)(weights=None)
    try:
        missing, _ = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes of another architecture
        detail = str(exc).strip().splitlines()[-1].strip()[:120]
        raise CheckpointError(f"{source}: not {name} ImageNet weights ({detail})") from exc
    if missing and not all(k.startswith(("fc.", "classifier.")) for k in missing):
        raise CheckpointError(
            f"{source}: not {name} ImageNet weights (missing {', '.join(missing[:3])}, ...)"
        )
    return model


class Grey(nn.Module):
    """Images in [0, 1] (N x 3 x H x W) -> luminance (N x 1 x H x W), ITU-R BT.601 weights as PIL's "L"."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weights", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.weights).sum(dim=1, keepdim=True)


def _torchvision_trunk(name: str) -> Callable[[int, str | Path | None, dict], nn.Module]:
    """The record's builder of a torchvision trunk, cut where the VPR papers cut it."""
    def build(layer: int, pretrained: str | Path | None, options: dict) -> nn.Module:
        if options:
            raise UsageError(f"{name} takes no backbone options (got {', '.join(options)})")
        model = _torchvision_model(name, pretrained)
        if name == "vgg16":
            return nn.Sequential(*list(model.features.children())[:-2])  # drop conv5_3's ReLU and the last max-pool
        children = list(model.children())[:-2]  # drop avgpool and fc
        return nn.Sequential(*(children[:-1] if layer == 3 else children))

    return build


def _grey(layer: int, pretrained: str | Path | None, options: dict) -> nn.Module:
    if pretrained is not None:
        raise UsageError("`pretrained`: the pixels backbone has no weights; drop `pretrained`")
    return Grey()


BACKBONES = (
    *(registry.Backbone(name, f"ResNet-{name[6:]} trunk (torchvision), cut after layer4 or layer3",
                        {4: RESNET_CHANNELS[name][1], 3: RESNET_CHANNELS[name][0]}, _torchvision_trunk(name))
      for name in RESNET_CHANNELS),
    registry.Backbone("vgg16", "VGG-16 features up to conv5_3, before its ReLU (the NetVLAD paper's and published models' cut)",
                      {4: 512}, _torchvision_trunk("vgg16")),
    registry.Backbone("pixels", "no weights: the resized image in grey (SeqSLAM's front end; pair it with the patchnorm head)",
                      {4: 1}, _grey, preprocessing=PIXELS_INPUT, heads=("patchnorm",)),
)
