"""Batch augmentation as tensor ops, so it runs wherever the batch is (GPU or CPU).

CosPlace's training augmentation, drawn independently per image: colour jitter (brightness,
contrast, saturation, hue, as torchvision's ColorJitter, applied in that fixed order) then a random
resized crop back to the input size (area fraction in [crop_scale, 1], aspect change in [3/4, 4/3]).
Random numbers come from a CPU `torch.Generator`, so a seed gives the same batch on every device;
a rank augmenting its share of a global batch draws for the whole batch and keeps its rows, so every
image gets the numbers it would get in a single process.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vpr.training.config import AugmentParams

GRAY_WEIGHTS = (0.299, 0.587, 0.114)


Rows = tuple[int, int]  # (first row, rows drawn for): a batch's place in the global batch its numbers are drawn for


def _rand(n: int, generator: torch.Generator, rows: Rows | None) -> torch.Tensor:
    """`n` uniform numbers: rows[0].. of `rows[1]` drawn, or `n` drawn."""
    if rows is None:
        return torch.rand(n, generator=generator)
    return torch.rand(rows[1], generator=generator)[rows[0] : rows[0] + n]


def _factors(n: int, strength: float, generator: torch.Generator, rows: Rows | None = None) -> torch.Tensor:
    """Per-image factors uniform in [max(0, 1 - strength), 1 + strength]."""
    low = max(0.0, 1.0 - strength)
    return low + (1.0 + strength - low) * _rand(n, generator, rows)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of N x 3 x H x W images, as N x 1 x H x W."""
    weights = torch.tensor(GRAY_WEIGHTS, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * images + (1 - factor) * other, clamped to [0, 1]."""
    factor = factor.to(images.device, images.dtype).view(-1, 1, 1, 1)
    return (factor * images + (1.0 - factor) * other).clamp(0.0, 1.0)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> HSV with hue in [0, 1)."""
    r, g, b = images.unbind(dim=1)
    maxc, _ = images.max(dim=1)
    minc, _ = images.min(dim=1)
    chroma = maxc - minc
    saturation = chroma / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    divisor = torch.where(chroma == 0, torch.ones_like(chroma), chroma)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(chroma == 0, torch.zeros_like(hue), hue)
    return torch.stack([torch.remainder(hue / 6.0, 1.0), saturation, maxc], dim=1)


def hsv_to_rgb(images: torch.Tensor) -> torch.Tensor:
    """HSV (hue in [0, 1)) -> RGB in [0, 1]."""
    h, s, v = images.unbind(dim=1)
    sector = torch.floor(h * 6.0)
    f = h * 6.0 - sector
    sector = sector.long() % 6
    p, q, t = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))
    table = torch.stack([
        torch.stack([v, q, p, p, t, v], dim=1),
        torch.stack([t, v, v, q, p, p], dim=1),
        torch.stack([p, p, t, v, v, q], dim=1),
    ], dim=1)  # N x 3 x 6 x H x W
    index = sector.unsqueeze(1).unsqueeze(2).expand(-1, 3, 1, -1, -1)
    return table.gather(2, index).squeeze(2)


def color_jitter(images: torch.Tensor, params: AugmentParams, generator: torch.Generator, rows: Rows | None = None) -> torch.Tensor:
    """Per-image brightness, contrast, saturation and hue jitter of N x 3 x H x W images in [0, 1]."""
    n = images.shape[0]
    if params.brightness > 0:
        images = _blend(images, torch.zeros_like(images), _factors(n, params.brightness, generator, rows))
    if params.contrast > 0:
        mean = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
        images = _blend(images, mean, _factors(n, params.contrast, generator, rows))
    if params.saturation > 0:
        images = _blend(images, grayscale(images), _factors(n, params.saturation, generator, rows))
    if params.hue > 0:
        shift = (2.0 * _rand(n, generator, rows) - 1.0) * params.hue
        hsv = rgb_to_hsv(images)
        hue = torch.remainder(hsv[:, :1] + shift.to(images.device, images.dtype).view(-1, 1, 1, 1), 1.0)
        images = hsv_to_rgb(torch.cat([hue, hsv[:, 1:]], dim=1))
    return images


def random_resized_crop(images: torch.Tensor, params: AugmentParams, generator: torch.Generator, rows: Rows | None = None) -> torch.Tensor:
    """Per-image crop of area fraction in [crop_scale, 1] and aspect change in crop_ratio, resized back (bilinear)."""
    n = images.shape[0]
    area = params.crop_scale + (1.0 - params.crop_scale) * _rand(n, generator, rows)
    log_lo, log_hi = math.log(params.crop_ratio[0]), math.log(params.crop_ratio[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * _rand(n, generator, rows))
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    left = (1.0 - width) * _rand(n, generator, rows)
    top = (1.0 - height) * _rand(n, generator, rows)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width, 2.0 * left + width - 1.0
    theta[:, 1, 1], theta[:, 1, 2] = height, 2.0 * top + height - 1.0
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment_batch(images: torch.Tensor, params: AugmentParams, generator: torch.Generator, rows: Rows | None = None) -> torch.Tensor:
    """Colour jitter then random resized crop of N x 3 x H x W images in [0, 1] (same shape out); `rows`: see `Rows`."""
    images = color_jitter(images, params, generator, rows)
    if params.crop_scale < 1.0:
        images = random_resized_crop(images, params, generator, rows)
    return images
