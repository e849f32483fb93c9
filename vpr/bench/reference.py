"""The plain research-code extraction loop the fast paths are compared with, and how closely they agree."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vpr.models.model import VPRModel
from vpr.retrieval.search import torch_search


def reference_extract(
    model: VPRModel, paths: list[Path], *, batch_size: int = 32, device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Descriptors the way research code computes them: PIL open, torchvision transforms per image,
    fp32 forward under `no_grad`, collect numpy; one process, no other tricks."""
    import torchvision.transforms as T

    transform = T.Compose([T.Resize(model.config.input_size), T.ToTensor(), T.Normalize(model.config.mean, model.config.std)])
    model = copy.deepcopy(model).to(device).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[start:start + batch_size]])
            descriptors = model(batch.to(device))
            out.append(torch.nn.functional.normalize(descriptors, dim=1).cpu().numpy())
            if progress:
                progress(start + len(batch), len(paths))
    return np.concatenate(out) if out else np.zeros((0, model.config.descriptor_dim), dtype=np.float32)


def topk_agreement(reference: np.ndarray, candidate: np.ndarray, k: int = 5) -> dict[str, float]:
    """Search the first half of the rows with the second half, with `reference` and with `candidate`
    descriptors: the fraction of queries with the same top-k (indices, in order) and the largest
    difference between their top-k similarities (small when only near-ties swap)."""
    half = len(reference) // 2
    k = min(k, half)
    if half == 0 or k == 0:
        return {"identical": 1.0, "similarity_max_diff": 0.0}
    sim_a, a = torch_search(reference[:half], reference[half:], k)
    sim_b, b = torch_search(candidate[:half], candidate[half:], k)
    return {"identical": float(np.mean(np.all(a == b, axis=1))), "similarity_max_diff": float(np.abs(sim_a - sim_b).max())}
