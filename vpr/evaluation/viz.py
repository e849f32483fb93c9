"""Pictures of a query beside its top matches (green where the match is a true positive), and a map of
estimated against true query positions."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vpr.data.images import load_rgb
from vpr.errors import ImageError
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


MAP_SIZE, MAP_MARGIN = 900, 30
DATABASE_DOT, TRUE_DOT, ESTIMATE_DOT = (170, 170, 170), (40, 170, 60), (200, 50, 40)


def save_positions_map(database_utm: np.ndarray, query_utm: np.ndarray | None, estimate_utm: np.ndarray,
                       out_png: Path, option: str = "`viz`") -> Path:
    """A top-down map in UTM metres (north up): database positions grey, true query positions green,
    estimates red, each estimate joined to its truth by a line whose length is the error."""
    points = [database_utm, estimate_utm[np.isfinite(estimate_utm).all(axis=1)]]
    if query_utm is not None:
        points.append(query_utm)
    everything = np.concatenate(points)
    low, high = everything.min(axis=0), everything.max(axis=0)
    scale = (MAP_SIZE - 2 * MAP_MARGIN) / max(float((high - low).max()), 1.0)
    width, height = (int(round(float(v) * scale)) + 2 * MAP_MARGIN for v in (high - low))
    canvas = Image.new("RGB", (max(width, 420), height + CAPTION), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)

    def xy(p: np.ndarray) -> tuple[float, float]:
        return MAP_MARGIN + (p[0] - low[0]) * scale, height - MAP_MARGIN - (p[1] - low[1]) * scale

    def dot(p: np.ndarray, colour: tuple[int, int, int], r: float) -> None:
        x, y = xy(p)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)

    for p in database_utm:
        dot(p, DATABASE_DOT, 1.5)
    for q, estimate in enumerate(estimate_utm):
        if query_utm is not None and np.isfinite(estimate).all():
            draw.line((*xy(query_utm[q]), *xy(estimate)), fill=(230, 150, 140), width=1)
    if query_utm is not None:
        for p in query_utm:
            dot(p, TRUE_DOT, 2.5)
    for estimate in estimate_utm:
        if np.isfinite(estimate).all():
            dot(estimate, ESTIMATE_DOT, 2.5)
    metres = 10 ** np.floor(np.log10(max((high - low).max(), 1.0) / 2))
    x0, y0 = MAP_MARGIN, height - 10
    draw.line((x0, y0, x0 + metres * scale, y0), fill=(0, 0, 0), width=2)
    draw.text((x0 + metres * scale + 6, y0 - 6), f"{metres:g} m", fill=(0, 0, 0))
    draw.text((6, height + 2), "grey: database   green: true query position   red: estimate (line = error)", fill=(0, 0, 0))
    save_png(canvas, Path(out_png), option)
    return Path(out_png)
