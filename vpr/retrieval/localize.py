"""Where was the query taken, and how sure: a position estimate from the shortlist's positions.

The estimate is the similarity-weighted mean position of the densest spatial cluster among the
top-k matches. With weights w_j = exp((s_j - s_1) / tau) (s_1 the best similarity), each candidate
i gathers the weight W_i = sum_j w_j [||x_j - x_i|| <= r] of the candidates within r metres of it;
the cluster is the neighbourhood of the candidate with the largest W_i (ties: the better rank), the
position is sum_j w_j x_j / sum_j w_j over that neighbourhood, and the confidence W_i / sum_j w_j is
the share of the shortlist's weight that agrees with it (1 when every match points to one place).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vpr.retrieval.options import DEFAULT_RADIUS, DEFAULT_TOP_K

DEFAULT_TAU = 0.02  # similarity temperature: a gap of 0.1 in cosine similarity weighs e^-5 less


@dataclass(frozen=True)
class Estimate:
    """Estimated positions of n queries: UTM (n x 2, NaN where no match has a position), confidence in
    [0, 1] and how many shortlisted matches formed the winning cluster."""

    utm: np.ndarray
    confidence: np.ndarray
    support: np.ndarray


def estimate_positions(
    similarities: np.ndarray, indices: np.ndarray, database_utm: np.ndarray | None, *,
    top_k: int = DEFAULT_TOP_K, radius: float = DEFAULT_RADIUS, tau: float = DEFAULT_TAU,
    informative: np.ndarray | None = None,
) -> Estimate:
    """Position and confidence per query from its ranked matches (`indices` -1 = no match; rows are
    best-first, as a search returns them). A query whose `informative` is False (a zero descriptor: a
    featureless image, every similarity 0) has no estimate and confidence 0: its ranking says nothing."""
    n = len(indices)
    utm = np.full((n, 2), np.nan)
    confidence = np.zeros(n)
    support = np.zeros(n, dtype=np.int64)
    if database_utm is None:
        return Estimate(utm, confidence, support)
    for q in range(n):
        if informative is not None and not informative[q]:
            continue
        keep = indices[q, :top_k] >= 0
        ids, sims = indices[q, :top_k][keep], similarities[q, :top_k][keep].astype(np.float64)
        if len(ids) == 0:
            continue
        points = database_utm[ids]
        weights = np.exp((sims - sims.max()) / tau)
        near = np.linalg.norm(points[:, None, :] - points[None, :, :], axis=2) <= radius
        gathered = near.astype(np.float64) @ weights
        best = int(np.argmax(gathered))  # argmax keeps the first (best-ranked) of equal neighbourhoods
        members = near[best]
        utm[q] = weights[members] @ points[members] / weights[members].sum()
        confidence[q] = gathered[best] / weights.sum()
        support[q] = int(members.sum())
    return Estimate(utm, confidence, support)
