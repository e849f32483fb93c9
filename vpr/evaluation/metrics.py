"""Retrieval metrics of the VPR literature beyond recall@N: MSLS's mAP@k, and VPR-Bench's precision-recall
curve of the top-1 answers with its area (AUC-PR), recall at 100% precision and extended precision (EP).
Definitions, formulas and sources: docs/metrics.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vpr.errors import UsageError
from vpr.evaluation.viz import font as load_font
from vpr.fileio import save_png

CURVE_POINTS = 200  # at most this many points of the curve in `retrieval_metrics`


def map_at_k(predictions: np.ndarray, positives: list[np.ndarray], ks: tuple[int, ...] = (1, 5, 10, 20)) -> dict[int, float]:
    """MSLS's mean average precision at k (percent), as mapillary/mapillary_sls computes it (`utils/eval.py`,
    `apk` and `mapk`): over the first k predictions, the i-th (1-based) that is a positive not already seen adds
    hits_so_far / i; the sum is divided by min(number of positives, k), then averaged over the queries.

    A query without positives scores 0 and stays in the mean, as recall@N counts it a miss (MSLS itself divides
    by zero there: its query sets drop such queries, `datasets/msls.py`). Rows may hold -1 for "no match"."""
    _check_rows(predictions, positives)
    ks = _check_ks(ks)
    if len(positives) == 0:
        return {k: 0.0 for k in ks}
    out = {}
    for k in ks:
        scores = []
        for row, pos in zip(predictions, positives):
            wanted = set(np.asarray(pos).ravel().tolist())
            if not wanted:
                scores.append(0.0)
                continue
            seen: set[int] = set()
            hits = total = 0.0
            for i, p in enumerate(np.asarray(row).ravel()[:k].tolist()):
                if p in wanted and p not in seen:
                    hits += 1.0
                    total += hits / (i + 1.0)
                seen.add(p)
            scores.append(total / min(len(wanted), k))
        out[k] = float(100.0 * np.mean(scores))
    return out


def precision_recall(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The precision-recall curve of the top-1 answers, VPR-Bench's way (`performance_comparison.py`,
    scikit-learn's `precision_recall_curve(matches, scores)`): each query is one answer scored by its confidence;
    a threshold accepts the answers scoring at least it; precision = correct accepted / accepted, recall =
    correct accepted / all correct top-1s (so recall reaches 1 and the last threshold's precision is the top-1
    accuracy). A query without a true match in the database has a wrong top-1 (`correct` False): a false
    positive wherever it is accepted, never counted in recall's denominator.

    Returns (precision, recall, thresholds): one point per distinct confidence, thresholds increasing, recall
    decreasing, then the point (recall 0, precision 1) with no threshold. With no correct top-1 at all recall
    is 0 throughout (scikit-learn sets it to 1 and warns)."""
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    correct = np.asarray(correct).ravel().astype(bool)
    if len(confidence) != len(correct):
        raise UsageError(f"`confidence` has {len(confidence)} values for {len(correct)} answers in `correct`; give one per query")
    if not np.isfinite(confidence).all():
        raise UsageError("`confidence` holds NaN or infinite values; give a finite score per query")
    order = np.argsort(-confidence, kind="stable")
    ranked, hits = confidence[order], correct[order]
    ends = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1].astype(np.int64) if len(ranked) else np.zeros(0, np.int64)
    tps = np.cumsum(hits)[ends].astype(np.float64)
    accepted = ends + 1.0
    precision = tps / accepted
    recall = tps / tps[-1] if len(tps) and tps[-1] > 0 else np.zeros_like(tps)
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], ranked[ends][::-1]


def auc_pr(precision: np.ndarray, recall: np.ndarray) -> float:
    """Area under the precision-recall curve by the trapezoidal rule over all its points, the final (0, 1)
    included, as VPR-Bench's `compute_auc_PR` (scikit-learn's `auc(recall, precision)`); NaN with under 2 points."""
    precision, recall = np.asarray(precision, dtype=np.float64), np.asarray(recall, dtype=np.float64)
    if len(recall) < 2:
        return float("nan")
    area = np.trapezoid(precision, recall)
    return float(-area if recall[0] > recall[-1] else area)


def recall_at_100_precision(precision: np.ndarray, recall: np.ndarray) -> float:
    """The largest recall at which precision is exactly 1 (R_P100 of VPR-Bench's `compute_extendedprecision`):
    the share of correct top-1s accepted before the first wrong one; 0 when the most confident answer is wrong."""
    precision, recall = np.asarray(precision), np.asarray(recall)
    perfect = recall[precision == 1.0]
    return float(perfect.max()) if len(perfect) else 0.0


