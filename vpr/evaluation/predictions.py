"""Per-query results of `vpr eval` for failure analysis: predictions (CSV or JSON) and query descriptors (HDF5).

Each file is written atomically and replaces only a file vpr wrote: a JSON whose `format` is
vpr's, a CSV starting with vpr's header, an HDF5 whose `format` attribute is vpr's.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np

from vpr.data.datasets import GeoImageSet
from vpr.data.geo import utm_to_latlon
from vpr.errors import UsageError
from vpr.evaluation.evaluate import EvalReport
from vpr.fileio import atomic_file, check_replaceable_file, h5_file
from vpr.retrieval.results import similarity_to_distance

PREDICTIONS_FORMAT = "vpr-predictions"
DESCRIPTORS_FORMAT = "vpr-query-descriptors"
CSV_COLUMNS = (
    "query", "rank", "database", "similarity", "distance", "score", "inliers", "metres", "positive",
    "est_utm_east", "est_utm_north", "est_lat", "est_lon", "confidence", "error_m",
)


def is_predictions_file(path: Path) -> bool:
    """Whether `path` is a predictions file vpr wrote (JSON with vpr's format, or CSV with vpr's header)."""
    try:
        if path.suffix.lower() == ".json":
            return json.loads(path.read_text()).get("format") == PREDICTIONS_FORMAT
        with open(path, newline="") as f:
            return tuple(next(csv.reader(f), ())) == CSV_COLUMNS
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return False


def is_descriptors_file(path: Path) -> bool:
    """Whether `path` is a query-descriptors HDF5 file vpr wrote."""
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == DESCRIPTORS_FORMAT
    except (OSError, ValueError):
        return False


def check_predictions_path(path: Path) -> None:
    """Refuse, before any work, an extension vpr cannot write or a file vpr did not write."""
    if path.suffix.lower() not in (".csv", ".json"):
        raise UsageError(f"--save-predictions {path}: name a .csv or .json file")
    check_replaceable_file(path, is_predictions_file, "predictions file", "--save-predictions")


def check_descriptors_path(path: Path) -> None:
    """Refuse, before any work, a non-HDF5 name or a file vpr did not write."""
    if path.suffix.lower() not in (".h5", ".hdf5"):
        raise UsageError(f"--save-descriptors {path}: name a .h5 file")
    check_replaceable_file(path, is_descriptors_file, "query descriptors file", "--save-descriptors")


def prediction_records(report: EvalReport, queries: GeoImageSet, database: GeoImageSet) -> list[dict]:
    """One record per query: its estimate and error, and its top-k with similarity, metres and positivity."""
    answers = report.answers
    distances = similarity_to_distance(answers.similarities)
    records = []
    for q, path in enumerate(queries.paths):
        east, north = answers.estimate.utm[q]
        has_estimate = bool(np.isfinite(east))
        lat = lon = None
        if has_estimate and database.zone is not None:
            lat, lon = utm_to_latlon(float(east), float(north), *database.zone)
        positives = set(report.positives[q].tolist())
        matches = []
        for rank, index in enumerate(answers.indices[q]):
            if index < 0:
                continue
            metres = None
            if queries.utm is not None and database.utm is not None:
                metres = float(np.linalg.norm(database.utm[index] - queries.utm[q]))
            matches.append({
                "rank": rank + 1, "database": str(database.paths[index]), "similarity": float(answers.similarities[q, rank]),
                "distance": float(distances[q, rank]), "score": float(answers.scores[q, rank]),
                "inliers": None if answers.inliers is None else int(answers.inliers[q, rank]),
                "metres": metres, "positive": int(index) in positives,
            })
        error = None if report.errors is None or not np.isfinite(report.errors[q]) else float(report.errors[q])
        records.append({
            "query": str(path),
            "estimate": {"utm_east": float(east), "utm_north": float(north), "lat": lat, "lon": lon} if has_estimate else None,
            "confidence": float(answers.estimate.confidence[q]), "error_m": error, "matches": matches,
        })
    return records


def save_predictions(records: list[dict], path: Path, summary: dict) -> None:
    """Write the records as JSON (with the run's summary) or as CSV (one row per query and rank)."""
    path = Path(path)
    check_predictions_path(path)
    with atomic_file(path) as tmp:
        if path.suffix.lower() == ".json":
            tmp.write_text(json.dumps({"format": PREDICTIONS_FORMAT, "version": 1, "summary": summary,
                                       "queries": records}, indent=1, allow_nan=False))
            return
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            for record in records:
                estimate = record["estimate"] or {}
                for match in record["matches"]:
                    writer.writerow([
                        record["query"], match["rank"], match["database"], f"{match['similarity']:.6f}",
                        f"{match['distance']:.6f}", f"{match['score']:.6f}", _cell(match["inliers"]),
                        _cell(match["metres"]), int(match["positive"]), _cell(estimate.get("utm_east")),
                        _cell(estimate.get("utm_north")), _cell(estimate.get("lat")), _cell(estimate.get("lon")),
                        f"{record['confidence']:.6f}", _cell(record["error_m"]),
                    ])


def save_descriptors(descriptors: np.ndarray, paths: list[Path], path: Path) -> None:
    """Write the query descriptors (index space, rows in query order) and their image paths as HDF5."""
    path = Path(path)
    check_descriptors_path(path)
    with atomic_file(path) as tmp:
        with h5_file(tmp) as f:
            f.attrs["format"] = DESCRIPTORS_FORMAT
            f.create_dataset("paths", data=[str(p) for p in paths], dtype=h5py.string_dtype())
            f.create_dataset("descriptors", data=np.asarray(descriptors, dtype=np.float32))


def _cell(value: float | int | None) -> str:
    """A CSV cell: empty for None, else the number (6 decimals for floats)."""
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else f"{value:.6f}"
