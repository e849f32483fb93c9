"""CosPlace classes and groups (Berton et al., CVPR 2022, Sec. 3).

The map is cut into classes by UTM cell and heading sector, and classes into groups so that no two
classes of a group are neighbours:

    class(image) = (floor(east / M), floor(north / M), floor(heading / alpha))        (cell indices)
    group(class) = (class_east mod N, class_north mod N, class_heading mod L)

i.e. the paper's (east_c mod M*N) / M on the class origin east_c = floor(east / M) * M. Two images of
different classes in one group are then at least M * (N - 1) metres apart in east or north, or
alpha * (L - 1) degrees apart in heading. Classes with fewer than `min_images_per_class` images are
dropped first. Groups are ordered by decreasing number of classes, so the trainer's first
`groups_num` groups are the largest. The result is cached in HDF5, keyed by labels and parameters.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
from PIL import Image, ImageDraw

from vpr.data.datasets import GeoImageSet
from vpr.errors import LabelError
from vpr.fileio import atomic_file, check_replaceable_file, check_separate, h5_file, save_png
from vpr.training.config import GroupParams

log = logging.getLogger(__name__)
CACHE_FORMAT = "vpr-cosplace-groups-1"


@dataclass
class ClassGroups:
    """Which class each image belongs to (-1: dropped) and which group each class belongs to."""

    params: GroupParams
    image_class: np.ndarray  # (n,) int64
    class_cells: np.ndarray  # (C, 3) int64: east cell, north cell, heading sector
    class_group: np.ndarray  # (C,) int64 index into group_ids
    group_ids: np.ndarray  # (G, 3) int64: east, north, heading residues, largest group first
    uses_heading: bool

    @property
    def num_classes(self) -> int:
        return int(len(self.class_cells))

    @property
    def num_groups(self) -> int:
        return int(len(self.group_ids))

    @property
    def dropped_images(self) -> int:
        """Images of classes smaller than `min_images_per_class`."""
        return int(np.sum(self.image_class < 0))

    def classes_of_group(self, group: int) -> np.ndarray:
        """Class indices of `group`, ascending."""
        return np.flatnonzero(self.class_group == group)

    def images_per_class(self) -> list[np.ndarray]:
        """For each class, the indices of its images."""
        kept = np.flatnonzero(self.image_class >= 0)
        order = kept[np.argsort(self.image_class[kept], kind="stable")]
        bounds = np.searchsorted(self.image_class[order], np.arange(self.num_classes + 1))
        return [order[bounds[c]:bounds[c + 1]] for c in range(self.num_classes)]

    def summary(self) -> dict:
        """Counts per group and the dropped images, for printing."""
        return {
            "params": asdict(self.params), "uses_heading": self.uses_heading, "images": int(len(self.image_class)),
            "dropped_images": self.dropped_images, "classes": self.num_classes, "groups": self.num_groups,
            "classes_per_group": [int(np.sum(self.class_group == g)) for g in range(self.num_groups)],
            "images_per_group": [
                int(np.sum(np.isin(self.image_class, self.classes_of_group(g)))) for g in range(self.num_groups)
            ],
            "group_ids": self.group_ids.tolist(),
        }


def heading_or_none(images: GeoImageSet, params: GroupParams) -> np.ndarray | None:
    """The headings used for classes, or None when they are missing and L = 1 (position-only classes)."""
    heading = images.heading
    missing = len(images) if heading is None else int(np.sum(~np.isfinite(heading)))
    if missing == 0:
        return heading
    if params.L > 1:
        raise LabelError(
            f"{images.source}: {missing} of {len(images)} images have no heading (field 9 of the '@' name or the "
            "CSV 'heading' column); CosPlace groups by heading when --L > 1: add headings or pass --L 1"
        )
    return None


def class_cells(utm: np.ndarray, heading: np.ndarray | None, params: GroupParams) -> np.ndarray:
    """(n, 3) cell indices (floor(east/M), floor(north/M), floor(heading/alpha)); heading sector 0 without headings."""
    cells = np.zeros((len(utm), 3), dtype=np.int64)
    cells[:, :2] = np.floor(np.asarray(utm, dtype=np.float64) / params.M).astype(np.int64)
    if heading is not None:
        sectors = round(360.0 / params.alpha)
        cells[:, 2] = np.floor(np.mod(heading, 360.0) / params.alpha).astype(np.int64) % sectors
    return cells


def group_of_cells(cells: np.ndarray, params: GroupParams) -> np.ndarray:
    """(n, 3) group coordinates (east mod N, north mod N, heading mod L) of class cells."""
    return np.mod(cells, np.array([params.N, params.N, params.L], dtype=np.int64))


def compute_groups(images: GeoImageSet, params: GroupParams) -> ClassGroups:
    """Assign classes and groups to a labelled image set (no cache)."""
    utm = images.require_labels("CosPlace training")
    heading = heading_or_none(images, params)
    cells = class_cells(utm, heading, params)
    unique, inverse, counts = np.unique(cells, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    keep = counts >= params.min_images_per_class
    remap = np.full(len(unique), -1, dtype=np.int64)
    remap[keep] = np.arange(int(keep.sum()))
    kept_cells = unique[keep]
    groups, class_group, group_sizes = np.unique(
        group_of_cells(kept_cells, params), axis=0, return_inverse=True, return_counts=True,
    )
    order = np.lexsort((*groups.T[::-1], -group_sizes))  # largest first, ties by group id
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return ClassGroups(
        params=params, image_class=remap[inverse], class_cells=kept_cells.reshape(-1, 3),
        class_group=rank[class_group.reshape(-1)].astype(np.int64), group_ids=groups[order].reshape(-1, 3),
        uses_heading=heading is not None,
    )


def cache_key(images: GeoImageSet, params: GroupParams) -> str:
    """SHA-256 of the parameters and every image's coordinates and heading: what the grouping depends on."""
    digest = hashlib.sha256(json.dumps([CACHE_FORMAT, asdict(params)], sort_keys=True).encode())
    utm = images.require_labels("CosPlace training")
    digest.update(np.ascontiguousarray(utm, dtype=np.float64).tobytes())
    if images.heading is not None:
        digest.update(np.ascontiguousarray(images.heading, dtype=np.float64).tobytes())
    return digest.hexdigest()


