"""Geo-tagged image sets from `@`-named folders and CSV manifests.

Everything becomes one `GeoImageSet`: image paths with UTM east/north (metres), heading (degrees,
NaN when unknown) and the UTM zone; an unlabelled folder has no coordinates.

Dataset layout (one resolver, `split_folder`, for every command): a split SPLIT (train, val, test)
of a dataset ROOT is the folder `ROOT/images/SPLIT/` (VPR-datasets-downloader) or, when that is
missing, `ROOT/SPLIT/` (CosPlace's processed layout). `load_split` reads its `database/` and
`queries/` subfolders; `load_split_images` reads every image under it (CosPlace trains on the whole
train split, which may also be one flat folder of images).
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vpr.data.frames import holder
from vpr.data.geo import UTM_LETTERS, check_zone_letter, latlon_to_utm, parse_at_name, parse_zone_number
from vpr.data.images import IMAGE_EXTENSIONS
from vpr.errors import ImageError, LabelError, UsageError

SPLITS = ("train", "val", "test")


@dataclass
class GeoImageSet:
    """Images and, when known, where they were taken (UTM metres) and which way they face."""

    paths: list[Path]
    utm: np.ndarray | None = None  # N x 2 float64 (east, north)
    heading: np.ndarray | None = None  # N float64 degrees in [0, 360), NaN where unknown
    zone: tuple[int, str] | None = None
    source: Path | None = None
    time: np.ndarray | None = None  # N float64: a manifest's timestamp or frame column, the order of a sequence
    left_out: list[tuple[Path, str]] = field(default_factory=list)  # images of the source left out, and why

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
                "use '@utm_east@utm_north@...' file names, a CSV manifest (path,lat,lon), or a ground-truth file (`gt`)"
            )
        return self.utm

    def subset(self, indices: np.ndarray | list[int]) -> "GeoImageSet":
        """The images at `indices`, with their labels."""
        idx = np.asarray(indices, dtype=np.int64)
        return GeoImageSet(
            paths=[self.paths[i] for i in idx],
            utm=None if self.utm is None else self.utm[idx],
            heading=None if self.heading is None else self.heading[idx],
            zone=self.zone, source=self.source, time=None if self.time is None else self.time[idx], left_out=self.left_out,
        )

    def input_folders(self) -> list[Path]:
        """What an output must stay clear of: the set's folder, manifest or video and every folder holding its images."""
        parents = sorted({holder(path) for path in self.paths})
        return ([Path(self.source)] if self.source is not None else []) + parents

    def frame_order(self) -> np.ndarray:
        """Indices in capture order, for sequence matching: by the manifest's timestamp or frame column
        when it has one, else by file name with numbers compared as numbers (frame-9 before frame-10)."""
        if self.time is not None:
            return np.argsort(self.time, kind="stable")
        keys = [_natural_key(str(path)) for path in self.paths]
        return np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)


def _natural_key(text: str) -> list:
    """Sort key that compares runs of digits by value: 'img-9' < 'img-10'."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part]


def list_images(folder: Path) -> list[Path]:
    """All image files under `folder`, recursively, in a stable (sorted) order.

    Symbolic links are followed: a linked folder is listed once (a folder reached again, through another
    link or a loop back to an ancestor, is not walked twice), and a link with an image name is listed
    whatever it points to, so a dangling or looping link is reported by name when it is read (or listed
    in `skipped.txt` with `--skip-bad`), never left out without a word. Raises `ImageError` for a file
    name that is not valid UTF-8 (it could not be stored in an index).
    """
    paths: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        try:
            info = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        if (info.st_dev, info.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        paths.extend(Path(root) / name for name in files if Path(name).suffix.lower() in IMAGE_EXTENSIONS)
    paths.sort()
    for path in paths:
        _check_utf8_name(path)
    return paths


def _check_utf8_name(path: Path, where: str = "") -> None:
    """Refuse a path whose name holds bytes that are not UTF-8 (Linux file names are arbitrary bytes)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        raise ImageError(f"{where}{shown}: file name is not valid UTF-8; rename it (e.g. with convmv)") from None


