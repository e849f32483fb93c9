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
UTM_LETTERS = "CDEFGHJKLMNPQRSTUVWX"  # latitude bands; I and O are skipped


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
    """Parse an `@` file name; raise `LabelError` (naming `name`) when it carries no finite east/north.

    A zone number needs a valid zone letter (one of `UTM_LETTERS`); a name may also have neither.
    """
    stem = Path(name).name
    parts = stem.split("@")
    if len(parts) < 4 or parts[0] != "":
        raise LabelError(
            f"{name}: file name has no coordinates; expected '@utm_east@utm_north@...@.jpg' "
            "or pass a CSV manifest with path,lat,lon"
        )
    fields = parts[1:-1]  # the last part holds the extension
    east, north = _float_or_none(fields[0]), _float_or_none(fields[1])
    if east is None or north is None:
        raise LabelError(
            f"{name}: utm_east/utm_north are not numbers; rename it to the '@utm_east@utm_north@...' "
            "format or pass a CSV manifest"
        )

    def field(i: int) -> str:
        return fields[i] if i < len(fields) else ""

    zone_number, zone_letter = _zone_fields(field(2).strip(), field(3).strip().upper(), str(name))
    heading = _float_or_none(field(8))
    if heading is not None:
        heading %= 360.0
    return GeoName(
        east=east, north=north, zone_number=zone_number, zone_letter=zone_letter,
        lat=_float_or_none(field(4)), lon=_float_or_none(field(5)), heading=heading,
    )


def _zone_fields(number_text: str, letter: str, where: str) -> tuple[int | None, str | None]:
    """The zone of an `@` name: (None, None) when the zone field is empty, else a valid (number, letter)."""
    if number_text == "":
        return None, None
    number = parse_zone_number(number_text, where)
    if letter == "":
        raise LabelError(
            f"{where}: UTM zone {number} has no zone letter; put it in the field after the zone "
            f"(e.g. @{number}@S@), one of {UTM_LETTERS}"
        )
    return number, check_zone_letter(letter, where)


def parse_zone_number(text: str, where: str) -> int:
    """A UTM zone number 1..60 from `text`, or a `LabelError` at `where`."""
    value = _float_or_none(text)
    if value is None or not value.is_integer() or not 1 <= value <= 60:
        raise LabelError(f"{where}: UTM zone {text!r} is not a zone number 1..60; fix it")
    return int(value)


def is_zone(number: object, letter: object) -> bool:
    """Whether (number, letter) is a UTM zone: an integer 1..60 and a latitude band letter."""
    return (isinstance(number, int) and not isinstance(number, bool) and 1 <= number <= 60
            and isinstance(letter, str) and len(letter) == 1 and letter.upper() in UTM_LETTERS)


def check_zone_letter(letter: str, where: str) -> str:
    """`letter` if it is a UTM latitude band (C..X without I and O), else a `LabelError` at `where`."""
    if len(letter) != 1 or letter not in UTM_LETTERS:
        raise LabelError(f"{where}: UTM zone letter {letter!r} is not valid; use one of {UTM_LETTERS} (C..X without I and O)")
    return letter


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
