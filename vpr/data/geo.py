"""Coordinates: UTM conversion and the community's `@`-separated image-name format.

Names follow gmberton's VPR-datasets-downloader (used by CosPlace, EigenPlaces, the VPR benchmark):
`@utm_east@utm_north@zone@letter@lat@lon@pano_id@tile@heading@pitch@roll@height@timestamp@note@.jpg`.
Only east and north are required; heading is field 9.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import utm

from vpr.errors import LabelError

AT_FIELDS = (
    "utm_east", "utm_north", "zone", "letter", "lat", "lon", "pano_id", "tile",
    "heading", "pitch", "roll", "height", "timestamp", "note",
)


@dataclass(frozen=True)
class GeoName:
    """The fields of an `@` file name that matter for place recognition."""

    east: float
    north: float
    zone_number: int | None = None
    zone_letter: str | None = None
    lat: float | None = None
    lon: float | None = None
    heading: float | None = None


def _float_or_none(text: str) -> float | None:
    if text.strip() == "":
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_at_name(name: str | Path) -> GeoName:
    """Parse an `@` file name; raise `LabelError` when it carries no finite east/north."""
    stem = Path(name).name
    parts = stem.split("@")
    if len(parts) < 4 or parts[0] != "":
        raise LabelError(
            f"{stem}: file name has no coordinates; expected '@utm_east@utm_north@...@.jpg' "
            "or pass a CSV manifest with path,lat,lon"
        )
    fields = parts[1:]
    east, north = _float_or_none(fields[0]), _float_or_none(fields[1])
    if east is None or north is None:
        raise LabelError(
            f"{stem}: utm_east/utm_north are not numbers; rename it to the '@utm_east@utm_north@...' "
            "format or pass a CSV manifest"
        )

    def field(i: int) -> str:
        return fields[i] if i < len(fields) else ""

    zone = _float_or_none(field(2))
    zone_number = int(zone) if zone is not None and zone.is_integer() and 1 <= zone <= 60 else None
    letter = field(3).strip().upper()
    zone_letter = letter if len(letter) == 1 and letter.isalpha() else None
    heading = _float_or_none(field(8))
    if heading is not None:
        heading %= 360.0
    return GeoName(
        east=east, north=north, zone_number=zone_number, zone_letter=zone_letter,
        lat=_float_or_none(field(4)), lon=_float_or_none(field(5)), heading=heading,
    )


def format_at_name(
    east: float, north: float, zone_number: int, zone_letter: str, *,
    heading: float = 0.0, pano_id: str = "", timestamp: str = "", note: str = "", ext: str = ".jpg",
) -> str:
    """Build an `@` file name from a UTM pose (lat/lon filled in from the zone)."""
    lat, lon = utm_to_latlon(east, north, zone_number, zone_letter)
    values = [
        f"{east:.2f}", f"{north:.2f}", str(zone_number), zone_letter, f"{lat:.6f}", f"{lon:.6f}",
        pano_id, "", f"{heading:.1f}", "0", "0", "", timestamp, note,
    ]
    return "@" + "@".join(values) + "@" + ext


def latlon_to_utm(lat: float, lon: float) -> tuple[float, float, int, str]:
    """Convert WGS84 latitude/longitude to (east, north, zone number, zone letter)."""
    if not (math.isfinite(lat) and math.isfinite(lon)) or not (-80.0 <= lat <= 84.0) or not (-180.0 <= lon <= 180.0):
        raise LabelError(f"latitude/longitude ({lat}, {lon}) out of range: UTM covers lat -80..84, lon -180..180")
    east, north, number, letter = utm.from_latlon(lat, lon)
    return float(east), float(north), int(number), str(letter)


def utm_to_latlon(east: float, north: float, zone_number: int, zone_letter: str) -> tuple[float, float]:
    """Convert a UTM position back to WGS84 latitude/longitude."""
    lat, lon = utm.to_latlon(east, north, zone_number, zone_letter, strict=False)
    return float(lat), float(lon)
