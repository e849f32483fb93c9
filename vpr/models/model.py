"""`VPRModel`: backbone -> head -> L2-normalised global descriptor, rebuilt from a `ModelConfig`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn

from vpr.data.images import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, RESAMPLERS, RESIZE_MODES, Preprocess
from vpr.errors import UsageError
from vpr.models import registry, vit
from vpr.models.backbones import backbone_channels, build_backbone


INPUT_FIELDS = ("input_size", "mean", "std", "resize", "multiple", "interpolation", "resampler")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model and feed it images: architecture and preprocessing.

    Build a new model's config with `ModelConfig.for_backbone`, which starts from the backbone's own input
    rule; the plain constructor takes every field as given (a ViT given no input field at all gets its own
    rule, since the CNN defaults cannot feed it) and refuses combinations that cannot run."""

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
    head_options: dict = field(default_factory=dict)  # a published head's hyperparameters (vpr.models.methods.*)
    backbone_options: dict = field(default_factory=dict)  # e.g. a ViT's blocks / facet

    @classmethod
    def for_backbone(cls, backbone: str = "resnet18", **fields) -> "ModelConfig":
        """A new model's config: `backbone`'s own input rule (DINOv2: 322 x 322 float resize, sides to
        multiples of 14; pixels: 32 x 64 thumbnails; CNNs: 240 x 320), then `fields` over it."""
        return cls(backbone=backbone, **{**registry.backbone(backbone).preprocessing, **fields})

    def __post_init__(self) -> None:
        head, trunk = registry.head(self.head), registry.backbone(self.backbone)
        backbone_channels(self.backbone, self.layer)  # validates the layer cut
        for name, value, allowed in (("resize", self.resize, RESIZE_MODES), ("interpolation", self.interpolation, INTERPOLATIONS),
                                     ("resampler", self.resampler, RESAMPLERS)):
            if value not in allowed:
                raise UsageError(f"{name} '{value}' is not one of {', '.join(allowed)}")
        if int(self.multiple) < 1:
            raise UsageError(f"multiple {self.multiple}: must be 1 (no rounding) or a patch size such as 14")
        for name, value in (("multiple", int(self.multiple)), ("head_options", dict(self.head_options)),
                            ("backbone_options", dict(self.backbone_options)),
                            ("input_size", tuple(int(v) for v in self.input_size))):
            object.__setattr__(self, name, value)
        if head.cnn_only and trunk.vit:  # a ViT gives (patch map, CLS), not a CNN map
            vit_heads = ", ".join(name for name, record in registry.heads().items() if not record.cnn_only)
            raise UsageError(f"the {self.head} head pools a CNN feature map; {self.backbone} takes a published head "
                             f"({vit_heads}) or use a CNN backbone (resnet18 ... vgg16)")
        if trunk.heads and self.head not in trunk.heads:
            raise UsageError(f"the {self.backbone} backbone and the {' or '.join(trunk.heads)} head go together: "
                             f"`backbone='{self.backbone}'` `head='{trunk.heads[0]}'`")
        if trunk.vit and not self._whole_patches() and self._default_input():  # the defaults would not run: take the ViT's rule
            for name, value in trunk.preprocessing.items():
                object.__setattr__(self, name, tuple(value) if isinstance(value, list) else value)
        if trunk.vit and not self._whole_patches():
            raise UsageError(f"{self.backbone} takes sides in multiples of {vit.PATCH} and input_size {self.input_size} with "
                             f"multiple {self.multiple} does not give them; use ModelConfig.for_backbone('{self.backbone}') "
                             f"or multiple {vit.PATCH}")
        for name, value in (head.configure(self) if head.configure else {}).items():
            object.__setattr__(self, name, value)
        if head.descriptor_dim is not None:
            object.__setattr__(self, "descriptor_dim", int(head.descriptor_dim(self)))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def _default_input(self) -> bool:
        """Whether every preprocessing field still holds the class default (none was given)."""
        return all(getattr(self, f.name) == f.default for f in fields(self) if f.name in INPUT_FIELDS)

    def _whole_patches(self) -> bool:
        """Whether every input this config resizes to is made of whole ViT patches."""
        if self.multiple % vit.PATCH == 0:
            return True
        return self.resize == "fixed" and all(side % vit.PATCH == 0 for side in self.input_size)

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
        self.head: nn.Module = registry.head(config.head).build(config)
        # a new network that nobody trained: its descriptors are near chance (every similarity close to 1);
        # weights loaded from a file, ImageNet weights and training clear it, and weightless models never have it
        self.random_init = pretrained is None and any(True for _ in self.parameters())

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
