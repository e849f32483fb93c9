"""Evaluate an index on labelled queries: retrieve, find positives, compute recall@N."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vpr.data.datasets import GeoImageSet, load_ground_truth, positives_within
from vpr.errors import LabelError
from vpr.evaluation.localization import error_summary, localization_errors, precision_at_recall
from vpr.evaluation.recall import recall_at_n
from vpr.retrieval.answer import Answers, answer
from vpr.retrieval.options import AnswerOptions
from vpr.retrieval.extract import Progress
from vpr.retrieval.options import ExtractOptions
from vpr.retrieval.build import describe
from vpr.retrieval.store import IndexBundle


@dataclass
class EvalReport:
    """Recall@N per N (percent), counts, and per query: the answers, positives, descriptors and, when
    the queries have coordinates, the position estimate's error (metres)."""

    recalls: dict[int, float]
    num_queries: int
    num_with_positives: int
    positives: list[np.ndarray]
    answers: Answers
    descriptors: np.ndarray
    errors: np.ndarray | None = None
    localization: dict | None = None  # median / p90 error and share within 5/10/25/50 m
    confidence: dict = field(default_factory=dict)  # precision of a correct top-1 at 50/80/100% recall

    @property
    def predictions(self) -> np.ndarray:
        """Database rows retrieved per query, best first."""
        return self.answers.indices

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
    threshold: float = 25.0, options: ExtractOptions, answer_options: AnswerOptions = AnswerOptions(),
    progress: Progress | None = None,
) -> EvalReport:
    """Recall@N of `bundle` on `queries` (answered as `answer_options` says), the localisation error
    of the position estimate, and how well its confidence separates right from wrong top-1s."""
    positives = query_positives(bundle, queries, gt=gt, threshold=threshold)
    descriptors = describe(bundle, queries.paths, options, progress)
    answers = answer(bundle, descriptors, max(ns), answer_options, query_paths=queries.paths,
                     query_order=queries.frame_order(), device=str(options.device))
    predictions = answers.indices
    correct = np.array([len(p) > 0 and predictions[q, 0] in p for q, p in enumerate(positives)], dtype=bool)
    report = EvalReport(
        recalls=recall_at_n(predictions, positives, ns), num_queries=len(queries),
        num_with_positives=int(sum(len(p) > 0 for p in positives)), positives=positives,
        answers=answers, descriptors=descriptors, confidence=precision_at_recall(answers.estimate.confidence, correct),
    )
    if queries.utm is not None and bundle.database.utm is not None:
        report.errors = localization_errors(answers.estimate.utm, queries.utm)
        report.localization = error_summary(report.errors)
    return report
