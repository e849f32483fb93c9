"""The settings of a training run, as frozen dataclasses: `TrainConfig` (what every method shares) and each
method's extension of it (CosPlace's with its class groups and augmentation, NetVLAD's with its mining).

A method's config subclasses `TrainConfig`, adds its own fields and may override `default_lr` and
`check`; `resolved()` validates everything and decides the defaults that depend on other settings
(lr, freeze_early), so the run's config.json records the values actually used. The module imports
nothing heavy (the CLI reads its option defaults from these classes); each method's trainer lives in
its own module (`cosplace.py`, `netvlad.py`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from vpr.errors import UsageError
from vpr.retrieval.options import ExtractOptions

if TYPE_CHECKING:
    from vpr.models.model import ModelConfig
    from vpr.training.mining import MiningConfig

C = TypeVar("C", bound="TrainConfig")


MAX_LR = 1000.0  # above this an optimiser's step overflows float32 (Adam divides by 1 - beta1 = 0.1) or diverges at once


def check_learning_rate(value: float | None, option: str) -> None:
    """Refuse a learning rate that is not a positive number up to MAX_LR (None: the default)."""
    if value is not None and not 0 < value <= MAX_LR:
        raise UsageError(f"`{option}` {value}: must be a positive number up to {MAX_LR:g}")


@dataclass(frozen=True)
class TrainConfig:
    """Settings common to every method: data, model trunk, schedule, device. Subclasses add their own."""

    dataset: str
    out: str
    backbone: str = "resnet18"
    layer: int = 4
    input_size: tuple[int, int] = (240, 320)
    pretrained: str | None = None
    freeze_early: bool | None = None  # None: freeze conv1..layer2 (VGG: conv1..conv4) only with `pretrained`
    epochs: int = 20
    iterations_per_epoch: int | None = 1000  # optimiser steps per epoch (a method may take None: one pass)
    batch_size: int = 32  # images per optimiser step
    lr: float | None = None  # None: the method's `default_lr()`
    val_split: str = "val"
    extract_batch_size: int = 32  # images per batch when describing (validation, mining)
    amp: bool = True  # autocast with `amp_dtype` (bf16, fp16 + grad scaler without bf16); CUDA only
    seed: int = 0
    device: str = "cpu"
    workers: int = 2

    method = "base"  # class attribute: the name written to config.json

    def default_lr(self) -> float:
        """The learning rate when `lr` is None."""
        raise NotImplementedError

    def check(self) -> None:
        """Raise `UsageError` for method-specific settings that cannot work (fields are final here)."""

    def model_config(self) -> ModelConfig:
        """The architecture this method trains."""
        raise NotImplementedError

    def resolved(self: C) -> C:
        """A validated copy with the dependent defaults decided and an absolute dataset path."""
        counts = {"epochs": self.epochs, "batch_size": self.batch_size, "extract_batch_size": self.extract_batch_size,
                  "iterations_per_epoch": 1 if self.iterations_per_epoch is None else self.iterations_per_epoch}
        for name, value in counts.items():
            if value < 1:
                raise UsageError(f"`{name}` {value}: must be at least 1")
        if self.backbone == "pixels":
            raise UsageError("`backbone=pixels` has no weights to train; index with it directly (build-index with the pixels "
                             "backbone and the patchnorm head)")
        if self.workers < 0:
            raise UsageError(f"`workers` {self.workers}: must be 0 or more")
        check_learning_rate(self.lr, "lr")
        pretrained = self.pretrained is not None
        done = replace(
            self, dataset=str(Path(self.dataset).resolve()), out=str(self.out),
            lr=self.lr if self.lr is not None else self.default_lr(),
            freeze_early=self.freeze_early if self.freeze_early is not None else pretrained,
        )
        done.check()
        return done

    @property
    def use_amp(self) -> bool:
        """Autocast is on: asked for, and the device is a GPU."""
        return self.amp and str(self.device).startswith("cuda")

    def extract_options(self) -> ExtractOptions:
        """How validation and mining describe images."""
        return ExtractOptions(batch_size=self.extract_batch_size, num_workers=self.workers, device=self.device,
                              amp=self.use_amp)

    def to_dict(self) -> dict:
        """JSON form for config.json and the resume check (without `out`, so a moved run still resumes)."""
        data = json.loads(json.dumps(asdict(self), default=str))  # tuples -> lists, paths -> strings
        del data["out"]
        return {"method": self.method, **data}


@dataclass(frozen=True)
class GroupParams:
    """Class size M (metres) and alpha (degrees), group spacing N and L, and the class-size filter."""

    M: float = 10.0
    alpha: float = 30.0
    N: int = 5
    L: int = 2
    min_images_per_class: int = 10

    def __post_init__(self) -> None:
        if not (math.isfinite(self.M) and self.M > 0):
            raise UsageError(f"`cell_m` {self.M}: the class size must be a positive number of metres, e.g. 10")
        if not (math.isfinite(self.alpha) and 0 < self.alpha <= 360):
            raise UsageError(f"`alpha` {self.alpha}: the heading sector must be in (0, 360] degrees, e.g. 30")
        if self.N < 1 or self.L < 1:
            raise UsageError(f"`cell_n` {self.N} `sector_l` {self.L}: both must be at least 1 (the paper uses N 5, L 2)")
        sectors = 360.0 / (self.alpha * self.L)
        if abs(sectors - round(sectors)) > 1e-9:
            raise UsageError(
                f"`alpha` {self.alpha} with `sector_l` {self.L}: alpha*L must divide 360 so heading groups wrap "
                "around consistently (e.g. alpha 30, L 2)"
            )
        if self.min_images_per_class < 1:
            raise UsageError(f"`min_images_per_class` {self.min_images_per_class}: must be at least 1")

    @property
    def max_groups(self) -> int:
        """N * N * L: the number of possible groups."""
        return self.N * self.N * self.L


@dataclass(frozen=True)
class AugmentParams:
    """Jitter strengths (torchvision ColorJitter semantics) and the smallest crop area fraction."""

    brightness: float = 0.7
    contrast: float = 0.7
    saturation: float = 0.7
    hue: float = 0.5
    crop_scale: float = 0.5  # the reference code's RandomResizedCrop scale [0.5, 1]
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)


PAPER_LR = 1e-5
SCRATCH_LR = 3e-4


@dataclass(frozen=True)
class CosPlaceConfig(TrainConfig):
    """A CosPlace run: the shared settings plus the descriptor size, groups, CosFace and augmentation."""

    dim: int = 512
    iterations_per_epoch: int = 1000
    classifier_lr: float = 1e-2
    groups: GroupParams = field(default_factory=GroupParams)
    groups_num: int = 8
    scale: float = 30.0
    margin: float = 0.4
    augment: AugmentParams = field(default_factory=AugmentParams)

    method = "cosplace"

    def default_lr(self) -> float:
        """The paper's 1e-5 for a pretrained backbone; from random init that barely learns, so SCRATCH_LR."""
        return PAPER_LR if self.pretrained is not None else SCRATCH_LR

    def check(self) -> None:
        check_learning_rate(self.classifier_lr, "classifier_lr")
        if self.iterations_per_epoch is None:
            raise UsageError("`iterations_per_epoch`: CosPlace needs a number of steps per epoch")
        for name in ("groups_num", "dim"):
            if getattr(self, name) < 1:
                raise UsageError(f"`{name}` {getattr(self, name)}: must be at least 1")
        if not (self.scale > 0 and 0 <= self.margin < 1 and self.classifier_lr > 0):
            raise UsageError(f"`scale` {self.scale} `margin` {self.margin} `classifier_lr` {self.classifier_lr}: "
                             "need scale > 0, 0 <= margin < 1 and a positive classifier lr")
        if not 0 < self.augment.crop_scale <= 1:
            raise UsageError(f"`crop_scale` {self.augment.crop_scale}: the smallest crop area must be in (0, 1]")

    def model_config(self) -> ModelConfig:
        from vpr.models.model import ModelConfig

        return ModelConfig(backbone=self.backbone, head="cosplace", layer=self.layer, descriptor_dim=self.dim, input_size=self.input_size)


