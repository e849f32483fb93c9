"""What an answered query is, in one shape for every caller: `vpr query --json`, `Index.query`, `vpr serve` and
`vpr eval`'s predictions all give `QueryResult.to_dict()`, built once from the answering stages' arrays by
`query_results`. An evaluation adds, where it knows them, each match's distance to the query's true position
and whether it is a positive, and the position estimate's error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from vpr.data.datasets import GeoImageSet
from vpr.data.geo import utm_to_latlon
from vpr.errors import UsageError


@dataclass(frozen=True)
class Match:
    """One retrieved database image: `id` is its row in the index, `distance` the L2 distance of unit descriptors."""

    rank: int
    id: int
    path: Path
    similarity: float
    distance: float
    utm_east: float | None
    utm_north: float | None
    lat: float | None
    lon: float | None
    heading: float | None
    score: float | None = None  # the sequence score that ordered the matches (sequence matching only)
    inliers: int | None = None  # geometrically verified local matches (re-ranking only)
    metres: float | None = None  # distance to the query's true position (evaluation only)
    positive: bool | None = None  # within the evaluation's threshold or in its ground truth (evaluation only)

    def to_dict(self) -> dict:
        """The match as `vpr query --json` prints it, plus its database `id` (and the optional fields when set)."""
        data = {
            "rank": self.rank, "id": self.id, "path": str(self.path), "distance": round(self.distance, 6),
            "similarity": round(self.similarity, 6), "utm_east": self.utm_east, "utm_north": self.utm_north,
            "lat": self.lat, "lon": self.lon, "heading": self.heading,
        }
        data.update({key: value for key, value in (("score", self.score), ("inliers", self.inliers),
                                                   ("metres", self.metres), ("positive", self.positive)) if value is not None})
        return data


@dataclass(frozen=True)
class Position:
    """Where the query was probably taken (`vpr.retrieval.localize`): UTM, lat/lon when the zone is
    known, the share of the shortlist's weight that agrees (`confidence`, 0..1) and how many matches."""

    utm_east: float
    utm_north: float
    lat: float | None
    lon: float | None
    confidence: float
    support: int

    def to_dict(self) -> dict:
        """Plain JSON-ready values."""
        return {
            "utm_east": self.utm_east, "utm_north": self.utm_north, "lat": self.lat, "lon": self.lon,
            "confidence": round(self.confidence, 6), "support": self.support,
        }


@dataclass(frozen=True)
class QueryResult:
    """One query's ranked matches and its estimated position (None when the database has no positions, or the
    query gave the model nothing to go on)."""

    query: str
    matches: list[Match]
    position: Position | None
    inlier_pairs: np.ndarray | None = None  # re-ranked: the top match's inliers (m x 4: query x y, database x y)
    error_m: float | None = None  # evaluation only: how far the position estimate is from the true position

    def to_dict(self) -> dict:
        """`{"query", "matches", "position"}` (and `error_m` when evaluated) with plain JSON-ready values."""
        data = {"query": self.query, "matches": [m.to_dict() for m in self.matches],
                "position": None if self.position is None else self.position.to_dict()}
        if self.error_m is not None:
            data["error_m"] = self.error_m
        return data


def query_names(names: Sequence[str] | None, count: int, default: Callable[[int], str]) -> list[str]:
    """One name per query: `names` when given (as many as the queries), else `default(i)`."""
    if names is None:
        return [default(i) for i in range(count)]
    names = [str(name) for name in names]
    if len(names) != count:
        raise UsageError(f"names: {len(names)} names for {count} queries; give one name per query or none")
    return names


def similarity_to_distance(similarity: np.ndarray) -> np.ndarray:
    """L2 distance between unit vectors from their inner product: sqrt(2 - 2 s)."""
    return np.sqrt(np.clip(2.0 - 2.0 * similarity, 0.0, None))


def _latlon(database: GeoImageSet, east: float, north: float) -> tuple[float | None, float | None]:
    if database.zone is None:
        return None, None
    lat, lon = utm_to_latlon(east, north, database.zone[0], database.zone[1])
    return (lat, lon) if math.isfinite(lat) and math.isfinite(lon) else (None, None)


def query_results(answers, database: GeoImageSet, names: Sequence[str], *, sequence_scored: bool = False) -> list[QueryResult]:
    """Each query's `QueryResult` from the answering stages' `Answers` (`vpr.retrieval.answer`): matches with
    their positions, and the position estimate; `sequence_scored` when a sequence score ordered the matches."""
    distances = similarity_to_distance(answers.similarities)
    estimate = answers.estimate
    results = []
    for q, name in enumerate(names):
        matches = []
        for r, i in enumerate(answers.indices[q]):
            if i < 0:
                continue
            east = north = lat = lon = None
            if database.utm is not None:
                east, north = float(database.utm[i, 0]), float(database.utm[i, 1])
                lat, lon = _latlon(database, east, north)
            heading = None if database.heading is None or np.isnan(database.heading[i]) else float(database.heading[i])
            matches.append(Match(
                len(matches) + 1, int(i), database.paths[i], float(answers.similarities[q, r]), float(distances[q, r]),
                east, north, lat, lon, heading, score=float(answers.scores[q, r]) if sequence_scored else None,
                inliers=None if answers.inliers is None else int(answers.inliers[q, r]),
            ))
        position = None
        if np.isfinite(estimate.utm[q]).all():
            east, north = float(estimate.utm[q, 0]), float(estimate.utm[q, 1])
            position = Position(east, north, *_latlon(database, east, north), float(estimate.confidence[q]),
                                int(estimate.support[q]))
        pairs = answers.pairs[q][0] if answers.pairs and answers.pairs[q] else None
        results.append(QueryResult(name, matches, position, pairs))
    return results


def evaluated(results: list[QueryResult], positives: list[np.ndarray], query_utm: np.ndarray | None,
              database: GeoImageSet, errors: np.ndarray | None) -> list[QueryResult]:
    """`results` with what an evaluation knows: each match's metres to the query's true position and whether it
    is a positive, and each estimate's error in metres."""
    out = []
    for q, result in enumerate(results):
        wanted = set(positives[q].tolist())
        matches = [replace(m, positive=m.id in wanted, metres=None if query_utm is None or database.utm is None else
                           float(np.linalg.norm(database.utm[m.id] - query_utm[q]))) for m in result.matches]
        error = None if errors is None or not np.isfinite(errors[q]) else float(errors[q])
        out.append(replace(result, matches=matches, error_m=error))
    return out
