"""Recall@N, the standard VPR protocol: a query is a hit at N when one of its top-N retrieved
database images is a positive (within 25 m, or listed in the ground truth). Queries without any
positive count as misses, as in the VPR benchmark.
"""

from __future__ import annotations

import numpy as np


def recall_at_n(predictions: np.ndarray, positives: list[np.ndarray], ns: tuple[int, ...] = (1, 5, 10, 20)) -> dict[int, float]:
    """Percentage of queries with a positive among their first N predictions, for each N in `ns`."""
    if len(predictions) != len(positives):
        raise ValueError(f"{len(predictions)} prediction rows for {len(positives)} queries")
    if len(positives) == 0:
        return {n: 0.0 for n in ns}
    first_hit = np.full(len(positives), np.inf)
    for q, (row, pos) in enumerate(zip(predictions, positives)):
        hits = np.flatnonzero(np.isin(row, pos))
        if len(hits):
            first_hit[q] = hits[0]
    return {n: float(100.0 * np.mean(first_hit < n)) for n in ns}
