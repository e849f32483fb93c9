"""The records every model part registers with vpr, and the one place they are looked up.

A trunk (`Backbone`), an aggregation head (`Head`) and a checkpoint layout (`Layout`) are each a record,
whoever provides it. The modules in PROVIDERS export them as tuples named `BACKBONES`, `HEADS` and
`LAYOUTS` (and `PICKLE_GLOBALS`, the (class, pickled name) stand-ins that let `torch.load(weights_only=True)`
read a published file's non-tensor data without running its library's code): the torchvision trunks
(`vpr.models.backbones`), the DINOv2 ViTs (`vit`), the core heads (`heads`), the CNN checkpoint layouts
(`formats`) and one module per published method (`vpr.models.methods`). This module imports none of them
until a lookup asks for the records (`backbones()`, `heads()`, `layouts()`): it is a leaf, so every provider
can import it, and the providers are collected in exactly one place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import import_module
from pathlib import Path
from typing import Any

from vpr.errors import UsageError
from vpr.models.methods import MODULES

PROVIDERS = ("vpr.models.backbones", "vpr.models.vit", "vpr.models.heads", "vpr.models.formats",
             *(f"vpr.models.methods.{name}" for name in MODULES))


@dataclass(frozen=True)
class Backbone:
    """A trunk `--model NAME`: images -> a C x H' x W' feature map (CNNs) or (patch map, CLS) (ViTs).

    `channels` maps each layer the trunk can be cut after to its feature map's channels; `build(layer,
    pretrained, options)` returns the module (`pretrained`: ImageNet weights by name or file, where the trunk
    takes them); `preprocessing` is a new model's input rule (ModelConfig fields) when none is given; `heads`,
    when not empty, are the only heads it works with."""

    name: str
    description: str
    channels: Mapping[int, int]
    build: Callable[[int, Any, dict], Any]
    vit: bool = False
    preprocessing: Mapping[str, Any] = field(default_factory=dict)
    heads: tuple[str, ...] = ()


@dataclass(frozen=True)
class Head:
    """An aggregation head `--head NAME`: `build(config)` returns the module (config: a ModelConfig);
    `descriptor_dim(config)`, when given, is its output size (else config.descriptor_dim is used as is);
    `configure(config)`, when given, checks the config and returns other fields the head decides (its input
    normalisation); `cnn_only` heads pool a CNN feature map and refuse a ViT's tokens."""

    name: str
    description: str
    dims: str
    build: Callable[[Any], Any]
    descriptor_dim: Callable[[Any], int] | None = None
    configure: Callable[[Any], dict] | None = None
    cnn_only: bool = False


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
    weights: dict[str, Any]
    pca: Any = None


@dataclass(frozen=True)
class Layout:
    """A checkpoint layout vpr reads: where it comes from, the keys that identify it, its files.

    `detect(state)` says from the keys whether a state dict has this layout; `convert(state, path, extras)`
    maps it onto a vpr model, `extras` being the file's other top-level entries (AP-GeM's whitening).
    `fallback` layouts recognise files by coarse key groups and are tried after every specific one."""

    name: str
    aliases: tuple[str, ...]
    source: str
    keys: str
    published: tuple[PublishedFile, ...] = ()
    detect: Callable[[dict], bool] | None = None
    convert: Callable[[dict, Path, dict], Converted] | None = field(default=None)
    fallback: bool = False


@cache
def _records(attribute: str) -> tuple:
    """Every provider's records of `attribute`, in PROVIDERS order (imported on the first lookup)."""
    return tuple(item for module in PROVIDERS for item in getattr(import_module(module), attribute, ()))


def backbones() -> dict[str, Backbone]:
    """Every trunk by name: torchvision's, the DINOv2 ViTs, the methods' own."""
    return {record.name: record for record in _records("BACKBONES")}


def heads() -> dict[str, Head]:
    """Every aggregation head by name: the core heads, then the methods'."""
    return {record.name: record for record in _records("HEADS")}


def layouts() -> dict[str, Layout]:
    """Every checkpoint layout by name: vpr's own and the CNN layouts, then the methods'."""
    return {record.name: record for record in _records("LAYOUTS")}


def pickle_globals() -> list:
    """The stand-in classes published files may pickle, for `torch.serialization.safe_globals`."""
    return list(_records("PICKLE_GLOBALS"))


def backbone(name: str) -> Backbone:
    """The trunk `name`, or a `UsageError` listing them."""
    found = backbones().get(name)
    if found is None:
        raise UsageError(f"unknown backbone '{name}'; choose one of {', '.join(backbones())}")
    return found


def head(name: str) -> Head:
    """The head `name`, or a `UsageError` listing them."""
    found = heads().get(name)
    if found is None:
        raise UsageError(f"unknown head '{name}'; choose one of {', '.join(heads())}")
    return found


def merged_options(config, defaults: dict, head: str) -> dict:
    """A head's hyperparameters: `config.head_options` over `defaults`, refusing keys `defaults` lacks.

    The values are returned as given (no casting); `head` names the head in the error message."""
    unknown = set(config.head_options) - set(defaults)
    if unknown:
        raise UsageError(f"{head} head: unknown options {', '.join(sorted(unknown))}; it takes {', '.join(defaults)}")
    return {**defaults, **config.head_options}
