"""The settings every training method shares, as one frozen dataclass that each method extends.

A method's config subclasses `TrainConfig`, adds its own fields and may override `default_lr` and
`check`; `resolved()` validates everything and decides the defaults that depend on other settings
(lr, freeze_early), so the run's config.json records the values actually used.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch

from vpr.errors import UsageError
from vpr.models.model import ModelConfig
from vpr.retrieval.options import ExtractOptions

C = TypeVar("C", bound="TrainConfig")


MAX_LR = 1000.0  # above this an optimiser's step overflows float32 (Adam divides by 1 - beta1 = 0.1) or diverges at once


def check_learning_rate(value: float | None, option: str) -> None:
    """Refuse a learning rate that is not a positive number up to MAX_LR (None: the default)."""
    if value is not None and not 0 < value <= MAX_LR:
        raise UsageError(f"{option} {value}: must be a positive number up to {MAX_LR:g}")


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
                raise UsageError(f"--{name.replace('_', '-')} {value}: must be at least 1")
        if self.backbone == "pixels":
            raise UsageError("--backbone pixels has no weights to train; index with it directly: "
                             "vpr build-index DB --model pixels --head patchnorm")
        if self.workers < 0:
            raise UsageError(f"--workers {self.workers}: must be 0 or more")
        check_learning_rate(self.lr, "--lr")
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
        return self.amp and torch.device(self.device).type == "cuda"

    def extract_options(self) -> ExtractOptions:
        """How validation and mining describe images."""
        return ExtractOptions(batch_size=self.extract_batch_size, num_workers=self.workers,
                              device=torch.device(self.device), amp=self.use_amp)

    def to_dict(self) -> dict:
        """JSON form for config.json and the resume check (without `out`, so a moved run still resumes)."""
        data = json.loads(json.dumps(asdict(self), default=str))  # tuples -> lists, paths -> strings
        del data["out"]
        return {"method": self.method, **data}
