"""Evaluate an index on labelled queries: retrieve, find positives, compute recall@N."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vpr.data.datasets import GeoImageSet, load_ground_truth, positives_within
from vpr.errors import LabelError
from vpr.evaluation.recall import recall_at_n
from vpr.retrieval.extract import ExtractOptions, Progress
from vpr.retrieval.pipeline import describe
from vpr.retrieval.store import IndexBundle


@dataclass
class EvalReport:
    """Recall@N per N (percent), how many queries were evaluated and how many have a positive."""

    recalls: dict[int, float]
    num_queries: int
    num_with_positives: int
    predictions: np.ndarray
    positives: list[np.ndarray]


def query_positives(bundle: IndexBundle, queries: GeoImageSet, *, gt: Path | None, threshold: float) -> list[np.ndarray]:
    """Positives per query: from the ground-truth file if given, else database images within `threshold` m."""
    if gt is not None:
        return load_ground_truth(gt, queries, bundle.database)
    query_utm = queries.require_labels("eval without --gt")
    db_utm = bundle.database.require_labels("eval without --gt")
    q_zone, db_zone = queries.zone, bundle.database.zone
    if q_zone and db_zone and q_zone[0] != db_zone[0]:
        raise LabelError(f"{queries.source}: queries are in UTM zone {q_zone[0]}, the index in zone {db_zone[0]}")
    return positives_within(db_utm, query_utm, threshold)


def evaluate(
    bundle: IndexBundle, queries: GeoImageSet, *, ns: tuple[int, ...] = (1, 5, 10, 20), gt: Path | None = None,
    threshold: float = 25.0, options: ExtractOptions, progress: Progress | None = None,
) -> EvalReport:
    """Recall@N of `bundle` on `queries`: descriptors as `options` says, searched on `options.device`."""
    positives = query_positives(bundle, queries, gt=gt, threshold=threshold)
    descriptors = describe(bundle, queries.paths, options, progress)
    _, predictions = bundle.search(descriptors, max(ns), device=options.device)
    return EvalReport(
        recalls=recall_at_n(predictions, positives, ns), num_queries=len(queries),
        num_with_positives=int(sum(len(p) > 0 for p in positives)), predictions=predictions, positives=positives,
    )
