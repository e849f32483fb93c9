"""CosFace, the large-margin cosine loss (Wang et al., CVPR 2018) that CosPlace trains with.

    cos(theta_j) = <x / |x|, w_j / |w_j|>
    L = CE( s * (cos(theta) - m * onehot(y)), y )

with scale s = 30 and margin m = 0.4 by default (CosPlace's values).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CosFaceClassifier(nn.Module):
    """One weight vector per class; maps descriptors (N x D) to cosine similarities (N x C)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, descriptors: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(descriptors.float(), dim=1), F.normalize(self.weight.float(), dim=1))


def cosface_logits(cosine: torch.Tensor, labels: torch.Tensor, s: float = 30.0, m: float = 0.4) -> torch.Tensor:
    """s * (cos(theta) - m * onehot(y)): the margin is subtracted from the true class only."""
    onehot = F.one_hot(labels, num_classes=cosine.shape[1]).to(cosine.dtype)
    return s * (cosine - m * onehot)


def cosface_loss(cosine: torch.Tensor, labels: torch.Tensor, s: float = 30.0, m: float = 0.4) -> torch.Tensor:
    """Mean large-margin cosine loss of a batch."""
    return F.cross_entropy(cosface_logits(cosine, labels, s, m), labels)
