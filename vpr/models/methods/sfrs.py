"""SFRS (Ge et al., "Self-supervising Fine-grained Region Similarities for Large-scale Image
Localization", ECCV 2020), published by yxgeee/OpenIBL as torch.hub `vgg16_netvlad` (vgg16_netvlad.pth).

The network is NetVLAD on VGG16 (the training is what SFRS changes), followed by a whitened PCA layer:
    x_i = L2(conv5_3(I)_i) in R^512                                local features (VGG16 cut before conv5_3's ReLU)
    a_k(x_i) = softmax_k(w_k . x_i)                                soft-assignment (1x1 conv without bias)
    V_k = sum_i a_k(x_i) (x_i - c_k),  V_k <- V_k / ||V_k||        residuals to K = 64 centroids, intra-norm
    v = L2(vec(V)) in R^32768                                      NetVLAD
    y = L2(W v + b) in R^4096                                      `pca_layer` (1x1 conv): W = diag(lambda)^-1/2 U^T,
                                                                   b = -W mu (PCA whitening, Arandjelovic et al.)
vpr runs v with its `netvlad` head (a zero conv bias is the same soft-assignment) and y as its PCA:
y = L2(((v - m) C^T) s) with s = row norms of W, C = W / s, C m = -b / s (`statedict.linear_to_pca`).
Preprocessing as OpenIBL's test transform: PIL Resize((480, 640)) (bilinear) -> ToTensor -> Normalize with
mean (0.48502, 0.45796, 0.40760) and std 1/255, i.e. RGB in 0..255 minus the MatConvNet VGG16 mean.
(gmberton/VPR-methods-evaluation's SFRS wrapper un-normalises with `zip(batch, mean, std)`, which walks the
batch dimension, not the channels, so its inputs depend on the batch; vpr follows the authors' transform.)

Layout `sfrs` (a raw state dict; also OpenIBL training checkpoints `{'state_dict': ...}` with `module.`):
`base_model.base.N.{weight,bias}` (VGG16 features 0..28) + `net_vlad.{centroids, conv.weight}`
[+ `pca_layer.{weight, bias}`: without it the 32768-d NetVLAD descriptor is the output].
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from vpr.errors import CheckpointError
from vpr.models.backbones import build_backbone
from vpr.models.registry import Converted, Layout, PublishedFile
from vpr.models.statedict import linear_to_pca, summarize_keys, take, with_prefix

# OpenIBL's Normalize: the MatConvNet VGG16 mean in [0, 1] and std 1/255 (pixels 0..255 minus the mean)
OPENIBL_MEAN = (0.48501960784313836, 0.4579568627450961, 0.4076039215686255)
OPENIBL_STD = (0.00392156862745098, 0.00392156862745098, 0.00392156862745098)
PREPROCESS = dict(input_size=(480, 640), resize="fixed", multiple=1, interpolation="bilinear", resampler="pil",
                  mean=OPENIBL_MEAN, std=OPENIBL_STD)
URL = "https://github.com/yxgeee/OpenIBL/releases/download/v0.1.0-beta/vgg16_netvlad.pth"
HEADS = ()  # vpr's `netvlad` head + a PCA


@lru_cache(maxsize=None)
def vgg16_shapes() -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        trunk = build_backbone("vgg16", 4)
    return {k: tuple(v.shape) for k, v in trunk.state_dict().items()}


def detect_sfrs(state: dict[str, torch.Tensor]) -> bool:
    return "net_vlad.centroids" in state and "base_model.base.0.weight" in state


def convert_sfrs(state: dict[str, torch.Tensor], path: Path, extras: dict) -> Converted:
    """OpenIBL's EmbedNetPCA (or EmbedNet): VGG16 `base_model.base.*` + `net_vlad.*` [+ `pca_layer.*`]."""
    method = "SFRS (OpenIBL vgg16_netvlad)"
    centroids, conv_w = take(state, ("net_vlad.centroids", "net_vlad.conv.weight"), path, method)
    left = sorted(k for k in state if not k.startswith(("base_model.base.", "net_vlad.", "pca_layer.")))
    if left or "net_vlad.conv.bias" in state:
        raise CheckpointError(f"{path}: an {method} file with unexpected tensors: "
                              f"{summarize_keys(left or ['net_vlad.conv.bias'])}")
    trunk = with_prefix(state, "base_model.base.", "backbone.")
    shapes = vgg16_shapes()
    found = {k[len("backbone."):]: tuple(v.shape) for k, v in trunk.items()}
    if found != shapes:
        bad = sorted(set(found) ^ set(shapes)) or [k for k in shapes if found[k] != shapes[k]]
        raise CheckpointError(f"{path}: the {method} trunk base_model.base.* ({len(found)} tensors) is not VGG16 "
                              f"conv1_1..conv5_3 (first mismatch: {bad[0]})")
    clusters = int(centroids.shape[0])
    if centroids.shape != (clusters, 512) or conv_w.shape != (clusters, 512, 1, 1):
        raise CheckpointError(f"{path}: {method} NetVLAD shapes centroids {list(centroids.shape)}, conv "
                              f"{list(conv_w.shape)}; expected [K, 512] and [K, 512, 1, 1]")
    weights = {**trunk, "head.centroids": centroids, "head.conv.weight": conv_w,
               "head.conv.bias": torch.zeros(clusters)}  # no bias in OpenIBL's conv: the same soft-assignment
    pca = None
    if "pca_layer.weight" in state or "pca_layer.bias" in state:
        pca_w, pca_b = take(state, ("pca_layer.weight", "pca_layer.bias"), path, method)
        if pca_w.dim() != 4 or pca_w.shape[1] != clusters * 512 or pca_w.shape[2:] != (1, 1) or pca_b.shape != pca_w.shape[:1]:
            raise CheckpointError(f"{path}: {method} pca_layer.weight {list(pca_w.shape)} does not fit the "
                                  f"{clusters * 512}-d NetVLAD (expected [D, {clusters * 512}, 1, 1] and bias [D])")
        pca = linear_to_pca(pca_w[:, :, 0, 0], pca_b, whiten=True, path=path)
    config = dict(backbone="vgg16", layer=4, head="netvlad", num_clusters=clusters, descriptor_dim=clusters * 512,
                  **PREPROCESS)
    return Converted(config, weights, pca)


LAYOUTS = (
    Layout("sfrs", ("openibl", "sfrs-netvlad"), "yxgeee/OpenIBL (torch.hub vgg16_netvlad: SFRS)",
           "base_model.base.N.* (VGG16) + net_vlad.centroids, net_vlad.conv.weight [+ pca_layer.weight, pca_layer.bias]",
           (PublishedFile("SFRS", "VGG16 + NetVLAD + PCA-whitening", "4096", "480x640 (PIL bilinear)",
                          "vgg16_netvlad.pth", URL),),
           detect_sfrs, convert_sfrs),
)
