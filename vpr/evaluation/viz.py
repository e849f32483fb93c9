"""Pictures of a query beside its top matches (green where the match is a true positive), and a map of
estimated against true query positions; per-query pictures of an evaluation are in `vpr.evaluation.pictures`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vpr.data.images import load_rgb
from vpr.errors import ImageError
from vpr.evaluation.localization import error_summary, localization_errors
from vpr.fileio import save_png

log = logging.getLogger(__name__)

TILE_HEIGHT = 180
CAPTION = 16
CORRECT, WRONG, UNKNOWN = (40, 170, 60), (200, 50, 40), (120, 120, 120)
MISSING_FILL, MISSING_WIDTH = (150, 150, 150), round(TILE_HEIGHT * 4 / 3)


@dataclass
class MatchesFigure:
    """The PNG written, and the match images that could not be read (drawn as grey `missing` tiles)."""

    path: Path
    missing: list[tuple[Path, str]] = field(default_factory=list)  # (image, the ImageError message)


def _placeholder() -> Image.Image:
    """A grey tile labelled `missing`, standing in for an image that moved or cannot be decoded."""
    img = Image.new("RGB", (MISSING_WIDTH, TILE_HEIGHT), MISSING_FILL)
    draw = ImageDraw.Draw(img)
    draw.line((0, 0, MISSING_WIDTH - 1, TILE_HEIGHT - 1), fill=(110, 110, 110), width=2)
    draw.line((0, TILE_HEIGHT - 1, MISSING_WIDTH - 1, 0), fill=(110, 110, 110), width=2)
    draw.rectangle((MISSING_WIDTH // 2 - 30, TILE_HEIGHT // 2 - 10, MISSING_WIDTH // 2 + 30, TILE_HEIGHT // 2 + 10), fill=MISSING_FILL)
    draw.text((MISSING_WIDTH // 2 - 21, TILE_HEIGHT // 2 - 6), "missing", fill=(255, 255, 255))
    return img


def _tile(path: Path, caption: str, border: tuple[int, int, int], img: Image.Image | None = None) -> Image.Image:
    img = load_rgb(path) if img is None else img
    width = max(1, round(img.width * TILE_HEIGHT / img.height))
    img = img.resize((width, TILE_HEIGHT), Image.BILINEAR)
    tile = Image.new("RGB", (width + 8, TILE_HEIGHT + 8 + CAPTION), border)
    tile.paste(img, (4, 4))
    ImageDraw.Draw(tile).text((4, TILE_HEIGHT + 6), caption[: width // 6], fill=(255, 255, 255))
    return tile


def save_matches_figure(rows: list[tuple[Path, list[tuple[Path, str, bool | None]]]], out_png: Path) -> MatchesFigure:
    """One row per query: the query, then its matches (path, caption, correct?) with coloured borders.

    A match image that cannot be read (moved, deleted, corrupt since the index was built) becomes a grey
    tile labelled `missing`, logged as a warning and listed in the result's `missing`; the figure is still
    written. An unreadable query image raises `ImageError`.
    """
    rendered, missing = [], []
    for query, matches in rows:
        tiles = [_tile(query, f"query {query.name}", (30, 30, 30))]
        for path, caption, correct in matches:
            border = UNKNOWN if correct is None else CORRECT if correct else WRONG
            try:
                tiles.append(_tile(path, caption, border))
            except ImageError as exc:
                log.info("%s; drawn as a grey 'missing' tile in %s", exc, out_png)
                missing.append((Path(path), str(exc)))
                tiles.append(_tile(path, f"{caption} missing", border, img=_placeholder()))
        rendered.append(tiles)
    width = max(sum(t.width for t in tiles) + 6 * len(tiles) for tiles in rendered)
    height = sum(max(t.height for t in tiles) + 6 for tiles in rendered)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    y = 0
    for tiles in rendered:
        x = 0
        for t in tiles:
            sheet.paste(t, (x, y))
            x += t.width + 6
        y += max(t.height for t in tiles) + 6
    out_png = Path(out_png)
    save_png(sheet, out_png, "`viz`")
    return MatchesFigure(out_png, missing)


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in font at `size` pixels (its small bitmap font where Pillow lacks FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError):
        return ImageFont.load_default()


MAP_SIZE, MAP_MARGIN, MAP_HEADER = 1600, 40, 34
DATABASE_DOT, TRUE_DOT, ESTIMATE_DOT = (175, 175, 175), (40, 160, 60), (205, 45, 35)
ERROR_LINE, NO_ESTIMATE = (220, 60, 40, 110), (20, 20, 20)


def positions_summary(query_utm: np.ndarray | None, estimate_utm: np.ndarray, threshold: float) -> str:
    """The map's summary line: how many queries, the share with an estimate within `threshold` m, the median error."""
    count = len(estimate_utm)
    if query_utm is None:
        return f"{count} queries; no true positions, so no errors"
    errors = localization_errors(estimate_utm, query_utm)
    median = error_summary(errors)["median_m"]
    share = 100.0 * float(np.mean(errors <= threshold)) if count else 0.0
    missing = int(np.sum(~np.isfinite(errors)))
    return (f"{count} queries   {share:.1f}% within {threshold:g} m   median error "
            f"{'none' if median is None else f'{median:.1f} m'}   {int(np.sum(errors > threshold)) - missing} wrong"
            + (f"   {missing} without estimate" if missing else ""))


