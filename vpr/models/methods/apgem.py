"""AP-GeM (Revaud et al., "Learning with Average Precision: Training Image Retrieval with a Listwise
Loss", ICCV 2019), published by naver/deep-image-retrieval (dirtorch) as `Resnet-101-AP-GeM.pt`.

The network (dirtorch `resnet101_rmac`, pooling 'gem', out_dim 2048) and its whitening:
    X = ResNet-101(I) in R^{C x h x w}                            torchvision-style trunk up to layer4 (C = 2048)
    g_c = (mean_{h,w} max(X_c,hw, eps)^p)^(1/p)                   GeM, p learned (`adpool.p`), eps = 1e-6;
                                                                  no L2 before pooling (norm_features False)
    d = L2(W g + b) in R^2048                                     `fc`, then L2
    y = L2(diag(lambda^-w) U^T (d - mu))                          the file's whitening PCA `pca['Landmarks_clean']`
                                                                  (sklearn: U = components_, mu = mean_, lambda =
                                                                  explained_variance_), w = whitenp = 0.25 as in
                                                                  dirtorch's README and VPR-methods-evaluation
vpr runs d with its `apgem` head (GeM -> Linear; VPRModel's caller L2-normalises) and y as its PCA with
scale lambda^-0.25 (1 when the sklearn PCA was fitted without whitening).
Preprocessing as dirtorch and VPR-methods-evaluation run it: the image at its native size, ToTensor ->
Normalize(the file's `preprocess` mean/std: ImageNet).

Layout `apgem`: dirtorch checkpoints `{'model_options', 'state_dict', 'preprocess', 'pca', ...}`:
`state_dict` = `[module.]conv1.weight, bn1.*, layer1..4.*, fc.{weight, bias}, adpool.p`; `pca` holds
scikit-learn PCA objects, which `torch.load(weights_only=True)` reads only with the stand-in classes of
`PICKLE_GLOBALS` (they keep the pickled attributes as plain data; no sklearn code runs).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vpr.data.images import IMAGENET_MEAN, IMAGENET_STD
from vpr.errors import CheckpointError, UsageError
from vpr.models import vit
from vpr.models.backbones import backbone_channels, build_backbone
from vpr.models.layers import GeM
from vpr.models.pca import PCA
from vpr.models.registry import Converted, Head, Layout, PublishedFile, merged_options
from vpr.models.statedict import numbered, refuse_unused, take

WHITEN_NAME, WHITEN_P, WHITEN_M = "Landmarks_clean", 0.25, 1.0  # VPR-methods-evaluation's / the README's settings
DEFAULTS = {"gem_p": 3.0, "eps": 1e-6}  # the initial p and GeM's clamp; `--head apgem` builds the published head
URL = "https://drive.google.com/open?id=1UWJGDuHtzaQdFhSMojoYVQjmCXhIwVvy"
TRUNKS = {  # blocks in layer1..4 -> vpr backbone (dirtorch's resnet{18,50,101,152}_rmac)
    (2, 2, 2, 2): "resnet18", (3, 4, 6, 3): "resnet50", (3, 4, 23, 3): "resnet101", (3, 8, 36, 3): "resnet152",
}
TRUNK_CHILDREN = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}  # torchvision children


class APGeM(nn.Module):
    """AP-GeM's head: B x C x h x w -> GeM (no L2 before) -> Linear(C, D) (L2 is applied by VPRModel's caller)."""

    def __init__(self, channels: int = 2048, dim: int = 2048, gem_p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.gem = GeM(gem_p, eps)
        self.fc = nn.Linear(channels, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gem(x))


def head_options(config) -> dict:
    options = merged_options(config, DEFAULTS, "apgem")
    return {k: float(v) for k, v in options.items()}


def build_head(config) -> APGeM:
    if config.backbone in vit.SIZES or config.backbone == "pixels":
        raise UsageError(f"the apgem head pools a CNN feature map: use `backbone=resnet101` (or another ResNet), "
                         f"not {config.backbone}")
    return APGeM(config.channels, config.descriptor_dim, **head_options(config))


HEADS = (
    Head("apgem", "AP-GeM: GeM (learned p, no L2 before pooling) -> Linear -> L2 (head_options: gem_p, eps)",
         "any D (Linear C -> D; 2048 published)", build_head),
)


# ----------------------------------------------------------------------------------- whitening
class SklearnPCA:
    """Stand-in for a pickled scikit-learn PCA: keeps its attributes (numpy arrays, numbers) as data."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state if isinstance(state, dict) else {})


# For torch.serialization.safe_globals: the names under which dirtorch's files (older scikit-learn) and
# newer pickles refer to sklearn's PCA. vpr's load_payload must add these to its numpy allowlist.
PICKLE_GLOBALS = [(SklearnPCA, "sklearn.decomposition.pca.PCA"), (SklearnPCA, "sklearn.decomposition._pca.PCA")]


