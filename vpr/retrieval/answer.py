"""Answer queries: the global search, then what a user asks on top of it (query expansion, sequence
matching, geometric re-ranking), then a position estimate with its confidence."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from vpr.errors import UsageError
from vpr.retrieval.expansion import expand_queries
from vpr.retrieval.local_features import extract_image_features
from vpr.retrieval.localize import Estimate, estimate_positions
from vpr.retrieval.options import AnswerOptions, RerankOptions, SequenceOptions
from vpr.retrieval.rerank import rerank_shortlist
from vpr.retrieval.rows import RowReader
from vpr.retrieval.sequence import sequence_search
from vpr.retrieval.store import IndexBundle

FEATURELESS_NORM = 1e-6  # a query descriptor shorter than this is all zeros: the image gave the model nothing
SEQUENCE_MAX_BYTES = 2 << 30  # sequence matching holds every database descriptor in memory: at most 2 GiB of them


@dataclass
class Answers:
    """Per query (rows), best first: database rows, cosine similarities, the ordering score (the
    similarity, or the sequence score), inlier counts when re-ranked, and the position estimate."""

    indices: np.ndarray
    similarities: np.ndarray
    scores: np.ndarray
    inliers: np.ndarray | None
    estimate: Estimate
    pairs: list[list[np.ndarray]] = field(default_factory=list)  # re-ranked: inlier pairs per returned match


def answer(bundle: IndexBundle, descriptors: np.ndarray, k: int, options: AnswerOptions = AnswerOptions(), *,
           query_paths: list[Path] | None = None, query_order: np.ndarray | None = None,
           device: str = "cpu") -> Answers:
    """Top-k answers for query descriptors already in index space (`query_order`: the queries'
    capture order, needed by sequence matching; `query_paths`: needed by re-ranking)."""
    database = bundle.descriptors
    k = min(k, len(database))
    queries = expand_queries(descriptors, database, lambda q, n: bundle.search(q, n, device=device), options.qe)
    shortlist = max(k, options.rerank.k if options.rerank is not None else 0, options.position_k)
    shortlist = min(shortlist, len(database))
    if options.sequence is not None:
        scores, indices = _sequence_search(bundle, queries, shortlist, options.sequence, query_order, device)
    else:
        scores, indices = bundle.search(queries, shortlist, device=device)
    similarities = _similarities(queries, database, indices)
    inliers, pairs = None, []
    if options.rerank is not None:
        if query_paths is None:
            raise UsageError("`rerank=local` needs the query images")
        indices, similarities, scores, inliers, pairs = _rerank(bundle, query_paths, indices, similarities, scores, options.rerank, k)
    informative = np.linalg.norm(np.asarray(descriptors, dtype=np.float32), axis=1) > FEATURELESS_NORM
    estimate = estimate_positions(_position_weights(scores, inliers, options), indices, bundle.database.utm,
                                  top_k=options.position_k, radius=options.position_radius, informative=informative)
    return Answers(indices[:, :k], similarities[:, :k], scores[:, :k], None if inliers is None else inliers[:, :k],
                   estimate, pairs)


def _position_weights(scores: np.ndarray, inliers: np.ndarray | None, options: AnswerOptions) -> np.ndarray:
    """What the position estimate weighs matches by: the score that ranked them (similarity, or the
    sequence score), or for a query whose re-ranking verified a match, the inlier count relative to
    its best (so the verified order decides)."""
    if inliers is None:
        return scores
    best = inliers.max(axis=1, keepdims=True)
    verified = best >= options.rerank.min_inliers
    return np.where(verified, inliers / np.maximum(best, 1), scores)


def _similarities(queries: np.ndarray, database: np.ndarray | RowReader, indices: np.ndarray) -> np.ndarray:
    """Cosine similarity of each query to each of its returned database rows (-inf where none): only
    those rows are read from a lazy database."""
    valid = indices >= 0
    sims = np.einsum("qd,qkd->qk", queries, database[np.where(valid, indices, 0)])
    return np.where(valid, sims, -np.inf).astype(np.float32)


def _sequence_search(bundle: IndexBundle, queries: np.ndarray, k: int, options: SequenceOptions,
                     query_order: np.ndarray | None, device: str) -> tuple[np.ndarray, np.ndarray]:
    """SeqSLAM over the queries and the database, each in capture order; results in the callers' rows."""
    query_order = np.arange(len(queries)) if query_order is None else np.asarray(query_order)
    count, dim = bundle.descriptors.shape
    if isinstance(bundle.descriptors, RowReader) and count * dim * 4 > SEQUENCE_MAX_BYTES:
        raise UsageError(f"{bundle.directory}: `sequence` matching compares every database descriptor and {count:,} x {dim} "
                         f"floats do not fit its {SEQUENCE_MAX_BYTES >> 30} GiB bound; match single frames instead")
    db_order = bundle.database.frame_order()
    scores, ordered = sequence_search(queries[query_order], bundle.descriptors[db_order], replace(options, k=k),
                                      device=device)
    indices = np.where(ordered >= 0, db_order[np.maximum(ordered, 0)], -1)
    out_scores, out_indices = np.empty_like(scores), np.empty_like(indices)
    out_scores[query_order], out_indices[query_order] = scores, indices
    return out_scores, out_indices


def _rerank(bundle: IndexBundle, query_paths: list[Path], indices: np.ndarray, similarities: np.ndarray,
            scores: np.ndarray, options: RerankOptions, k: int,
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[list[np.ndarray]]]:
    """Geometric verification of each query's top `options.k` against the index's stored local features:
    the rows reordered in place (indices, similarities, scores), inlier counts and each match's inlier pairs."""
    inliers = np.zeros(indices.shape, dtype=np.int64)
    all_pairs = []
    with bundle.local_features() as store:
        for q, query_path in enumerate(query_paths):
            top = min(options.k, int((indices[q] >= 0).sum()))
            features = extract_image_features(Path(query_path), store.config)
            result = rerank_shortlist(features, indices[q, :top], scores[q, :top], store, options)
            indices[q, :top], inliers[q, :top] = result.ids, result.inliers
            similarities[q, :top], scores[q, :top] = similarities[q, :top][result.order], scores[q, :top][result.order]
            all_pairs.append(result.pairs[:k])
    return indices, similarities, scores, inliers, all_pairs
