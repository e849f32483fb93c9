"""The records a model family registers with vpr: its heads, extra backbones and checkpoint layouts.

Each module under `vpr.models` that implements a published method exports `HEADS`, `LAYOUTS` and
optionally `BACKBONES` (tuples of these records); `vpr.models.methods` collects them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vpr.errors import UsageError
from vpr.models.pca import PCA


@dataclass(frozen=True)
class Head:
    """An aggregation head `--head NAME`: `build(config)` returns the module (config: a ModelConfig);
    `descriptor_dim(config)`, when given, is its output size (else config.descriptor_dim is used as is)."""

    name: str
    description: str
    dims: str
    build: Callable[[Any], nn.Module]
    descriptor_dim: Callable[[Any], int] | None = None


@dataclass(frozen=True)
class Backbone:
    """A backbone beyond the torchvision trunks and plain DINOv2: `build(options)` returns the module."""

    name: str
    description: str
    channels: int
    build: Callable[[dict], nn.Module]


@dataclass(frozen=True)
class PublishedFile:
    """One published weights file: a row of `vpr models` and of the README's table."""

    method: str
    backbone: str
    dims: str
    input: str
    file: str
    url: str


@dataclass
class Converted:
    """A published state dict mapped onto vpr: ModelConfig kwargs, weights under our keys, optional PCA."""

    config: dict
    weights: dict[str, torch.Tensor]
    pca: PCA | None = None


@dataclass(frozen=True)
class Layout:
    """A checkpoint layout vpr reads: where it comes from, the keys that identify it, its files.

    `detect(state)` says from the keys whether a state dict has this layout; `convert(state, path,
    extras)` maps it onto a vpr model, `extras` being the file's other top-level entries (AP-GeM's
    whitening); None for the layouts `vpr.models.published` converts itself.
    """

    name: str
    aliases: tuple[str, ...]
    source: str
    keys: str
    published: tuple[PublishedFile, ...] = ()
    detect: Callable[[dict[str, torch.Tensor]], bool] | None = None
    convert: Callable[[dict[str, torch.Tensor], Path, dict], Converted] | None = field(default=None)


def merged_options(config, defaults: dict, head: str) -> dict:
    """A head's hyperparameters: `config.head_options` over `defaults`, refusing keys `defaults` lacks.

    The values are returned as given (no casting); `head` names the head in the error message."""
    unknown = set(config.head_options) - set(defaults)
    if unknown:
        raise UsageError(f"{head} head: unknown options {', '.join(sorted(unknown))}; it takes {', '.join(defaults)}")
    return {**defaults, **config.head_options}
