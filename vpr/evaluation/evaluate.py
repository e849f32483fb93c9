"""Evaluate an index on labelled queries: retrieve, find positives, compute recall@N and the localisation error."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from vpr import distributed
from vpr.data.datasets import GeoImageSet
from vpr.data.benchmarks import Benchmark, ground_truth_protocol, positives_onto, read_ground_truth
from vpr.data.ground_truth import positives_within
from vpr.errors import LabelError, UsageError
from vpr.evaluation.localization import error_summary, localization_errors, precision_at_recall
from vpr.evaluation.metrics import retrieval_metrics
from vpr.evaluation.recall import recall_at_n
from vpr.models.model import VPRModel
from vpr.retrieval.answer import Answers, answer
from vpr.retrieval.extract import Describer, Progress
from vpr.retrieval.options import AnswerOptions, ExtractOptions
from vpr.retrieval.results import QueryResult, evaluated, query_results
from vpr.retrieval.sharded import extract_sharded
from vpr.retrieval.store import IndexBundle


@dataclass
class EvalReport:
    """Recall@N per N (percent), counts, and per query: the answers, positives, descriptors, the results (each
    match marked positive or not, with its metres) and, when the queries have coordinates, the position
    estimate's error (metres)."""

    recalls: dict[int, float]
    num_queries: int
    num_with_positives: int
    positives: list[np.ndarray]
    answers: Answers
    descriptors: np.ndarray
    results: list[QueryResult] = field(default_factory=list)
    errors: np.ndarray | None = None
    localization: dict | None = None  # median / p90 error and share within 5/10/25/50 m
    confidence: dict = field(default_factory=dict)  # precision of a correct top-1 at 50/80/100% recall
    settings: dict = field(default_factory=dict)  # what produced these numbers: protocol and answering
    seconds: dict = field(default_factory=dict)  # wall time of describing the queries and of answering them
    metrics: dict = field(default_factory=dict)  # mAP@k, AUC-PR, recall at 100% precision, EP, the PR curve

    database_utm: np.ndarray | None = None
    query_utm: np.ndarray | None = None

    def draw_positions(self, path: Path) -> Path:
        """A PNG map of the database positions with each query's true and estimated position."""
        from vpr.evaluation.viz import save_positions_map

        if self.database_utm is None:
            raise UsageError(f"{self.settings.get('index')} holds no coordinates: there are no positions to draw")
        return save_positions_map(self.database_utm, self.query_utm, self.answers.estimate.utm, path,
                                  threshold=self.settings.get("threshold_m") or 25.0)

    def draw_pr_curve(self, path: Path) -> Path:
        """A PNG of the precision-recall curve of the top-1 answers ranked by confidence (AUC-PR in its title)."""
        from vpr.evaluation.metrics import precision_recall, save_pr_curve, top1_correct

        precision, recall, _ = precision_recall(self.answers.estimate.confidence, top1_correct(self.predictions, self.positives))
        return save_pr_curve(precision, recall, path)

    def draw_queries(self, folder: Path, num_preds: int = 5, only_wrong: bool = False) -> list[Path]:
        """One picture per query in the new folder `folder`: the query beside its top `num_preds` matches, green
        when a match is a positive, red when not, metres and similarity under each (`only_wrong`: wrong top-1s)."""
        from vpr.evaluation.pictures import save_query_pictures

        return save_query_pictures(self.results, folder, num_preds=num_preds, only_wrong=only_wrong,
                                   threshold=self.settings.get("threshold_m") or 25.0)

    @property
    def predictions(self) -> np.ndarray:
        """Database rows retrieved per query, best first."""
        return self.answers.indices

    def summary(self) -> dict:
        """The run's figures as `vpr eval --json` prints them (recall rounded to 2 decimals)."""
        settings = self.settings
        return {
            "index": settings.get("index"), "queries": self.num_queries, "queries_with_positives": self.num_with_positives,
            "database": settings.get("database"), "threshold_m": settings.get("threshold_m"),
            "ground_truth": settings.get("ground_truth"), "protocol": settings.get("protocol"), "recall": {f"R@{n}": round(v, 2) for n, v in self.recalls.items()},
            "localization": self.localization, "confidence_precision": self.confidence, "answering": settings.get("answering"),
            "random_init": settings.get("random_init", False),
            "mAP": {f"mAP@{k}": round(v, 2) for k, v in self.metrics.get("mAP@k", {}).items()},
            **{key: self.metrics.get(key) for key in ("auc_pr", "recall_at_100_precision", "extended_precision", "pr_curve")},
        }


