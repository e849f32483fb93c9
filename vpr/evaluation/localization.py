"""How far the position estimate lands from the truth, and how well its confidence flags a wrong top-1."""

from __future__ import annotations

import numpy as np

WITHIN_METRES = (5, 10, 25, 50)
PRECISION_AT = (50, 80, 100)  # percent of the correct top-1 answers a confidence threshold keeps


def localization_errors(estimate_utm: np.ndarray, query_utm: np.ndarray) -> np.ndarray:
    """Metres between each estimate and the query's true position (inf where nothing was estimated)."""
    errors = np.linalg.norm(estimate_utm - query_utm, axis=1)
    return np.where(np.isfinite(errors), errors, np.inf)


def error_summary(errors: np.ndarray) -> dict:
    """Median and 90th percentile error (m) and the share of queries (percent) within 5/10/25/50 m,
    to 0.01."""
    if len(errors) == 0:
        return {"median_m": None, "p90_m": None, "within": {f"{m}m": None for m in WITHIN_METRES}}
    median, p90 = np.percentile(errors, [50, 90], method="inverted_cdf")  # p% of queries lie within it; inf: too few estimates
    return {
        "median_m": round(float(median), 2) if np.isfinite(median) else None,
        "p90_m": round(float(p90), 2) if np.isfinite(p90) else None,
        "within": {f"{m}m": round(float(100.0 * np.mean(errors <= m)), 2) for m in WITHIN_METRES},
    }


def precision_at_recall(confidence: np.ndarray, correct: np.ndarray, recalls: tuple[int, ...] = PRECISION_AT) -> dict:
    """Precision of "the top-1 is correct" among the queries a confidence threshold accepts, at the
    lowest threshold that still keeps `r`% of the correct answers (percent; None without correct ones)."""
    correct = np.asarray(correct, dtype=bool)
    total = int(correct.sum())
    if total == 0:
        return {f"P@R{r}": None for r in recalls}
    order = np.argsort(-confidence, kind="stable")
    hits = np.cumsum(correct[order])
    accepted = np.arange(1, len(order) + 1)
    # a threshold accepts whole groups of equal confidence: only the last position of each group counts
    ends = np.r_[np.flatnonzero(np.diff(confidence[order]) != 0), len(order) - 1]
    out = {}
    for r in recalls:
        reach = ends[hits[ends] >= np.ceil(total * r / 100.0)]
        out[f"P@R{r}"] = round(float(100.0 * hits[reach[0]] / accepted[reach[0]]), 2)
    return out