def extended_precision(precision: np.ndarray, recall: np.ndarray) -> float:
    """Extended precision EP = (P_R0 + R_P100) / 2 (Ferrarini et al., RA-L 2020; VPR-Bench's
    `compute_extendedprecision`): P_R0 is the precision at the lowest recall, that of the most confident
    threshold; R_P100 the recall at 100% precision (0 unless P_R0 is 1). NaN for an empty curve."""
    precision = np.asarray(precision, dtype=np.float64)
    if len(precision) < 2:
        return float("nan")
    return float((precision[-2] + recall_at_100_precision(precision, recall)) / 2.0)


def top1_correct(predictions: np.ndarray, positives: list[np.ndarray]) -> np.ndarray:
    """Whether each query's first prediction is one of its positives (False without positives or predictions)."""
    _check_rows(predictions, positives)
    return np.array([np.asarray(row).size > 0 and np.asarray(row).ravel()[0] in set(np.asarray(pos).ravel().tolist())
                     for row, pos in zip(predictions, positives)], dtype=bool)


def retrieval_metrics(predictions: np.ndarray, positives: list[np.ndarray], confidence: np.ndarray,
                      ks: tuple[int, ...] = (1, 5, 10, 20)) -> dict:
    """mAP@k (percent, keyed by k), AUC-PR, recall at 100% precision, extended precision (fractions) and the
    precision-recall curve (at most `CURVE_POINTS` points) as one JSON-ready dict; None where undefined."""
    precision, recall, _ = precision_recall(confidence, top1_correct(predictions, positives))
    keep = np.unique(np.linspace(0, len(precision) - 1, min(len(precision), CURVE_POINTS)).round().astype(int))

    def finite(value: float) -> float | None:
        return value if np.isfinite(value) else None

    return {
        "mAP@k": map_at_k(predictions, positives, ks),
        "auc_pr": finite(auc_pr(precision, recall)),
        "recall_at_100_precision": finite(recall_at_100_precision(precision, recall)) if len(precision) > 1 else None,
        "extended_precision": finite(extended_precision(precision, recall)),
        "pr_curve": {"precision": [round(float(v), 6) for v in precision[keep]],
                     "recall": [round(float(v), 6) for v in recall[keep]]},
    }


CURVE_SIZE, CURVE_MARGIN = 560, 64


def save_pr_curve(precision: np.ndarray, recall: np.ndarray, path: Path) -> Path:
    """A PNG of the precision-recall curve (recall across, precision up), axes labelled, AUC-PR in the title."""
    precision, recall = np.asarray(precision, dtype=np.float64), np.asarray(recall, dtype=np.float64)
    if len(precision) != len(recall) or len(precision) < 2:
        raise UsageError(f"`precision` and `recall` have {len(precision)} and {len(recall)} points; give one curve of 2 or more")
    side, m = CURVE_SIZE, CURVE_MARGIN
    canvas = Image.new("RGB", (side + 2 * m, side + 2 * m), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font, small = load_font(18), load_font(14)

    def xy(r: float, p: float) -> tuple[float, float]:
        return m + r * side, m + (1.0 - p) * side

    for tick in np.linspace(0.0, 1.0, 6):
        x, y = xy(tick, tick)
        draw.line((x, m, x, m + side), fill=(230, 230, 230))
        draw.line((m, y, m + side, y), fill=(230, 230, 230))
        draw.text((x, m + side + 6), f"{tick:.1f}", fill=(0, 0, 0), font=small, anchor="mt")
        draw.text((m - 6, y), f"{tick:.1f}", fill=(0, 0, 0), font=small, anchor="rm")
    draw.rectangle((m, m, m + side, m + side), outline=(0, 0, 0))
    draw.line([xy(r, p) for r, p in zip(recall, precision)], fill=(30, 90, 200), width=3)
    draw.text((m + side / 2, m + side + 28), "recall", fill=(0, 0, 0), font=font, anchor="mt")
    label = Image.new("RGB", (160, 24), (255, 255, 255))
    ImageDraw.Draw(label).text((80, 12), "precision", fill=(0, 0, 0), font=font, anchor="mm")
    canvas.paste(label.rotate(90, expand=True), (8, m + side // 2 - 80))
    title = f"Precision-recall of the top-1 answers (AUC-PR {auc_pr(precision, recall):.3f})"
    draw.text((m + side / 2, m / 2), title, fill=(0, 0, 0), font=font, anchor="mm")
    save_png(canvas, Path(path), "`path`")
    return Path(path)


def _check_rows(predictions: np.ndarray, positives: list[np.ndarray]) -> None:
    if len(predictions) != len(positives):
        raise UsageError(f"`predictions` has {len(predictions)} rows for {len(positives)} queries in `positives`; give one row per query")


def _check_ks(ks: tuple[int, ...]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    bad = [k for k in ks if k < 1]
    if bad:
        raise UsageError(f"`ks` {bad[0]}: each k must be 1 or more")
    return ks
