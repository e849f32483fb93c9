"""Where a photo was taken, from its EXIF: GPS latitude/longitude, the camera's direction and the capture time.

Phones, drones and dash cameras write these tags; Pillow reads them from JPEG, TIFF, WebP and PNG files, and
exifread (the `media` extra) where Pillow cannot parse a file's EXIF block. The heading is `GPSImgDirection`
(true or magnetic north, as the camera wrote it); the time is the GPS date and time (UTC) when present, else
`DateTimeOriginal` (with `OffsetTimeOriginal` when written, else taken as UTC), in seconds since 1970.
"""

from __future__ import annotations

import logging

import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from PIL import Image, UnidentifiedImageError

GPS_IFD, EXIF_IFD = 0x8825, 0x8769
LAT_REF, LAT, LON_REF, LON, TIME_STAMP, DIRECTION, DATE_STAMP = 1, 2, 3, 4, 7, 17, 29
DATETIME_ORIGINAL, OFFSET_TIME_ORIGINAL = 36867, 36881


@dataclass(frozen=True)
class ExifPlace:
    """A photo's EXIF position (degrees), heading (degrees, None when absent) and capture time (None when absent)."""

    lat: float
    lon: float
    heading: float | None = None
    time: float | None = None


def read_exif_place(path: Path) -> ExifPlace | None:
    """The GPS position EXIF gives `path`, or None when it has none (or unreadable EXIF: the image itself is
    checked when it is decoded, with the usual error)."""
    try:
        with Image.open(path) as img:
            exif = img.getexif()
            if not exif and img.format == "PNG":  # a PNG's eXIf chunk may follow the pixels
                img.load()
                exif = img.getexif()
            gps, extra = dict(exif.get_ifd(GPS_IFD)), dict(exif.get_ifd(EXIF_IFD))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, KeyError, TypeError):
        gps, extra = _exifread_tags(path)
    return _place(gps, extra)


def _place(gps: dict, extra: dict) -> ExifPlace | None:
    """An `ExifPlace` from the GPS and Exif IFDs (tag number -> value), None without a valid position."""
    lat, lon = _degrees(gps.get(LAT), gps.get(LAT_REF), "S"), _degrees(gps.get(LON), gps.get(LON_REF), "W")
    if lat is None or lon is None or not (-90 <= lat <= 90 and -180 <= lon <= 180) or (lat == 0 and lon == 0):
        return None  # (0, 0) is what cameras without a fix write
    heading = _number(gps.get(DIRECTION))
    return ExifPlace(lat, lon, None if heading is None else heading % 360.0, _gps_time(gps) or _original_time(extra))


def _number(value: object) -> float | None:
    """A finite float from an EXIF rational, number or (numerator, denominator) pair, else None."""
    try:
        number = float(value[0]) / float(value[1]) if isinstance(value, tuple) and len(value) == 2 else float(value)
    except (TypeError, ValueError, ZeroDivisionError, IndexError):
        return None
    return number if math.isfinite(number) else None


def _degrees(value: object, ref: object, negative: str) -> float | None:
    """Degrees from EXIF's (degrees, minutes, seconds) and its N/S or E/W reference."""
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        return None
    parts = [_number(part) for part in value]
    if any(part is None for part in parts):
        return None
    degrees = parts[0] + parts[1] / 60.0 + parts[2] / 3600.0
    ref = ref.decode(errors="replace") if isinstance(ref, bytes) else str(ref or "")
    return -degrees if ref.strip().upper().startswith(negative) else degrees


def _gps_time(gps: dict) -> float | None:
    """GPSDateStamp + GPSTimeStamp (UTC) as seconds since 1970."""
    date, clock = gps.get(DATE_STAMP), gps.get(TIME_STAMP)
    if not isinstance(clock, (tuple, list)) or len(clock) != 3 or not date:
        return None
    try:
        day = datetime.strptime(str(date).strip().rstrip("\x00"), "%Y:%m:%d").replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    parts = [_number(part) for part in clock]
    if any(part is None for part in parts):
        return None
    return (day + timedelta(hours=parts[0], minutes=parts[1], seconds=parts[2])).timestamp()


def _original_time(extra: dict) -> float | None:
    """DateTimeOriginal (with OffsetTimeOriginal when written, else UTC) as seconds since 1970."""
    text = str(extra.get(DATETIME_ORIGINAL) or "").strip().rstrip("\x00")
    offset = str(extra.get(OFFSET_TIME_ORIGINAL) or "").strip().rstrip("\x00")
    try:
        when = datetime.strptime(text, "%Y:%m:%d %H:%M:%S")
        zone = datetime.strptime(offset, "%z").tzinfo if offset else timezone.utc
    except ValueError:
        return None
    return when.replace(tzinfo=zone).timestamp()


EXIFREAD_GPS = {"GPSLatitudeRef": LAT_REF, "GPSLatitude": LAT, "GPSLongitudeRef": LON_REF, "GPSLongitude": LON,
                "GPSTimeStamp": TIME_STAMP, "GPSImgDirection": DIRECTION, "GPSDate": DATE_STAMP}


def _exifread_tags(path: Path) -> tuple[dict, dict]:
    """The GPS and Exif tags exifread finds in a file Pillow cannot parse ({} where exifread is not installed)."""
    try:
        import exifread
    except ImportError:
        return {}, {}
    logging.getLogger("exifread").setLevel(logging.ERROR)  # "File format not recognized" on every non-JPEG
    try:
        with open(path, "rb") as handle:
            tags = exifread.process_file(handle, details=False)
    except Exception:  # exifread raises many kinds on broken files: no EXIF position then
        return {}, {}

    def value(tag) -> object:
        values = getattr(tag, "values", tag)
        if isinstance(values, list):
            values = [(v.num, v.den) if hasattr(v, "num") else v for v in values]
            return tuple(values) if len(values) != 1 else values[0]
        return values

    gps = {number: value(tags[f"GPS {name}"]) for name, number in EXIFREAD_GPS.items() if f"GPS {name}" in tags}
    extra = {number: value(tags[f"EXIF {name}"]) for name, number in
             (("DateTimeOriginal", DATETIME_ORIGINAL), ("OffsetTimeOriginal", OFFSET_TIME_ORIGINAL)) if f"EXIF {name}" in tags}
    return gps, extra
