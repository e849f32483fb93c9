"""GPS tracks that locate a video's frames: a GPX file (`trkpt`/`rtept` with `time`) or a CSV of timestamped
fixes (`time,lat,lon`: ISO 8601 or UNIX seconds; or `seconds,lat,lon`: seconds from the video's start).

Positions are interpolated linearly in UTM between the two fixes around a frame's time; the heading is the
direction of travel there (a forward-facing camera), unknown where the track stands still. A frame before the
first fix or after the last one has no position.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from vpr.data.datasets import read_csv, row_dict
from vpr.data.geo import latlon_to_utm
from vpr.errors import LabelError

STILL_M = 0.5  # fixes closer than this give no direction of travel


@dataclass(frozen=True)
class Track:
    """Fixes in time order: seconds (UNIX time when `absolute`, else from the video's start), UTM east/north."""

    path: Path
    seconds: np.ndarray
    utm: np.ndarray
    zone: tuple[int, str]
    absolute: bool


def parse_time(text: str) -> float | None:
    """ISO 8601 (a missing offset is UTC) or UNIX seconds, as UNIX seconds; None when it is neither."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def read_track(path: Path) -> Track:
    """The fixes of a GPX or CSV track; a malformed file is a one-line `LabelError` naming it and the line."""
    path = Path(path)
    if not path.is_file():
        raise LabelError(f"{path}: no such GPS track; give a .gpx file or a .csv of time,lat,lon")
    if path.suffix.lower() == ".gpx":
        fixes, absolute = _gpx_fixes(path), True
    elif path.suffix.lower() == ".csv":
        fixes, absolute = _csv_fixes(path)
    else:
        raise LabelError(f"{path}: a GPS track is a .gpx file or a .csv of time,lat,lon")
    if len(fixes) < 2:
        raise LabelError(f"{path}: {len(fixes)} timestamped fix(es); a track needs at least two")
    fixes.sort()
    utm = [latlon_to_utm(lat, lon) for _, lat, lon in fixes]
    zones = {(number, letter) for _, _, number, letter in utm}
    if len({number for number, _ in zones}) > 1:
        raise LabelError(f"{path}: the track spans UTM zones {sorted({n for n, _ in zones})}; split it, one index per zone")
    seconds = np.array([t for t, _, _ in fixes], dtype=np.float64)
    if np.any(np.diff(seconds) <= 0):
        at = int(np.argmax(np.diff(seconds) <= 0))
        raise LabelError(f"{path}: two fixes share the time {seconds[at]}; keep one of them")
    return Track(path, seconds, np.array([u[:2] for u in utm], dtype=np.float64), min(zones), absolute)


def _gpx_fixes(path: Path) -> list[tuple[float, float, float]]:
    """(UNIX seconds, lat, lon) of a GPX file's track and route points that carry a time."""
    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError) as exc:
        raise LabelError(f"{path}: not a readable GPX file ({str(exc)[:80]})") from None
    fixes = []
    for point in root.iter():
        if point.tag.rsplit("}", 1)[-1] not in ("trkpt", "rtept"):
            continue
        stamp = next((child.text for child in point if child.tag.rsplit("}", 1)[-1] == "time"), None)
        when = parse_time(stamp or "")
        try:
            lat, lon = float(point.get("lat", "nan")), float(point.get("lon", "nan"))
        except ValueError:
            continue
        if when is not None and math.isfinite(lat) and math.isfinite(lon):
            fixes.append((when, lat, lon))
    return fixes


def _csv_fixes(path: Path) -> tuple[list[tuple[float, float, float]], bool]:
    """(seconds, lat, lon) rows of a CSV track and whether its times are absolute (`time`) or relative (`seconds`)."""
    header, rows = read_csv(path)
    clock = "time" if "time" in header else "seconds" if "seconds" in header else None
    if clock is None or not {"lat", "lon"} <= set(header):
        raise LabelError(f"{path}: a CSV track needs columns time,lat,lon (or seconds,lat,lon); found {header}")
    fixes = []
    for line, cells in rows:
        row = row_dict(header, cells)
        when = parse_time(row.get(clock, "")) if clock == "time" else _float(row.get(clock, ""))
        lat, lon = _float(row.get("lat", "")), _float(row.get("lon", ""))
        if when is None or lat is None or lon is None:
            raise LabelError(f"{path}:{line}: {clock}, lat and lon must be numbers (ISO 8601 allowed for time); fix the row")
        fixes.append((when, lat, lon))
    return fixes, clock == "time"


def _float(text: str) -> float | None:
    """A finite number, else None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def locate(track: Track, seconds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """UTM positions (N x 2, NaN outside the track's time span) and headings (N, NaN where unknown) at `seconds`
    on the track's clock."""
    seconds = np.asarray(seconds, dtype=np.float64)
    inside = (seconds >= track.seconds[0]) & (seconds <= track.seconds[-1])
    utm = np.full((len(seconds), 2), np.nan)
    for axis in range(2):
        utm[inside, axis] = np.interp(seconds[inside], track.seconds, track.utm[:, axis])
    step = np.clip(np.searchsorted(track.seconds, seconds, side="right"), 1, len(track.seconds) - 1)
    motion = track.utm[step] - track.utm[step - 1]
    moving = inside & (np.hypot(motion[:, 0], motion[:, 1]) >= STILL_M)
    heading = np.full(len(seconds), np.nan)
    heading[moving] = np.degrees(np.arctan2(motion[moving, 0], motion[moving, 1])) % 360.0  # compass: 0 = north
    return utm, heading