def save_groups(groups: ClassGroups, path: Path, key: str) -> None:
    """Write the grouping atomically to an HDF5 file tagged with `key`."""
    with atomic_file(Path(path)) as tmp:
        with h5_file(tmp) as f:
            f.attrs["format"] = CACHE_FORMAT
            f.attrs["key"] = key
            f.attrs["params"] = json.dumps(asdict(groups.params))
            f.attrs["uses_heading"] = groups.uses_heading
            for name in ("image_class", "class_cells", "class_group", "group_ids"):
                f.create_dataset(name, data=getattr(groups, name))


def load_groups(path: Path, key: str, params: GroupParams) -> ClassGroups | None:
    """The cached grouping in `path` if it was built for `key`, else None (missing, stale or unreadable)."""
    if not Path(path).is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != CACHE_FORMAT or f.attrs.get("key") != key:
                log.info("class-group cache %s is for another dataset or parameters; rebuilding it", path)
                return None
            data = {name: np.asarray(f[name][...], dtype=np.int64) for name in ("image_class", "class_cells", "class_group", "group_ids")}
            uses_heading = bool(f.attrs["uses_heading"])
    except (OSError, KeyError) as exc:
        log.warning("class-group cache %s is unreadable (%s); rebuilding it", path, exc)
        return None
    return ClassGroups(params=params, uses_heading=uses_heading, **data)


def is_groups_file(path: Path) -> bool:
    """Whether `path` is an HDF5 class-group cache written by vpr."""
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == CACHE_FORMAT
    except (OSError, ValueError):
        return False


def build_groups(images: GeoImageSet, params: GroupParams, cache: Path | None = None) -> ClassGroups:
    """Classes and groups of `images`, read from `cache` when it matches, else computed (and cached).

    An existing `cache` file that is not a vpr group cache is refused, never overwritten.
    """
    key = cache_key(images, params) if cache is not None else ""
    if cache is not None:
        check_separate(cache, images.input_folders(), "`cache`")  # a file among the images would join the next build
        check_replaceable_file(cache, is_groups_file, "class-group cache", "`cache`")
        cached = load_groups(cache, key, params)
        if cached is not None:
            return cached
    groups = compute_groups(images, params)
    if cache is not None:
        save_groups(groups, cache, key)
    return groups


def group_colour(group: int) -> tuple[int, int, int]:
    """A distinct colour per group (golden-ratio hue steps)."""
    hue = (group * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 0.95 - 0.25 * ((group // 8) % 2))
    return int(r * 255), int(g * 255), int(b * 255)


def save_group_map(groups: ClassGroups, images: GeoImageSet, out_png: Path, size: int = 1024) -> Path:
    """Draw every class at its UTM cell (a wedge per heading sector) coloured by group; dropped images in grey."""
    check_separate(out_png, images.input_folders(), "`map_png`")  # a PNG among the images would be indexed next time
    utm = images.require_labels("the group map")
    params, margin, legend_rows = groups.params, 12, min(groups.num_groups, 24)
    low = np.floor(utm.min(axis=0) / params.M) * params.M  # plot whole cells
    high = (np.floor(utm.max(axis=0) / params.M) + 1) * params.M
    scale = (size - 2 * margin) / float(np.max(high - low))
    width, height = (np.ceil((high - low) * scale).astype(int) + 2 * margin).tolist()
    canvas = Image.new("RGB", (max(width, 320), height + 14 * (legend_rows + 1) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    def to_px(east: np.ndarray, north: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return margin + (east - low[0]) * scale, margin + (high[1] - north) * scale

    xs, ys = to_px(utm[groups.image_class < 0, 0], utm[groups.image_class < 0, 1])
    for x, y in zip(xs, ys):
        draw.point((float(x), float(y)), fill=(170, 170, 170))
    cx, cy = to_px((groups.class_cells[:, 0] + 0.5) * params.M, (groups.class_cells[:, 1] + 0.5) * params.M)
    radius = max(2.0, 0.5 * params.M * scale)
    for c in range(groups.num_classes):
        colour = group_colour(int(groups.class_group[c]))
        box = (float(cx[c] - radius), float(cy[c] - radius), float(cx[c] + radius), float(cy[c] + radius))
        if groups.uses_heading:
            start = float(groups.class_cells[c, 2] * params.alpha - 90.0)  # compass heading, north up
            draw.pieslice(box, start, start + params.alpha, fill=colour)
        else:
            draw.rectangle(box, fill=colour)
    y = height + 4
    shown = "" if legend_rows == groups.num_groups else f" (legend: the {legend_rows} largest)"
    header = f"{groups.num_classes} classes in {groups.num_groups} groups{shown}; grey: {groups.dropped_images} dropped images"
    draw.text((margin, y), header, fill=(0, 0, 0))
    for g in range(legend_rows):
        y += 14
        draw.rectangle((margin, y + 2, margin + 10, y + 12), fill=group_colour(g))
        draw.text((margin + 16, y), f"group {g} {tuple(groups.group_ids[g].tolist())}: {len(groups.classes_of_group(g))} classes", fill=(0, 0, 0))
    save_png(canvas, Path(out_png), "`map_png`")
    return Path(out_png)