def load_image_set(source: Path, *, skip_unlocated: bool = False, video=None) -> GeoImageSet:
    """Load a folder of images (labelled by `@` names or their EXIF GPS), a CSV manifest, or a video's frames
    (`video`: a `vpr.data.video.VideoOptions`, the frame rate and the GPS track). `skip_unlocated` leaves out the
    images of a labelled folder that have no position (listed in `left_out`) instead of refusing the folder."""
    source = Path(source)
    if source.is_dir():
        return load_folder(source, skip_unlocated=skip_unlocated)
    if source.is_file() and source.suffix.lower() == ".csv":
        return load_manifest(source)
    from vpr.data.video import VIDEO_EXTENSIONS, load_video

    if source.suffix.lower() in VIDEO_EXTENSIONS and source.is_file():
        return load_video(source, video)
    if not source.exists():
        raise UsageError(f"{source}: no such folder, CSV file or video; give a folder of images, a .csv manifest or a video")
    raise UsageError(f"{source}: expected a folder of images, a .csv manifest (path,lat,lon[,heading]) or a video "
                     f"({', '.join(VIDEO_EXTENSIONS)})")


def load_folder(folder: Path, skip_unlocated: bool = False) -> GeoImageSet:
    """Images under `folder`, located by their `@` names or else by their EXIF GPS. When some are located, all
    must be: the first that is not is a `LabelError`, unless `skip_unlocated` leaves them out (in `left_out`)."""
    paths = list_images(folder)
    if not paths:
        raise UsageError(f"{folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    if not any(p.name.startswith("@") for p in paths):
        return _exif_folder(folder, paths, skip_unlocated)
    names, unlocated = [], []
    for path in paths:
        try:
            names.append((path, parse_at_name(path)))
        except LabelError as exc:
            if not skip_unlocated:
                raise LabelError(f"{exc}; or pass `skip_unlocated` to index only the @-named images") from None
            unlocated.append((path, "no coordinates in its name"))
    located = [n for _, n in names]
    utm_xy = np.array([[n.east, n.north] for n in located], dtype=np.float64)
    heading = np.array([np.nan if n.heading is None else n.heading for n in located], dtype=np.float64)
    zones = {(n.zone_number, n.zone_letter) for n in located if n.zone_number is not None}
    zone = _one_zone(zones, f"{folder}: images", "them")
    return GeoImageSet(paths=[p for p, _ in names], utm=utm_xy, heading=heading, zone=zone, source=folder,
                       left_out=unlocated)


def _exif_folder(folder: Path, paths: list[Path], skip_unlocated: bool) -> GeoImageSet:
    """A folder of photos without `@` names: labelled by their EXIF GPS when any has one, else unlabelled."""
    from vpr.data.exif import read_exif_place

    places = [read_exif_place(path) for path in paths]
    located = [i for i, place in enumerate(places) if place is not None]
    if not located:
        return GeoImageSet(paths=paths, source=folder)
    missing = [paths[i] for i, place in enumerate(places) if place is None]
    if missing and not skip_unlocated:
        raise LabelError(
            f"{missing[0]}: no GPS position in its EXIF, while {len(located)} of the {len(paths)} photos in {folder} have "
            f"one; geo-tag or remove it, or pass `skip_unlocated` to index the {len(located)} located photos"
        )
    rows = [latlon_to_utm(places[i].lat, places[i].lon) for i in located]
    zone = _one_zone({(number, letter) for _, _, number, letter in rows}, f"{folder}: photos", "them")
    times = [places[i].time for i in located]
    return GeoImageSet(
        paths=[paths[i] for i in located], utm=np.array([r[:2] for r in rows], dtype=np.float64),
        heading=np.array([np.nan if places[i].heading is None else places[i].heading for i in located], dtype=np.float64),
        zone=zone, source=folder, time=None if None in times else np.array(times, dtype=np.float64),
        left_out=[(path, "no GPS position in its EXIF") for path in missing],
    )


def _one_zone(zones: set[tuple[int, str]], what: str, split: str) -> tuple[int, str] | None:
    """The set's zone, or a `LabelError` when `what` spans several zone numbers or both hemispheres."""
    numbers = sorted({number for number, _ in zones})
    if len(numbers) > 1:
        raise LabelError(f"{what} span UTM zones {numbers}; split {split} by zone, one index per zone")
    letters = sorted({letter for _, letter in zones})
    if letters and letters[0] < "N" <= letters[-1]:
        raise LabelError(
            f"{what} span both hemispheres (zone letters {letters[0]} and {letters[-1]}); "
            f"split {split} at the equator, one index per hemisphere"
        )
    return min(zones) if zones else None


def read_csv(csv_path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The stripped header and the non-blank (line number, cells) rows of a UTF-8 CSV file."""
    try:
        data = Path(csv_path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{csv_path}: cannot read it ({exc.strerror}); check the path") from None
    try:
        text = data.decode("utf-8-sig")
        if "\0" in text:  # UTF-16 text of ASCII characters decodes as UTF-8 with NULs in between
            raise UnicodeError
    except UnicodeError:
        raise LabelError(f"{csv_path}: not UTF-8 text (UTF-16 or another encoding?); save it as UTF-8 (CSV UTF-8)") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows: list[tuple[int, list[str]]] = []
    try:
        for cells in reader:
            if not any(c.strip() for c in cells):
                continue
            if header is None:
                header = [c.strip() for c in cells]
            else:
                rows.append((reader.line_num, cells))
    except csv.Error as exc:
        raise LabelError(f"{csv_path}:{reader.line_num}: not valid CSV ({exc}); fix the quoting") from None
    return header or [], rows


def extra_cells(cells: list[str], header: list[str], where: str, hint: str) -> None:
    """Refuse a row with more non-empty cells than the header has columns (a comma inside a value)."""
    if any(c.strip() for c in cells[len(header):]):
        raise LabelError(f"{where}: {len(cells)} fields but the header has {len(header)} columns; {hint}")


def row_dict(columns: list[str], cells: list[str]) -> dict[str, str]:
    """Cells by column name (the first of repeated columns wins; missing cells are absent)."""
    row: dict[str, str] = {}
    for key, value in zip(columns, cells):
        row.setdefault(key, value)
    return row


def _cell_float(row: dict, key: str, where: str) -> float:
    text = (row.get(key) or "").strip()
    try:
        value = float(text)
    except ValueError:
        raise LabelError(f"{where}: column '{key}' is {text!r}, not a number; fix or remove the row") from None
    if not math.isfinite(value):
        raise LabelError(f"{where}: column '{key}' is {text}; fix or remove the row")
    return value


def _cell_zone(row: dict, where: str) -> tuple[int, str] | None:
    """The zone of a UTM manifest row: `10` with a zone_letter/letter column, or `10S`; None if empty."""
    cell = (row.get("zone") or "").strip()
    if not cell:
        return None
    number_text = cell.rstrip(string.ascii_letters)
    letter = cell[len(number_text):].upper() or (row.get("zone_letter") or row.get("letter") or "").strip().upper()
    number = parse_zone_number(number_text.strip() or cell, where)
    if not letter:
        raise LabelError(
            f"{where}: UTM zone {number} has no letter; write it as e.g. {number}S or add a zone_letter column "
            f"(one of {UTM_LETTERS})"
        )
    return number, check_zone_letter(letter, where)


def _manifest_image(csv_path: Path, rel: str, where: str) -> Path:
    """The image a manifest row names (relative to the CSV), checked to exist and have a UTF-8 name."""
    path = Path(rel) if Path(rel).is_absolute() else csv_path.parent / rel
    _check_utf8_name(path, f"{where}: ")
    if not path.is_file():
        problem = "is a directory, not an image file" if path.is_dir() else "not found"
        raise ImageError(
            f"{where}: image {rel!r} {problem} (looked at {os.path.abspath(path)!r}); fix the path or remove the row"
        )
    return path


def _exif_fallback(row: dict, path: Path, columns: tuple[str, str], where: str):
    """The photo's EXIF place when the row leaves both position cells empty (None when the row gives them)."""
    if any((row.get(column) or "").strip() for column in columns):
        return None
    from vpr.data.exif import read_exif_place

    place = read_exif_place(path)
    if place is None:
        raise LabelError(f"{where}: no {columns[0]}/{columns[1]} and no GPS position in the photo's EXIF; fill in the row")
    return place


def load_manifest(csv_path: Path) -> GeoImageSet:
    """Read `path,lat,lon[,heading]` or `path,utm_east,utm_north[,zone][,heading]`; paths relative to the CSV. A row
    whose position cells are empty takes the photo's EXIF GPS (and its heading, when the row gives none).

    The UTM form takes the zone as `10S`, or `10` plus a `zone_letter` (or `letter`) column.
    """
    csv_path = Path(csv_path)
    columns, cell_rows = read_csv(csv_path)
    if "path" not in columns:
        raise LabelError(f"{csv_path}: no 'path' column (found {columns}); header must be path,lat,lon[,heading]")
    has_latlon = {"lat", "lon"} <= set(columns)
    has_utm = {"utm_east", "utm_north"} <= set(columns)
    if not (has_latlon or has_utm):
        raise LabelError(
            f"{csv_path}: needs columns lat,lon or utm_east,utm_north (found {columns})"
        )
    if not cell_rows:
        raise UsageError(f"{csv_path}: the manifest has no rows")
    time_column = next((name for name in ("timestamp", "frame") if name in columns), None)
    paths, coords, headings, zones, times = [], [], [], set(), []
    for line, cells in cell_rows:
        where = f"{csv_path}:{line}"
        extra_cells(cells, columns, where, "quote values that contain commas, and write decimals with '.'")
        row = row_dict(columns, cells)
        rel = (row.get("path") or "").strip()
        if not rel:
            raise LabelError(f"{where}: empty 'path'; fill it in or remove the row")
        paths.append(_manifest_image(csv_path, rel, where))
        exif = _exif_fallback(row, paths[-1], ("utm_east", "utm_north") if has_utm else ("lat", "lon"), where)
        if exif is not None:  # the row leaves the position to the photo's EXIF (the row's values win where given)
            east, north, number, letter = latlon_to_utm(exif.lat, exif.lon)
            coords.append((east, north))
            zone = (number, letter)
            if not (row.get("heading") or "").strip() and exif.heading is not None:
                row["heading"] = str(exif.heading)
        elif has_utm:
            coords.append((_cell_float(row, "utm_east", where), _cell_float(row, "utm_north", where)))
            zone = _cell_zone(row, where)
        else:
            lat, lon = _cell_float(row, "lat", where), _cell_float(row, "lon", where)
            try:
                east, north, number, letter = latlon_to_utm(lat, lon)
            except LabelError as exc:
                raise LabelError(f"{where}: {exc}") from None
            coords.append((east, north))
            zone = (number, letter)
        if zone is not None:
            zones.add(zone)
        heading = float("nan")
        if (row.get("heading") or "").strip():
            heading = _cell_float(row, "heading", where)
            if not 0.0 <= heading <= 360.0:
                raise LabelError(f"{where}: heading {heading} is outside 0..360 degrees; fix the row")
            heading %= 360.0
        headings.append(heading)
        if time_column is not None:
            times.append(_cell_float(row, time_column, where))
    return GeoImageSet(
        paths=paths, utm=np.array(coords, dtype=np.float64), heading=np.array(headings, dtype=np.float64),
        zone=_one_zone(zones, f"{csv_path}: rows", "the manifest"), source=csv_path,
        time=np.array(times, dtype=np.float64) if time_column is not None else None,
    )


def find_split(root: Path, split: str) -> Path | None:
    """The folder of `split` under a dataset root: `ROOT/images/SPLIT` if it exists, else `ROOT/SPLIT`, else None."""
    if not split or split in (".", "..") or "/" in split or os.sep in split:
        raise UsageError(f"split '{split}': give a split folder name such as {', '.join(SPLITS)}")
    for candidate in (Path(root) / "images" / split, Path(root) / split):
        if candidate.is_dir():
            return candidate
    return None


def split_folder(root: Path, split: str) -> Path:
    """`find_split`, or a `UsageError` naming the layouts looked for."""
    folder = find_split(root, split)
    if folder is None:
        raise UsageError(
            f"{root}: no images/{split}/ (or {split}/) folder; expected ROOT/images/{{train,val,test}}/{{database,queries}}"
        )
    return folder


def load_split(root: Path, split: str) -> tuple[GeoImageSet, GeoImageSet]:
    """The (database, queries) of a split: `SPLIT/database/` and `SPLIT/queries/` of `split_folder`, each read recursively."""
    base = split_folder(root, split)
    if not ((base / "database").is_dir() and (base / "queries").is_dir()):
        raise UsageError(f"{base}: needs database/ and queries/ subfolders; check the dataset layout or choose another split")
    return load_folder(base / "database"), load_folder(base / "queries")


def load_split_images(root: Path, split: str) -> GeoImageSet:
    """Every image under `split_folder(root, split)`, recursively: database and queries alike, or a flat folder."""
    return load_folder(split_folder(root, split))