OPTIMIZERS = ("sgd", "adam")
DEFAULT_LR = 1e-4  # pytorch-NetVlad's; also the best of 1e-5 / 1e-4 / 1e-3 from random init on the synthetic city
SGD_WEIGHT_DECAY = 1e-3  # pytorch-NetVlad's, for SGD; its Adam has none


@dataclass(frozen=True)
class NetVLADConfig(TrainConfig):
    """A NetVLAD run: the shared settings plus clusters, tuples and mining, optimiser and whitening.

    `batch_size` counts images, as for every method: a step holds `tuples_per_step` tuples of a query,
    its positive and `num_negatives` negatives. `iterations_per_epoch` None: one pass over the queries.
    """

    num_clusters: int = 64
    cache_refresh: int = 1000  # queries mined per feature-cache refresh
    pos_radius: float = 10.0
    neg_radius: float = 25.0
    margin: float = 0.1
    num_negatives: int = 10
    neg_samples: int = 1000
    mining_subset: int | None = None  # partial mining: database images cached per refresh
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float | None = None  # None: SGD_WEIGHT_DECAY with sgd, 0 with adam (as the reference)
    lr_step: int = 5
    lr_gamma: float = 0.5
    init_images: int = 500
    init_per_image: int = 100
    kmeans_iterations: int = 100
    clusters_cache: Path | str | None = None  # default: OUT/clusters.h5
    pca_dim: int = 4096  # 0: no PCA-whitening

    method = "netvlad"

    def default_lr(self) -> float:
        return DEFAULT_LR

    def resolved(self) -> "NetVLADConfig":
        done = super().resolved()
        if done.weight_decay is None:
            done = replace(done, weight_decay=SGD_WEIGHT_DECAY if done.optimizer == "sgd" else 0.0)
        return done

    def check(self) -> None:
        positive = {
            "cache_refresh": self.cache_refresh, "negatives": self.num_negatives, "neg_samples": self.neg_samples,
            "lr_step": self.lr_step, "init_images": self.init_images, "init_per_image": self.init_per_image,
            "kmeans_iterations": self.kmeans_iterations,
        }
        for option, value in positive.items():
            if value < 1:
                raise UsageError(f"`{option}` {value}: must be at least 1")
        if self.num_clusters < 2:
            raise UsageError(f"`clusters` {self.num_clusters}: NetVLAD needs at least 2 clusters")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"`optimizer` {self.optimizer}: choose one of {', '.join(OPTIMIZERS)}")
        if self.margin <= 0 or self.pca_dim < 0 or (self.weight_decay or 0.0) < 0:
            raise UsageError("`triplet_margin` must be positive; `pca_dim` and `weight_decay` at least 0")
        if not 0 < self.pos_radius <= self.neg_radius:
            raise UsageError(f"`pos_radius` {self.pos_radius} must be positive and at most `neg_radius` {self.neg_radius}")
        if self.mining_subset is not None and self.mining_subset < 1:
            raise UsageError(f"`mining_subset` {self.mining_subset}: must be at least 1 (leave it out for all)")

    @property
    def tuples_per_step(self) -> int:
        """Tuples per optimiser step: batch_size // (2 + num_negatives) images' worth, at least one."""
        return max(1, self.batch_size // (2 + self.num_negatives))

    def model_config(self) -> ModelConfig:
        from vpr.models.model import ModelConfig

        return ModelConfig(backbone=self.backbone, head="netvlad", layer=self.layer, num_clusters=self.num_clusters,
                           input_size=self.input_size)

    def mining_config(self) -> MiningConfig:
        from vpr.training.mining import MiningConfig

        return MiningConfig(margin=self.margin, num_negatives=self.num_negatives, neg_samples=self.neg_samples,
                            subset=self.mining_subset)
