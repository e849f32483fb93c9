"""Layers shared by several aggregators, each written once.

- L2 normalisation along a dimension.
- GeM (Radenovic et al. 2018): f_c = (mean_{h,w} x_{c,h,w}^p)^(1/p), p learnable.
- Entropic optimal transport with a dustbin (Sinkhorn in log space, as in SuperGlue / OpenGlue and
  SALAD): scores S (B x M x N) get an extra dustbin row of constant score z; with marginals
  a = [1/(M+N), ..., (N-M)/(M+N)] over the M+1 rows and b = 1/(M+N) over the N columns, iterate
  u = log a - logsumexp_j(S_ij + v_j), v = log b - logsumexp_i(S_ij + u_i);
  log P = S + u + v, returned rescaled by (M+N) (i.e. log P + log(M+N)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class L2Norm(nn.Module):
    """L2-normalise along `dim` (the channel dimension by default)."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2.0, dim=self.dim)


class GeM(nn.Module):
    """Generalised-mean pooling over the spatial dimensions with a learnable exponent p."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(x.clamp(min=self.eps).pow(self.p), (x.size(-2), x.size(-1)))
        return pooled.pow(1.0 / self.p).flatten(1)


def log_optimal_transport(scores: torch.Tensor, dustbin: torch.Tensor, iters: int = 3, reg: float = 1.0) -> torch.Tensor:
    """Log transport plan (B x (M+1) x N, rescaled by M+N) of `scores` (B x M x N) plus a dustbin row."""
    batch, m, n = scores.shape
    augmented = torch.empty(batch, m + 1, n, dtype=scores.dtype, device=scores.device)
    augmented[:, :m, :] = scores
    augmented[:, m, :] = dustbin
    norm = -torch.tensor(math.log(n + m), device=scores.device)
    log_a = norm.expand(m + 1).contiguous()
    log_a[-1] = log_a[-1] + math.log(n - m)
    log_b = norm.expand(n).contiguous()
    log_a, log_b = log_a.expand(batch, -1), log_b.expand(batch, -1)
    cost = augmented / reg
    u, v = torch.zeros_like(log_a), torch.zeros_like(log_b)
    for _ in range(iters):
        u = log_a - torch.logsumexp(cost + v.unsqueeze(1), dim=2)
        v = log_b - torch.logsumexp(cost + u.unsqueeze(2), dim=1)
    return cost + u.unsqueeze(2) + v.unsqueeze(1) - norm
