"""Test helpers for extraction: the plain research-code loop the optimised paths must match, and near-copy descriptors.

The tests' own copies, so that a test of the library never leans on the benchmark's code (`vpr/bench`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image


def plain_extract(model, paths: list[Path], batch_size: int = 32) -> np.ndarray:
    """Descriptors the usual way: PIL open, torchvision Resize/ToTensor/Normalize per image, fp32 forward under
    `no_grad`, L2-normalised; one process, on the CPU."""
    config = model.config
    transform = T.Compose([T.Resize(config.input_size), T.ToTensor(), T.Normalize(config.mean, config.std)])
    model = copy.deepcopy(model).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[start:start + batch_size]])
            out.append(torch.nn.functional.normalize(model(batch), dim=1).numpy())
    return np.concatenate(out)


def near_copies(base: np.ndarray, count: int, rng: np.random.Generator, noise: float = 0.1) -> np.ndarray:
    """`count` unit vectors, each a random row of `base` moved up to half way towards another, plus Gaussian
    noise of `noise` times the rows' spread: many near-ties, as in a large database of similar places."""
    dim = base.shape[1]
    spread = float(np.sqrt(np.mean(np.sum((base - base.mean(axis=0)) ** 2, axis=1))))
    a, b = base[rng.integers(0, len(base), count)], base[rng.integers(0, len(base), count)]
    t = rng.uniform(0.0, 0.5, (count, 1)).astype(np.float32)
    x = a + t * (b - a) + rng.normal(0.0, noise * spread / np.sqrt(dim), (count, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
