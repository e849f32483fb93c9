"""Places from GPS, for place-batch training (P places x K images, as GSV-Cities trains): images grouped into places
within `radius` metres (and `heading` degrees) of a place's first image, places with at least `min_images`, and
only places at least `spacing` metres apart (or facing more than `heading` apart) so a batch never holds two places
that look the same.

The output is a GSV-Cities-style dataframe (`place_id, year, month, northdeg, city_id, lat, lon, panoid`) with an
`image` column: the image's path relative to the folder holding the data.
"""

from __future__ import annotations

import csv
import io
import os
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vpr.data.datasets import GeoImageSet
from vpr.data.geo import utm_to_latlon
from vpr.errors import UsageError
from vpr.fileio import check_replaceable_file, check_separate, is_tagged_file, save_png, tagged_file
from vpr.training.cosplace_groups import group_colour

COLUMNS = ("place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid", "image")
TAG = "vpr-places"


@dataclass(frozen=True)
class PlaceParams:
    """How images become places: `radius` and `heading` (None: any) around a place's first image, at least
    `min_images` per place, places at least `spacing` metres apart."""

    radius: float = 10.0
    heading: float | None = None
    min_images: int = 4
    spacing: float = 25.0

    def __post_init__(self) -> None:
        for name, value in (("radius", self.radius), ("spacing", self.spacing)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UsageError(f"`{name}` {value!r}: must be a positive number of metres")
        if self.heading is not None and not (isinstance(self.heading, (int, float)) and 0 < self.heading <= 180):
            raise UsageError(f"`heading` {self.heading!r}: must be degrees in (0, 180]")
        if isinstance(self.min_images, bool) or not isinstance(self.min_images, int) or self.min_images < 2:
            raise UsageError(f"`min_images` {self.min_images!r}: a place needs at least 2 images")


@dataclass(frozen=True)
class Places:
    """Each image's place (-1: left out), the kept places' centres, and why images were left out."""

    place: np.ndarray
    centres: np.ndarray
    left_out: dict[str, int]

    @property
    def count(self) -> int:
        return len(self.centres)


def _angle(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


def make_places(images: GeoImageSet, params: PlaceParams = PlaceParams()) -> Places:
    """Group `images` into places (greedy, in file order), then keep the places with enough images and, largest
    first, those at least `params.spacing` from every place kept before."""
    utm = images.require_labels("making places")
    heading = images.heading if params.heading is not None else None
    cell = params.radius
    grid: dict[tuple[int, int], list[int]] = {}
    seeds: list[int] = []  # each place's first image
    place = np.full(len(images), -1, dtype=np.int64)

    def facing(a: int, b: int) -> bool:
        """Whether two images may look alike: always without `heading`, else within `heading` degrees."""
        return heading is None or np.isnan(heading[a]) or np.isnan(heading[b]) or _angle(heading[a], heading[b]) <= params.heading

    for i, (east, north) in enumerate(utm):
        key = (int(east // cell), int(north // cell))
        best = None
        for dx in (-1, 0, 1):
            for dy in (-1, 0, 1):
                for p in grid.get((key[0] + dx, key[1] + dy), []):
                    s = seeds[p]
                    if math.hypot(*(utm[s] - utm[i])) > params.radius:
                        continue
                    if not facing(i, s):
                        continue
                    best = p if best is None else min(best, p)
        if best is None:
            best = len(seeds)
            seeds.append(i)
            grid.setdefault(key, []).append(best)
        place[i] = best
    sizes = np.bincount(place, minlength=len(seeds))
    centres = np.array([utm[place == p].mean(axis=0) for p in range(len(seeds))]).reshape(-1, 2)
    left_out: Counter = Counter()
    kept: list[int] = []
    for p in sorted(range(len(seeds)), key=lambda q: (-sizes[q], q)):
        if sizes[p] < params.min_images:
            left_out[f"in a place of fewer than {params.min_images} images"] += int(sizes[p])
        elif any(math.hypot(*(centres[q] - centres[p])) < params.spacing and facing(seeds[q], seeds[p]) for q in kept):
            left_out[f"in a place within {params.spacing:g} m of a larger one"] += int(sizes[p])
        else:
            kept.append(p)
    new_id = {p: j for j, p in enumerate(sorted(kept))}
    relabelled = np.array([new_id.get(int(p), -1) for p in place], dtype=np.int64)
    return Places(relabelled, centres[sorted(kept)] if kept else np.zeros((0, 2)), dict(left_out))


def places_table(images: GeoImageSet, places: Places, root: Path) -> str:
    """The GSV-Cities-style CSV of the kept images, ordered by place; each image's path relative to `root` (the
    CSV's folder) when it lies under it, else absolute."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    zone = images.zone
    order = sorted((int(p), i) for i, p in enumerate(places.place) if p >= 0)
    for p, i in order:
        east, north = images.utm[i]
        lat, lon = utm_to_latlon(float(east), float(north), *zone) if zone else ("", "")
        heading = images.heading[i] if images.heading is not None and not np.isnan(images.heading[i]) else ""
        path = images.paths[i]
        year, month = _year_month(images, i)
        fields = path.name.split("@")
        named = path.name.startswith("@") and len(fields) > 14  # the `@` format: pano id 7, timestamp YYYYMM 13
        if named and year == "" and len(fields[13]) >= 6 and fields[13][:6].isdigit():
            year, month = int(fields[13][:4]), int(fields[13][4:6])
        path = Path(os.path.abspath(path))
        image = path.relative_to(root).as_posix() if root in path.parents else str(path)
        writer.writerow([p, year, month, "" if heading == "" else f"{heading:g}", path.parent.name,
                         lat if lat == "" else f"{lat:.7f}", lon if lon == "" else f"{lon:.7f}",
                         fields[7] if named and fields[7] else path.stem, image])
    return buffer.getvalue()


def _year_month(images: GeoImageSet, i: int) -> tuple[object, object]:
    """The image's year and month when its time is a date (EXIF, manifest timestamps), else empty."""
    if images.time is None or np.isnan(images.time[i]) or images.time[i] < 1e8:  # frame numbers, not epoch seconds
        return "", ""
    from datetime import datetime, timezone

    when = datetime.fromtimestamp(float(images.time[i]), tz=timezone.utc)
    return when.year, when.month


def write_places(out: Path, text: str) -> None:
    """Write the places CSV atomically; an existing file is replaced only if vpr wrote it."""
    out = Path(out)
    if out.suffix.lower() != ".csv":
        raise UsageError(f"`out` {out}: a places file ends in .csv; name it e.g. places.csv")
    check_replaceable_file(out, lambda p: is_tagged_file(p, TAG), "places file", "`out`")
    with tagged_file(out, TAG) as tmp:
        Path(tmp).write_text(text)


def save_places_map(images: GeoImageSet, places: Places, out_png: Path, size: int = 1024) -> Path:
    """Every image as a dot coloured by its place (grey: left out), each kept place's centre ringed."""
    check_separate(out_png, images.input_folders(), "`map_png`")
    utm = images.utm
    low, high = utm.min(axis=0), utm.max(axis=0)
    margin = 12
    scale = (size - 2 * margin) / float(max(np.max(high - low), 1.0))
    width, height = (np.ceil((high - low) * scale).astype(int) + 2 * margin).tolist()
    canvas = Image.new("RGB", (max(width, 320), height + 24), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = margin + (utm[:, 0] - low[0]) * scale
    y = margin + (high[1] - utm[:, 1]) * scale
    for i in range(len(utm)):
        colour = (170, 170, 170) if places.place[i] < 0 else group_colour(int(places.place[i]))
        draw.ellipse((x[i] - 2, y[i] - 2, x[i] + 2, y[i] + 2), fill=colour)
    kept, total = int((places.place >= 0).sum()), len(utm)
    draw.text((margin, height + 6), f"{places.count} places, {kept} of {total} images; grey: left out", fill=(0, 0, 0))
    save_png(canvas, Path(out_png), "`map_png`")
    return Path(out_png)