def save_positions_map(database_utm: np.ndarray, query_utm: np.ndarray | None, estimate_utm: np.ndarray,
                       out_png: Path, option: str = "`viz`", *, threshold: float = 25.0) -> Path:
    """A top-down map in UTM metres (north up), legible at thousands of queries: database positions grey, true
    query positions green; a wrong answer (estimate over `threshold` m off) is a translucent red line from the
    truth to its estimate (red dot), a query without estimate a black cross; a summary line on top."""
    finite = np.isfinite(estimate_utm).all(axis=1)
    points = [database_utm, estimate_utm[finite]] + ([query_utm] if query_utm is not None else [])
    everything = np.concatenate(points)
    low, high = everything.min(axis=0), everything.max(axis=0)
    scale = (MAP_SIZE - 2 * MAP_MARGIN) / max(float((high - low).max()), 1.0)
    width, height = (round(float(v) * scale) + 2 * MAP_MARGIN for v in (high - low))
    canvas = Image.new("RGB", (max(width, 900), MAP_HEADER + height + CAPTION + 12), (255, 255, 255))
    draw = ImageDraw.Draw(canvas, "RGBA")  # translucent lines: thousands of them stay readable

    def xy(p: np.ndarray) -> tuple[float, float]:
        return MAP_MARGIN + (p[0] - low[0]) * scale, MAP_HEADER + height - MAP_MARGIN - (p[1] - low[1]) * scale

    def dot(p: np.ndarray, colour: tuple[int, int, int], r: float) -> None:
        x, y = xy(p)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)

    for p in database_utm:
        dot(p, DATABASE_DOT, 1.2)
    if query_utm is None:
        for estimate in estimate_utm[finite]:
            dot(estimate, ESTIMATE_DOT, 2.0)
        legend = "grey: database   red: estimated query position"
    else:
        errors = localization_errors(estimate_utm, query_utm)
        wrong = np.flatnonzero(np.isfinite(errors) & (errors > threshold))
        for q in wrong:
            draw.line((*xy(query_utm[q]), *xy(estimate_utm[q])), fill=ERROR_LINE, width=1)
        for q in np.flatnonzero(errors <= threshold):
            dot(query_utm[q], TRUE_DOT, 2.0)
        for q in wrong:
            dot(query_utm[q], TRUE_DOT, 2.0)
            dot(estimate_utm[q], ESTIMATE_DOT, 2.0)
        for q in np.flatnonzero(~np.isfinite(errors)):
            x, y = xy(query_utm[q])
            draw.line((x - 3, y - 3, x + 3, y + 3), fill=NO_ESTIMATE, width=1)
            draw.line((x - 3, y + 3, x + 3, y - 3), fill=NO_ESTIMATE, width=1)
        legend = (f"grey: database   green: true query position   red: wrong answer (over {threshold:g} m), "
                  "line from the truth to the estimate (dot)   black x: no estimate")
    metres = 10 ** np.floor(np.log10(max((high - low).max(), 1.0) / 2))
    x0, y0 = MAP_MARGIN, MAP_HEADER + height - 12
    draw.line((x0, y0, x0 + metres * scale, y0), fill=(0, 0, 0), width=2)
    draw.text((x0 + metres * scale + 6, y0), f"{metres:g} m", fill=(0, 0, 0), font=font(13), anchor="lm")
    draw.text((8, MAP_HEADER // 2), positions_summary(query_utm, estimate_utm, threshold), fill=(0, 0, 0), font=font(18), anchor="lm")
    draw.text((8, MAP_HEADER + height + 4), legend, fill=(60, 60, 60), font=font(13))
    save_png(canvas, Path(out_png), option)
    return Path(out_png)
