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

from vpr.errors import UsageError
from vpr.fileio import atomic_file, check_replaceable_file, h5_file
from vpr.retrieval.results import QueryResult

PREDICTIONS_FORMAT = "vpr-predictions"
PREDICTIONS_VERSION = 2  # 2: each query is a QueryResult.to_dict (was its own record shape in 1)
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
        raise UsageError(f"`save_predictions` {path}: name a .csv or .json file")
    check_replaceable_file(path, is_predictions_file, "predictions file", "`save_predictions`")


def check_descriptors_path(path: Path) -> None:
    """Refuse, before any work, a non-HDF5 name or a file vpr did not write."""
    if path.suffix.lower() not in (".h5", ".hdf5"):
        raise UsageError(f"`save_descriptors` {path}: name a .h5 file")
    check_replaceable_file(path, is_descriptors_file, "query descriptors file", "`save_descriptors`")


def save_predictions(results: list[QueryResult], path: Path, summary: dict) -> None:
    """Write an evaluation's results as JSON (the `QueryResult.to_dict` shape every command prints, with the
    run's summary) or as CSV (one row per query and rank)."""
    path = Path(path)
    check_predictions_path(path)
    records = [result.to_dict() for result in results]
    with atomic_file(path) as tmp:
        if path.suffix.lower() == ".json":
            tmp.write_text(json.dumps({"format": PREDICTIONS_FORMAT, "version": PREDICTIONS_VERSION, "summary": summary,
                                       "queries": records}, indent=1, allow_nan=False))
            return
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            for record in records:
                position = record["position"] or {}
                for match in record["matches"]:
                    writer.writerow([
                        record["query"], match["rank"], match["path"], f"{match['similarity']:.6f}",
                        f"{match['distance']:.6f}", _cell(match.get("score", match["similarity"])), _cell(match.get("inliers")),
                        _cell(match.get("metres")), int(bool(match.get("positive"))), _cell(position.get("utm_east")),
                        _cell(position.get("utm_north")), _cell(position.get("lat")), _cell(position.get("lon")),
                        f"{position.get('confidence', 0.0):.6f}", _cell(record.get("error_m")),
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
