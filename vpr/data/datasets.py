"""Geo-tagged image sets from `@`-named folders, CSV manifests and ground-truth files.

Everything becomes one `GeoImageSet`: image paths with UTM east/north (metres), heading (degrees,
NaN when unknown) and the UTM zone; an unlabelled folder has no coordinates.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.neighbors import NearestNeighbors

from vpr.data.geo import latlon_to_utm, parse_at_name
from vpr.data.images import IMAGE_EXTENSIONS
from vpr.errors import LabelError, UsageError

SPLITS = ("train", "val", "test")


@dataclass
class GeoImageSet:
    """Images and, when known, where they were taken (UTM metres) and which way they face."""

    paths: list[Path]
    utm: np.ndarray | None = None  # N x 2 float64 (east, north)
    heading: np.ndarray | None = None  # N float64 degrees in [0, 360), NaN where unknown
    zone: tuple[int, str] | None = None
    source: Path | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labelled(self) -> bool:
        return self.utm is not None

    def require_labels(self, what: str) -> np.ndarray:
        """The UTM array, or a `LabelError` saying that `what` needs coordinates."""
        if self.utm is None:
            raise LabelError(
                f"{self.source}: images have no coordinates but {what} needs them; "
                "use '@utm_east@utm_north@...' file names, a CSV manifest (path,lat,lon), or --gt"
            )
        return self.utm

    def subset(self, indices: np.ndarray | list[int]) -> "GeoImageSet":
        """The images at `indices`, with their labels."""
        idx = np.asarray(indices, dtype=np.int64)
        return GeoImageSet(
            paths=[self.paths[i] for i in idx],
            utm=None if self.utm is None else self.utm[idx],
            heading=None if self.heading is None else self.heading[idx],
            zone=self.zone, source=self.source,
        )


def list_images(folder: Path) -> list[Path]:
    """All image files under `folder`, recursively, in a stable (sorted) order."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image_set(source: Path) -> GeoImageSet:
    """Load a folder of images (labelled if all names are `@` names) or a CSV manifest."""
    source = Path(source)
    if source.is_dir():
        return load_folder(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        return load_manifest(source)
    if not source.exists():
        raise UsageError(f"{source}: no such folder or CSV file; give a folder of images or a .csv manifest")
    raise UsageError(f"{source}: expected a folder of images or a .csv manifest (path,lat,lon[,heading])")


def load_folder(folder: Path) -> GeoImageSet:
    """Images under `folder`; coordinates come from `@` names when every image has one."""
    paths = list_images(folder)
    if not paths:
        raise UsageError(f"{folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    if not paths[0].name.startswith("@"):
        return GeoImageSet(paths=paths, source=folder)
    names = [parse_at_name(p.name) for p in paths]  # raises LabelError naming the first bad file
    utm_xy = np.array([[n.east, n.north] for n in names], dtype=np.float64)
    heading = np.array([np.nan if n.heading is None else n.heading for n in names], dtype=np.float64)
    zones = {(n.zone_number, n.zone_letter) for n in names if n.zone_number is not None}
    numbers = {z[0] for z in zones}
    if len(numbers) > 1:
        raise LabelError(
            f"{folder}: images span UTM zones {sorted(numbers)}; split them by zone, one index per zone"
        )
    zone = sorted(zones, key=lambda z: str(z[1]))[0] if zones else None
    return GeoImageSet(paths=paths, utm=utm_xy, heading=heading, zone=zone, source=folder)


def _cell_float(row: dict, key: str, where: str) -> float:
    text = (row.get(key) or "").strip()
    try:
        value = float(text)
    except ValueError:
        raise LabelError(f"{where}: column '{key}' is '{text}', not a number; fix or remove the row") from None
    if not math.isfinite(value):
        raise LabelError(f"{where}: column '{key}' is {text}; fix or remove the row")
    return value


def load_manifest(csv_path: Path) -> GeoImageSet:
    """Read `path,lat,lon[,heading]` or `path,utm_east,utm_north[,heading]`; paths relative to the CSV."""
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = columns
        rows = list(reader)
    if "path" not in columns:
        raise LabelError(f"{csv_path}: no 'path' column (found {columns}); header must be path,lat,lon[,heading]")
    has_latlon = {"lat", "lon"} <= set(columns)
    has_utm = {"utm_east", "utm_north"} <= set(columns)
    if not (has_latlon or has_utm):
        raise LabelError(
            f"{csv_path}: needs columns lat,lon or utm_east,utm_north (found {columns})"
        )
    if not rows:
        raise UsageError(f"{csv_path}: the manifest has no rows")
    paths, coords, headings, zones = [], [], [], set()
    for line, row in enumerate(rows, start=2):
        where = f"{csv_path}:{line}"
        rel = (row.get("path") or "").strip()
        if not rel:
            raise LabelError(f"{where}: empty 'path'; fill it in or remove the row")
        paths.append((csv_path.parent / rel) if not Path(rel).is_absolute() else Path(rel))
        if has_utm:
            coords.append((_cell_float(row, "utm_east", where), _cell_float(row, "utm_north", where)))
            if "zone" in columns and (row.get("zone") or "").strip():
                zones.add((row["zone"] or "").strip())
        else:
            try:
                east, north, number, letter = latlon_to_utm(_cell_float(row, "lat", where), _cell_float(row, "lon", where))
            except LabelError as exc:
                raise LabelError(f"{where}: {exc}") from None
            coords.append((east, north))
            zones.add((number, letter))
        heading = float("nan")
        if "heading" in columns and (row.get("heading") or "").strip():
            heading = _cell_float(row, "heading", where)
            if not 0.0 <= heading <= 360.0:
                raise LabelError(f"{where}: heading {heading} is outside 0..360 degrees; fix the row")
            heading %= 360.0
        headings.append(heading)
    zone = None
    if has_latlon:
        numbers = sorted({z[0] for z in zones})
        if len(numbers) > 1:
            raise LabelError(
                f"{csv_path}: rows span UTM zones {numbers}; split the manifest by zone, one index per zone"
            )
        zone = sorted(zones, key=lambda z: z[1])[0]
    return GeoImageSet(
        paths=paths, utm=np.array(coords, dtype=np.float64), heading=np.array(headings, dtype=np.float64),
        zone=zone, source=csv_path,
    )


def load_split(root: Path, split: str) -> tuple[GeoImageSet, GeoImageSet]:
    """The (database, queries) of `ROOT/images/SPLIT/` in the VPR-datasets-downloader layout."""
    if split not in SPLITS:
        raise UsageError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    base = Path(root) / "images" / split
    if not base.is_dir():
        raise UsageError(f"{base}: missing; expected ROOT/images/{{train,val,test}}/{{database,queries}}")
    return load_folder(base / "database"), load_folder(base / "queries")


def positives_within(database_utm: np.ndarray, query_utm: np.ndarray, radius: float) -> list[np.ndarray]:
    """For each query, the database indices within `radius` metres, sorted by distance."""
    knn = NearestNeighbors(n_jobs=1).fit(database_utm)
    distances, indices = knn.radius_neighbors(query_utm, radius=radius, return_distance=True, sort_results=True)
    return [idx.astype(np.int64) for idx in indices]


def load_ground_truth(csv_path: Path, queries: GeoImageSet, database: GeoImageSet) -> list[np.ndarray]:
    """Read a `query,positives` CSV (names or indices, space-separated) into database indices per query."""
    db_index = _name_index(database)
    q_index = _name_index(queries)
    positives: list[np.ndarray | None] = [None] * len(queries)
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"query", "positives"} <= {c.strip() for c in reader.fieldnames}:
            raise LabelError(f"{csv_path}: header must be 'query,positives' (found {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):
            q = _resolve(row["query"].strip(), q_index, len(queries), f"{csv_path}:{line}", "query")
            tokens = (row["positives"] or "").split()
            positives[q] = np.array(
                sorted({_resolve(t, db_index, len(database), f"{csv_path}:{line}", "database") for t in tokens}),
                dtype=np.int64,
            )
    return [np.zeros(0, dtype=np.int64) if p is None else p for p in positives]


def _name_index(images: GeoImageSet) -> dict[str, int]:
    """Map each image's file name and its path relative to the set's source to its index."""
    index: dict[str, int] = {}
    for i, path in enumerate(images.paths):
        index.setdefault(path.name, i)
        if images.source is not None and images.source.is_dir():
            index.setdefault(path.relative_to(images.source).as_posix(), i)
    return index


def _resolve(token: str, index: dict[str, int], count: int, where: str, role: str) -> int:
    if token in index:
        return index[token]
    if token.isdigit() and int(token) < count:
        return int(token)
    raise LabelError(f"{where}: {role} image '{token}' is not in the {role} set; check the ground-truth file")
