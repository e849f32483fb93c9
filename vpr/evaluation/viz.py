"""Pictures of a query beside its top matches, green where the match is a true positive."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from vpr.data.images import load_rgb
from vpr.fileio import atomic_file

TILE_HEIGHT = 180
CAPTION = 16
CORRECT, WRONG, UNKNOWN = (40, 170, 60), (200, 50, 40), (120, 120, 120)


def _tile(path: Path, caption: str, border: tuple[int, int, int]) -> Image.Image:
    img = load_rgb(path)
    width = max(1, round(img.width * TILE_HEIGHT / img.height))
    img = img.resize((width, TILE_HEIGHT), Image.BILINEAR)
    tile = Image.new("RGB", (width + 8, TILE_HEIGHT + 8 + CAPTION), border)
    tile.paste(img, (4, 4))
    ImageDraw.Draw(tile).text((4, TILE_HEIGHT + 6), caption[: width // 6], fill=(255, 255, 255))
    return tile


def save_matches_figure(rows: list[tuple[Path, list[tuple[Path, str, bool | None]]]], out_png: Path) -> Path:
    """One row per query: the query, then its matches (path, caption, correct?) with coloured borders."""
    rendered = []
    for query, matches in rows:
        tiles = [_tile(query, f"query {query.name}", (30, 30, 30))]
        for path, caption, correct in matches:
            tiles.append(_tile(path, caption, UNKNOWN if correct is None else CORRECT if correct else WRONG))
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
    with atomic_file(out_png) as tmp:
        sheet.save(tmp, format="PNG")
    return out_png
