"""Aggregation heads, each as written in its paper.

- GeM (Radenovic et al. 2018) and L2 normalisation live in `vpr.models.layers`, shared with the
  published methods' modules.
- GeM alone (gsv-cities' `GeMPool` aggregator): g_c = (mean_hw max(x_c,hw, eps)^p)^(1/p), then L2; D = C.
- CosPlace (Berton et al. 2022): L2 -> GeM -> Linear -> L2.
- NetVLAD (Arandjelovic et al. 2016): V(k) = sum_i a_k(x_i) (x_i - c_k), with the soft-assignment
  a_k(x_i) = softmax_k(w_k . x_i + b_k), intra-normalised per cluster, flattened, L2-normalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vpr.errors import UsageError
from vpr.models.layers import GeM, L2Norm
from vpr.models.registry import Head


class CosPlaceHead(nn.Module):
    """CosPlace aggregation: L2 -> GeM -> Linear(C, D) -> L2."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.norm_in = L2Norm(dim=1)
        self.gem = GeM()
        self.fc = nn.Linear(in_channels, dim)
        self.norm_out = L2Norm(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_out(self.fc(self.gem(self.norm_in(x))))


class NetVLAD(nn.Module):
    """NetVLAD layer: soft-assignment 1x1 conv, residuals to K centroids, intra-norm, L2.

    Local features are L2-normalised first, as in the paper's reference code. The output has
    K * C dimensions (e.g. 64 x 512 = 32768 for VGG16).
    """

    def __init__(self, in_channels: int, num_clusters: int = 64, alpha: float = 100.0) -> None:
        super().__init__()
        self.num_clusters = num_clusters
        self.conv = nn.Conv2d(in_channels, num_clusters, kernel_size=1, bias=True)
        self.centroids = nn.Parameter(torch.rand(num_clusters, in_channels))
        self.set_centroids(self.centroids.data, alpha)

    @torch.no_grad()
    def set_centroids(self, centroids: torch.Tensor, alpha: float) -> None:
        """Initialise from centroids: w_k = 2 alpha c_k, b_k = -alpha |c_k|^2 (the paper's init)."""
        self.centroids.copy_(centroids)
        self.conv.weight.copy_((2.0 * alpha * centroids)[:, :, None, None])
        self.conv.bias.copy_(-alpha * centroids.norm(dim=1) ** 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, p=2.0, dim=1)
        n, c = x.shape[:2]
        soft_assign = F.softmax(self.conv(x).view(n, self.num_clusters, -1), dim=1)  # N x K x HW
        features = x.view(n, c, -1)  # N x C x HW
        # V(k) = sum_i a_k(x_i) x_i - c_k sum_i a_k(x_i)
        vlad = torch.bmm(soft_assign, features.transpose(1, 2))
        vlad = vlad - self.centroids.unsqueeze(0) * soft_assign.sum(dim=2, keepdim=True)
        vlad = F.normalize(vlad, p=2.0, dim=2)  # intra-normalisation
        return F.normalize(vlad.flatten(1), p=2.0, dim=1)


class PatchNorm(nn.Module):
    """SeqSLAM's patch normalisation of a grey thumbnail (N x 1 x H x W) -> N x HW, L2-normalised.

    Patches are P x P tiles (edge tiles smaller when P does not divide H or W); a flat patch
    (std below `eps`) becomes zeros, as a featureless region carries no place information.
    """

    def __init__(self, patch_size: int = 8, eps: float = 1e-6) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.patch_size
        rows, cols = -(-h // p), -(-w // p)
        padded = F.pad(x.float(), (0, cols * p - w, 0, rows * p - h))
        valid = F.pad(torch.ones_like(x, dtype=torch.float32), (0, cols * p - w, 0, rows * p - h))
        tiles = padded.view(n, rows, p, cols, p).transpose(2, 3)  # N x rows x cols x P x P
        mask = valid.view(n, rows, p, cols, p).transpose(2, 3)
        count = mask.sum(dim=(-2, -1), keepdim=True)
        mean = tiles.sum(dim=(-2, -1), keepdim=True) / count
        std = (((tiles - mean) * mask) ** 2).sum(dim=(-2, -1), keepdim=True).div(count).sqrt()
        normalised = torch.where(std > self.eps, (tiles - mean) / std.clamp(min=self.eps), torch.zeros_like(tiles)) * mask
        image = normalised.transpose(2, 3).reshape(n, rows * p, cols * p)[:, :h, :w]
        return F.normalize(image.flatten(1), p=2.0, dim=1)


def _patchnorm_config(config) -> dict:
    """SeqSLAM's thumbnail: the pixels backbone, a patch that fits, pixels read in [0, 1]."""
    if config.backbone != "pixels":
        raise UsageError("the pixels backbone and the patchnorm head go together: `backbone='pixels'` `head='patchnorm'`")
    if not 1 <= config.patch_size <= min(config.input_size):
        raise UsageError(f"`patch_size={config.patch_size}`: must be between 1 and the thumbnail's shorter side {min(config.input_size)}")
    return {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


class GeMHead(nn.Module):
    """GeM pooling then L2: the C-dimensional descriptor of gsv-cities' GeM baseline."""

    def __init__(self) -> None:
        super().__init__()
        self.gem = GeM()
        self.norm = L2Norm(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.gem(x))


HEADS = (
    Head("gem", "GeM -> L2", "C (the backbone's channels)", lambda config: GeMHead(),
         descriptor_dim=lambda config: config.channels, cnn_only=True),
    Head("cosplace", "L2 -> GeM -> Linear -> L2", "any D (Linear C -> D)",
         lambda config: CosPlaceHead(config.channels, config.descriptor_dim), cnn_only=True),
    Head("netvlad", "soft-assignment to K centroids, residual sums, intra-norm, L2", "K x C (64 x 512 = 32768 for VGG16)",
         lambda config: NetVLAD(config.channels, config.num_clusters),
         descriptor_dim=lambda config: config.num_clusters * config.channels, cnn_only=True),
    Head("patchnorm", "SeqSLAM's patch-normalised grey thumbnail", "H x W of the thumbnail",
         lambda config: PatchNorm(config.patch_size),
         descriptor_dim=lambda config: config.input_size[0] * config.input_size[1], configure=_patchnorm_config,
         cnn_only=True),
)
