"""Training places for place-batch methods, and the sampler of their P x K batches.

Three sources give a `PlaceSet`:
- a GSV-Cities root (`Dataframes/<City>.csv`, `Images/<City>/<name>.jpg`), read with the reference loader's
  semantics: cities in file-name order, place ids offset by city index x 10^5 (the first city not offset), places
  with fewer than K images left out;
- a places CSV written by `vpr places` (its `image` column relative to the CSV's folder);
- a standard-layout root: places made from its train split with `vpr places`' defaults (`make_places`).

`epoch_batches` is the reference sampler: places shuffled within each city (cities in order), batches of P
consecutive places (the last one may be smaller), K random images of each place without replacement.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vpr.data.datasets import load_split_images
from vpr.errors import LabelError, UsageError

CITY_OFFSET = 10**5  # GSVCitiesDataset's place id offset per city


@dataclass(frozen=True)
class PlaceSet:
    """Images grouped into places: `labels[i]` is image i's place id, `cities[i]` its city's index."""

    paths: list[Path]
    labels: np.ndarray
    cities: np.ndarray
    source: Path
    left_out: dict[str, int] = field(default_factory=dict)

    @property
    def places(self) -> np.ndarray:
        """Place ids in first-appearance order."""
        _, first = np.unique(self.labels, return_index=True)
        return self.labels[np.sort(first)]

    def members(self) -> dict[int, np.ndarray]:
        """Each place's image indices."""
        order = np.argsort(self.labels, kind="stable")
        ids, starts = np.unique(self.labels[order], return_index=True)
        return {int(p): part for p, part in zip(ids, np.split(order, starts[1:]))}


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """A CSV's header and rows, or a `LabelError` naming the file."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            return list(reader.fieldnames or []), list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelError(f"{path}: cannot read the places CSV ({exc}); re-copy it or write it again with vpr places") from None


def gsv_image_name(row: dict[str, str], place: int) -> str:
    """GSV-Cities' file name of a dataframe row (`get_img_name`: place id mod 10^5 in 7 digits, year 4, month 2,
    northdeg 3, lat and lon as floats print)."""
    return "_".join([row["city_id"], str(place % CITY_OFFSET).zfill(7), str(int(float(row["year"]))).zfill(4),
                     str(int(float(row["month"]))).zfill(2), str(int(float(row["northdeg"]))).zfill(3),
                     str(float(row["lat"])), str(float(row["lon"])), row["panoid"]]) + ".jpg"


NEEDED = ("place_id", "year", "month", "northdeg", "city_id", "lat", "lon", "panoid")


def _in_large_places(labels: np.ndarray, min_images: int) -> np.ndarray:
    """Which images belong to places of at least `min_images` images."""
    ids, counts = np.unique(labels, return_counts=True)
    return np.isin(labels, ids[counts >= min_images])


def _place_set(paths: list[Path], labels: list[int], cities: list[int], source: Path, min_images: int,
               left_out: dict[str, int]) -> PlaceSet:
    """The places of at least `min_images` images, the others counted in `left_out`."""
    labels_ = np.asarray(labels, dtype=np.int64)
    keep = _in_large_places(labels_, min_images)
    if (~keep).any():
        left_out = {**left_out, f"in a place of fewer than {min_images} images": int((~keep).sum())}
    if not keep.any():
        raise UsageError(f"{source}: no place has {min_images} images; lower `images_per_place` or make larger places")
    return PlaceSet([p for p, k in zip(paths, keep) if k], labels_[keep], np.asarray(cities, dtype=np.int64)[keep],
                    source, left_out)


def read_gsv_cities(root: Path, min_images: int) -> PlaceSet:
    """A GSV-Cities root: every `Dataframes/*.csv` (cities in name order) and its images."""
    frames = sorted((Path(root) / "Dataframes").glob("*.csv"))
    if not frames:
        raise UsageError(f"{root}: no Dataframes/*.csv; a GSV-Cities root holds Dataframes/<City>.csv and Images/<City>/")
    paths, labels, cities = [], [], []
    for city, frame in enumerate(frames):
        header, rows = _rows(frame)
        missing = [c for c in NEEDED if c not in header]
        if missing:
            raise LabelError(f"{frame}: no {', '.join(missing)} column; GSV-Cities dataframes have {', '.join(NEEDED)}")
        for line, row in enumerate(rows, start=2):
            try:
                place = int(row["place_id"]) + city * CITY_OFFSET
                image = Path(root) / "Images" / row["city_id"] / gsv_image_name(row, place)
            except (TypeError, ValueError):
                raise LabelError(f"{frame}:{line}: place_id, year, month, northdeg, lat and lon must be numbers") from None
            if not image.is_file():
                raise LabelError(f"{frame}:{line}: image {image} not found; restore it or delete the row")
            paths.append(image)
            labels.append(place)
            cities.append(city)
    return _place_set(paths, labels, cities, Path(root), min_images, {})


def read_places_csv(path: Path, min_images: int) -> PlaceSet:
    """A places CSV of `vpr places`: `place_id` and `image` (relative to the CSV's folder, or absolute)."""
    header, rows = _rows(path)
    if "place_id" not in header or "image" not in header:
        raise LabelError(f"{path}: no place_id and image columns; write it with vpr places")
    paths, labels = [], []
    for line, row in enumerate(rows, start=2):
        try:
            labels.append(int(row["place_id"]))
        except (TypeError, ValueError):
            raise LabelError(f"{path}:{line}: place_id {row['place_id']!r} is not a whole number") from None
        image = Path(path).parent / row["image"]
        if not row["image"] or not image.is_file():
            raise LabelError(f"{path}:{line}: image {image} not found; restore it or write the CSV again with vpr places")
        paths.append(image)
    return _place_set(paths, labels, [0] * len(paths), Path(path), min_images, {})


def places_from_layout(root: Path, split: str, min_images: int) -> PlaceSet:
    """Places made from the located images of a standard-layout split (`vpr places`' radius and spacing)."""
    from vpr.training.places import PlaceParams, make_places

    images = load_split_images(Path(root), split)
    found = make_places(images, PlaceParams(min_images=min_images))
    keep = np.flatnonzero(found.place >= 0)
    return _place_set([images.paths[i] for i in keep], found.place[keep].tolist(), [0] * len(keep), Path(root),
                      min_images, dict(found.left_out))


def load_places(dataset: Path, min_images: int, split: str = "train") -> PlaceSet:
    """The training places of `dataset`: a GSV-Cities root, a places CSV or a standard-layout root."""
    dataset = Path(dataset)
    if dataset.suffix.lower() == ".csv":
        if not dataset.is_file():
            raise UsageError(f"`dataset` {dataset}: places CSV not found; write it with vpr places")
        return read_places_csv(dataset, min_images)
    if (dataset / "Dataframes").is_dir():
        return read_gsv_cities(dataset, min_images)
    return places_from_layout(dataset, split, min_images)


def epoch_batches(places: PlaceSet, per_batch: int, per_place: int, generator: torch.Generator) -> list[np.ndarray]:
    """One epoch: every place once, in batches of `per_batch` places x `per_place` images (image indices,
    place by place), places shuffled within their city, images drawn without replacement."""
    members = places.members()
    order = places.places
    city_of = {int(p): int(places.cities[members[int(p)][0]]) for p in order}
    shuffled = []
    for city in sorted(set(city_of.values())):
        own = [p for p in order if city_of[int(p)] == city]
        shuffled += [own[i] for i in torch.randperm(len(own), generator=generator).tolist()]
    batches = []
    for start in range(0, len(shuffled), per_batch):
        picks = []
        for place in shuffled[start:start + per_batch]:
            images = members[int(place)]
            picks.append(images[torch.randperm(len(images), generator=generator)[:per_place].numpy()])
        batches.append(np.concatenate(picks))
    return batches