def whitening_from(pca_obj, name: str, path: Path) -> PCA:
    """vpr's PCA for dirtorch's `whiten_features(x, pca, whitenp=0.25, whitenv=None, whitenm=1.0)`."""
    try:
        components = np.asarray(pca_obj.components_, dtype=np.float64)
        mean = getattr(pca_obj, "mean_", None)
        mean = np.zeros(components.shape[1]) if mean is None else np.asarray(mean, dtype=np.float64)
        whiten = bool(getattr(pca_obj, "whiten", False))
        variance = np.asarray(pca_obj.explained_variance_, dtype=np.float64) if whiten else None
    except (AttributeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: the AP-GeM whitening pca['{name}'] is not a scikit-learn PCA ({exc})") from exc
    if components.ndim != 2 or mean.shape != (components.shape[1],) or (
            whiten and variance.shape != (components.shape[0],)):
        raise CheckpointError(f"{path}: the AP-GeM whitening pca['{name}'] has inconsistent shapes "
                              f"(components {list(components.shape)}, mean {list(mean.shape)})")
    scale = 1.0 / (WHITEN_M * np.power(variance, WHITEN_P)) if whiten else np.ones(components.shape[0])
    if not np.all(np.isfinite(scale)):
        raise CheckpointError(f"{path}: the AP-GeM whitening pca['{name}'] has zero or negative variances")
    return PCA(mean=mean.astype(np.float32), components=components.astype(np.float32),
               scale=scale.astype(np.float32), whiten=True)


# ----------------------------------------------------------------------------------- layout
@lru_cache(maxsize=None)
def trunk_shapes(name: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        trunk = build_backbone(name, 4)
    return {k: tuple(v.shape) for k, v in trunk.state_dict().items()}


def detect_apgem(state: dict[str, torch.Tensor]) -> bool:
    return "adpool.p" in state and "fc.weight" in state and "layer4.0.conv1.weight" in state


def convert_apgem(state: dict[str, torch.Tensor], path: Path, extras: dict) -> Converted:
    """dirtorch's ResNet_RMAC: `conv1, bn1, layer1..4` (torchvision names) + `adpool.p` + `fc.*` [+ file `pca`]."""
    method = "AP-GeM (dirtorch)"
    gem_p, fc_w, fc_b = take(state, ("adpool.p", "fc.weight", "fc.bias"), path, method)
    refuse_unused(state, path, method, tuple(f"{group}." for group in (*TRUNK_CHILDREN, "adpool", "fc")))
    counts = tuple(numbered(state, f"layer{i}.") for i in range(1, 5))
    name = TRUNKS.get(counts)
    trunk = {f"backbone.{TRUNK_CHILDREN[k.split('.')[0]]}.{k.split('.', 1)[1]}": v
             for k, v in state.items() if k.split(".")[0] in TRUNK_CHILDREN}
    found = {k[len("backbone."):]: tuple(v.shape) for k, v in trunk.items()}
    shapes = trunk_shapes(name) if name else {}
    required = {k for k in shapes if not k.endswith("num_batches_tracked")}
    if name is None or not (required <= found.keys() <= shapes.keys()) or any(found[k] != shapes[k] for k in found):
        raise CheckpointError(f"{path}: the {method} trunk ({counts} blocks in layer1..4) is not a ResNet-18/50/101/152 "
                              f"as dirtorch builds them")
    for key, shape in shapes.items():  # older files lack BatchNorm's counter
        trunk.setdefault(f"backbone.{key}", torch.zeros(shape, dtype=torch.long))
    channels = backbone_channels(name, 4)
    if fc_w.dim() != 2 or fc_w.shape[1] != channels or fc_b.shape != fc_w.shape[:1] or gem_p.numel() != 1:
        raise CheckpointError(f"{path}: {method} GeM/FC shapes {list(gem_p.shape)}, {list(fc_w.shape)}, {list(fc_b.shape)} "
                              f"do not fit a {name} (expected p [1], weight [D, {channels}], bias [D])")
    weights = {**trunk, "head.gem.p": gem_p.reshape(1), "head.fc.weight": fc_w, "head.fc.bias": fc_b}
    options = extras.get("model_options") if isinstance(extras.get("model_options"), dict) else {}
    if options.get("pooling", "gem") != "gem" or options.get("without_fc") or options.get("norm_features") \
            or options.get("center_bias", 0):
        raise CheckpointError(f"{path}: a dirtorch model with options {options}; vpr reads AP-GeM's (pooling gem, "
                              "FC, no feature normalisation, no centre bias)")
    pca = None
    whitenings = extras.get("pca") if isinstance(extras.get("pca"), dict) else {}
    if whitenings:
        chosen = WHITEN_NAME if WHITEN_NAME in whitenings else sorted(whitenings)[0]
        pca = whitening_from(whitenings[chosen], chosen, path)
        if pca.in_dim != fc_w.shape[0]:
            raise CheckpointError(f"{path}: the AP-GeM whitening pca['{chosen}'] takes {pca.in_dim}-d descriptors, "
                                  f"the network gives {fc_w.shape[0]}")
    preprocess = extras.get("preprocess") if isinstance(extras.get("preprocess"), dict) else {}
    mean = tuple(float(v) for v in preprocess.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in preprocess.get("std", IMAGENET_STD))
    config = dict(backbone=name, layer=4, head="apgem", descriptor_dim=int(fc_w.shape[0]), input_size=(480, 640),
                  resize="native", multiple=1, interpolation="bilinear", resampler="pil", mean=mean, std=std)
    return Converted(config, weights, pca)


LAYOUTS = (
    Layout("apgem", ("ap-gem", "dirtorch", "deep-image-retrieval"), "naver/deep-image-retrieval (dirtorch)",
           "state_dict: conv1.*, bn1.*, layer1..4.* + adpool.p, fc.weight, fc.bias; pca: {'Landmarks_clean': sklearn PCA}",
           (PublishedFile("AP-GeM", "ResNet-101 + GeM + FC + whitening", "2048", "native", "Resnet-101-AP-GeM.pt", URL),),
           detect_apgem, convert_apgem),
)
