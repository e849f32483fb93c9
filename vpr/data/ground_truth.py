"""Which database images are a query's true matches: within a radius (the standard 25 m protocol), or as a
ground-truth file lists them (frame-matched sets such as Nordland or a corridor, where positions do not say it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.neighbors import NearestNeighbors

from vpr.data.datasets import GeoImageSet, extra_cells, read_csv, row_dict
from vpr.errors import LabelError


def positives_within(database_utm: np.ndarray, query_utm: np.ndarray, radius: float) -> list[np.ndarray]:
    """For each query, the database indices within `radius` metres, sorted by distance."""
    knn = NearestNeighbors(n_jobs=1).fit(database_utm)
    distances, indices = knn.radius_neighbors(query_utm, radius=radius, return_distance=True, sort_results=True)
    return [idx.astype(np.int64) for idx in indices]


def load_ground_truth(csv_path: Path, queries: GeoImageSet, database: GeoImageSet) -> list[np.ndarray]:
    """Read a `query,positives` CSV into database indices per query.

    Images are named by file name, by path (relative to the set's folder, or any trailing part of it)
    or by 0-based index; positives are separated by spaces; each query has at most one row.
    """
    csv_path = Path(csv_path)
    header, rows = read_csv(csv_path)
    if not {"query", "positives"} <= set(header):
        raise LabelError(f"{csv_path}: header must be 'query,positives' (found {header})")
    q_names, db_names = _name_index(queries), _name_index(database)
    positives: list[np.ndarray | None] = [None] * len(queries)
    first_line: dict[int, int] = {}
    for line, cells in rows:
        where = f"{csv_path}:{line}"
        extra_cells(cells, header, where, "separate positives with spaces, not commas (q.jpg,d1.jpg d2.jpg)")
        row = row_dict(header, cells)
        token = row.get("query", "").strip()
        if not token:
            raise LabelError(f"{where}: empty 'query'; fill it in or remove the row")
        q = _resolve(token, queries, q_names, where, "query")
        if q in first_line:
            raise LabelError(
                f"{where}: query {token!r} already has a row on line {first_line[q]}; "
                "merge the two rows (one row per query)"
            )
        first_line[q] = line
        found = {_resolve(t, database, db_names, where, "database") for t in row.get("positives", "").split()}
        positives[q] = np.array(sorted(found), dtype=np.int64)
    return [np.zeros(0, dtype=np.int64) if p is None else p for p in positives]


def _name_index(images: GeoImageSet) -> dict[str, list[int]]:
    """Map each file name to the indices of the images with that name."""
    index: dict[str, list[int]] = {}
    for i, path in enumerate(images.paths):
        index.setdefault(path.name, []).append(i)
    return index


def _resolve(token: str, images: GeoImageSet, names: dict[str, list[int]], where: str, role: str) -> int:
    """The index of the image `token` names: a file name, a trailing part of its path, or an index."""
    relative = token.removeprefix("./")
    candidates = names.get(relative.rsplit("/", 1)[-1], [])
    if "/" in relative:
        candidates = [i for i in candidates if ("/" + images.paths[i].as_posix()).endswith("/" + relative)]
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        shown = ", ".join(_relative_name(images, i) for i in candidates[:3])
        raise LabelError(
            f"{where}: {role} image {token!r} is ambiguous: it matches {len(candidates)} images ({shown}); "
            f"use the path relative to the {role} folder"
        )
    if token.isascii() and token.isdigit() and int(token) < len(images):
        return int(token)
    raise LabelError(
        f"{where}: {role} image {token!r} is not in the {role} set (give a file name, a relative path or "
        f"an index 0..{len(images) - 1}); check the ground-truth file"
    )


def _relative_name(images: GeoImageSet, i: int) -> str:
    """Image `i`'s path relative to the set's folder (or to a manifest's folder) where it lies inside it."""
    path = images.paths[i]
    if images.source is not None:
        base = images.source if images.source.is_dir() else images.source.parent
        if path.is_relative_to(base):
            return path.relative_to(base).as_posix()
    return path.as_posix()
