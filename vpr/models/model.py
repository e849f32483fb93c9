"""`VPRModel`: backbone -> head -> L2-normalised global descriptor, rebuilt from a `ModelConfig`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from vpr.data.images import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, RESAMPLERS, RESIZE_MODES, Preprocess
from vpr.errors import UsageError
from vpr.models import methods
from vpr.models.backbones import BACKBONES, backbone_channels, build_backbone
from vpr.models.heads import CosPlaceHead, NetVLAD, PatchNorm

CORE_HEADS = ("cosplace", "netvlad", "patchnorm")
HEADS = CORE_HEADS + tuple(methods.HEADS)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model and feed it images: architecture and preprocessing."""

    backbone: str = "resnet18"
    head: str = "cosplace"
    layer: int = 4
    descriptor_dim: int = 512  # CosPlace output size; NetVLAD's is num_clusters * channels
    num_clusters: int = 64
    patch_size: int = 8  # patchnorm's P x P tiles
    input_size: tuple[int, int] = (240, 320)  # (height, width) of a fixed resize; (S, S) for the shorter-side rule
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "fixed"  # fixed | shorter | native (see vpr.data.images.Preprocess)
    multiple: int = 1  # 14: then each side to the nearest multiple of 14 (DINOv2 models)
    interpolation: str = "bilinear"
    resampler: str = "pil"  # pil (8-bit PIL resize) | torch (float resize, as torchvision's tensor Resize)
    head_options: dict = field(default_factory=dict)  # a published head's hyperparameters (vpr.models.<method>)
    backbone_options: dict = field(default_factory=dict)  # e.g. a ViT's blocks / facet

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise UsageError(f"unknown head '{self.head}'; choose one of {', '.join(HEADS)}")
        backbone_channels(self.backbone, self.layer)  # validates backbone and layer
        for name, value, allowed in (("resize", self.resize, RESIZE_MODES), ("interpolation", self.interpolation, INTERPOLATIONS),
                                     ("resampler", self.resampler, RESAMPLERS)):
            if value not in allowed:
                raise UsageError(f"{name} '{value}' is not one of {', '.join(allowed)}")
        if int(self.multiple) < 1:
            raise UsageError(f"multiple {self.multiple}: must be 1 (no rounding) or a patch size such as 14")
        object.__setattr__(self, "multiple", int(self.multiple))
        object.__setattr__(self, "head_options", dict(self.head_options))
        object.__setattr__(self, "backbone_options", dict(self.backbone_options))
        if self.head in methods.HEADS and methods.HEADS[self.head].descriptor_dim is not None:
            object.__setattr__(self, "descriptor_dim", int(methods.HEADS[self.head].descriptor_dim(self)))
        if self.head in CORE_HEADS and self.backbone not in BACKBONES:  # a ViT gives (patch map, CLS), not a CNN map
            vit_heads = ", ".join(name for name in methods.HEADS if name not in ("apgem", "convap", "mixvpr"))
            raise UsageError(f"the {self.head} head pools a CNN feature map; {self.backbone} takes a published head "
                             f"({vit_heads}) or use a CNN backbone (resnet18 ... vgg16)")
        if (self.backbone == "pixels") != (self.head == "patchnorm"):
            raise UsageError("the pixels backbone and the patchnorm head go together: --model pixels --head patchnorm")
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        if self.head == "patchnorm":
            if not 1 <= self.patch_size <= min(self.input_size):
                raise UsageError(f"--patch {self.patch_size}: must be between 1 and the thumbnail's shorter side {min(self.input_size)}")
            object.__setattr__(self, "descriptor_dim", self.input_size[0] * self.input_size[1])
            object.__setattr__(self, "mean", (0.0, 0.0, 0.0))  # the grey backbone reads pixels in [0, 1]
            object.__setattr__(self, "std", (1.0, 1.0, 1.0))
        if self.head == "netvlad":
            object.__setattr__(self, "descriptor_dim", self.num_clusters * self.channels)
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @property
    def channels(self) -> int:
        """Channels of the backbone's feature map (the head's input)."""
        return backbone_channels(self.backbone, self.layer)

    @property
    def preprocess(self) -> Preprocess:
        """How images become this model's input (stored with the model, so indexes reproduce it)."""
        return Preprocess(self.resize, self.input_size, self.multiple, self.interpolation, self.resampler)

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def to_dict(self) -> dict:
        """A JSON-serialisable form, stored in checkpoints and manifests."""
        data = asdict(self)
        data["input_size"] = list(self.input_size)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """Rebuild from `to_dict` output, ignoring unknown keys from newer versions."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known})


class VPRModel(nn.Module):
    """A place-recognition network: images (N x 3 x H x W) -> L2-normalised descriptors (N x D)."""

    def __init__(self, config: ModelConfig, pretrained: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config.backbone, config.layer, pretrained, config.backbone_options)
        if config.head == "cosplace":
            self.head: nn.Module = CosPlaceHead(config.channels, config.descriptor_dim)
        elif config.head == "patchnorm":
            self.head = PatchNorm(config.patch_size)
        elif config.head == "netvlad":
            self.head = NetVLAD(config.channels, config.num_clusters)
        else:
            self.head = methods.HEADS[config.head].build(config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def build_model(config: ModelConfig | None = None, pretrained: str | None = None, seed: int | None = 0) -> VPRModel:
    """Build a model in eval mode; with `seed` set, random weights are reproducible."""
    config = config or ModelConfig()
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = VPRModel(config, pretrained)
    else:
        model = VPRModel(config, pretrained)
    return model.eval()