def answering_summary(options: AnswerOptions) -> dict:
    """The answering settings in a run's summary (what produced these numbers)."""
    return {
        "qe": asdict(options.qe) if options.qe.n else None,
        "sequence": asdict(options.sequence) if options.sequence is not None else None,
        "rerank": asdict(options.rerank) if options.rerank is not None else None,
        "position": {"top_k": options.position_k, "radius_m": options.position_radius},
    }


def query_positives(bundle: IndexBundle, queries: GeoImageSet, *, gt: Path | None, threshold: float,
                    gt_kind: str | None = None, benchmark: Benchmark | None = None) -> tuple[list[np.ndarray], dict]:
    """Positives per query and the rule that made them: the benchmark's, the ground-truth file's (of kind
    `gt_kind`, None: detected), else database images within `threshold` m."""
    if benchmark is not None:
        return positives_onto(benchmark, bundle.database), benchmark.protocol
    if gt is not None:
        return read_ground_truth(gt, queries, bundle.database, gt_kind), ground_truth_protocol(gt, gt_kind)
    query_utm = queries.require_labels("eval")
    db_utm = bundle.database.require_labels("eval")
    q_zone, db_zone = queries.zone, bundle.database.zone
    if q_zone and db_zone and q_zone[0] != db_zone[0]:
        raise LabelError(f"{queries.source}: queries are in UTM zone {q_zone[0]}, the index in zone {db_zone[0]}")
    rule = {"positives": f"database images within {threshold:g} m (UTM) of the query", "threshold_m": threshold}
    return positives_within(db_utm, query_utm, threshold), rule


def evaluate(
    bundle: IndexBundle, queries: GeoImageSet, *, ns: tuple[int, ...] = (1, 5, 10, 20), gt: Path | None = None,
    threshold: float = 25.0, options: ExtractOptions, answer_options: AnswerOptions = AnswerOptions(),
    progress: Progress | None = None, model: VPRModel | Describer | None = None, descriptors: np.ndarray | None = None,
    gt_kind: str | None = None, benchmark: Benchmark | None = None,
) -> EvalReport | None:
    """Recall@N of `bundle` on `queries` (answered as `answer_options` says), the localisation error
    of the position estimate, and how well its confidence separates right from wrong top-1s. `model` is
    the bundle's model, or a `Describer` of it made earlier; `descriptors` (index space), the queries'
    descriptors from an earlier run, skip the extraction. Under torchrun the queries are described by
    every rank and evaluated on rank 0; the other ranks get None. `benchmark` (its queries as `queries`) or a
    ground-truth file `gt` of kind `gt_kind` give the positives instead of `threshold`."""
    positives, protocol = query_positives(bundle, queries, gt=gt, threshold=threshold, gt_kind=gt_kind, benchmark=benchmark)
    start = time.perf_counter()
    if descriptors is None:
        extraction = extract_sharded(model or bundle.model, queries.paths, replace(options, skip_bad=False), progress=progress)
    if not distributed.is_main():  # under torchrun: this rank described its share; rank 0 evaluates
        return None
    if descriptors is None:
        descriptors = bundle.project(extraction.descriptors)
    elif descriptors.shape != (len(queries), bundle.dim):
        raise UsageError(f"descriptors of shape {descriptors.shape}: {len(queries)} queries need {len(queries)} x {bundle.dim}")
    described = time.perf_counter()
    answers = answer(bundle, descriptors, max(ns), answer_options, query_paths=queries.paths,
                     query_order=queries.frame_order(), device=options.device)
    seconds = {"describe": described - start, "answer": time.perf_counter() - described}
    predictions = answers.indices
    correct = np.array([len(p) > 0 and predictions[q, 0] in p for q, p in enumerate(positives)], dtype=bool)
    report = EvalReport(
        recalls=recall_at_n(predictions, positives, ns), num_queries=len(queries),
        num_with_positives=int(sum(len(p) > 0 for p in positives)), positives=positives,
        answers=answers, descriptors=descriptors, confidence=precision_at_recall(answers.estimate.confidence, correct),
        seconds=seconds, metrics=retrieval_metrics(predictions, positives, answers.estimate.confidence, ns),
        settings={"index": str(bundle.directory), "database": len(bundle.database), "threshold_m": protocol.get("threshold_m"),
                  "ground_truth": protocol.get("ground_truth"), "protocol": protocol, "answering": answering_summary(answer_options),
                  "random_init": bundle.manifest.get("random_init", False)},
    )
    if queries.utm is not None and bundle.database.utm is not None:
        report.errors = localization_errors(answers.estimate.utm, queries.utm)
        report.localization = error_summary(report.errors)
    results = query_results(answers, bundle.database, [str(p) for p in queries.paths],
                            sequence_scored=answer_options.sequence is not None)
    report.results = evaluated(results, positives, queries.utm, bundle.database, report.errors)
    report.database_utm, report.query_utm = bundle.database.utm, queries.utm
    return report
