"""`VPRModel`: backbone -> head -> L2-normalised global descriptor, rebuilt from a `ModelConfig`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from vpr.errors import UsageError
from vpr.models.backbones import backbone_channels, build_backbone
from vpr.models.heads import CosPlaceHead, NetVLAD, PatchNorm

HEADS = ("cosplace", "netvlad", "patchnorm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model and feed it images: architecture and preprocessing."""

    backbone: str = "resnet18"
    head: str = "cosplace"
    layer: int = 4
    descriptor_dim: int = 512  # CosPlace output size; NetVLAD's is num_clusters * channels
    num_clusters: int = 64
    patch_size: int = 8  # patchnorm's P x P tiles
    input_size: tuple[int, int] = (240, 320)  # (height, width) images are resized to
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise UsageError(f"unknown head '{self.head}'; choose one of {', '.join(HEADS)}")
        backbone_channels(self.backbone, self.layer)  # validates backbone and layer
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
        self.backbone = build_backbone(config.backbone, config.layer, pretrained)
        if config.head == "cosplace":
            self.head: nn.Module = CosPlaceHead(config.channels, config.descriptor_dim)
        elif config.head == "patchnorm":
            self.head = PatchNorm(config.patch_size)
        else:
            self.head = NetVLAD(config.channels, config.num_clusters)

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
