"""Contact sheet of a generated dataset: database images beside their nearest query, with captions."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vpr.data.geo import parse_at_name
from vpr.errors import UsageError

PAD = 4
CAPTION_H = 26
MIN_TILE_W = 150


def _poses(folder: Path) -> tuple[list[Path], np.ndarray]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".jpg")
    names = [parse_at_name(p.name) for p in files]
    return files, np.array([(g.east, g.north, g.heading or 0.0) for g in names], np.float64).reshape(-1, 3)


def tile_scale(width: int) -> int:
    """Integer upscaling applied to images narrower than `MIN_TILE_W` so captions fit under them."""
    return max(1, math.ceil(MIN_TILE_W / width))


def save_preview(dataset_dir: Path, out_png: Path, *, rows: int = 4, cols: int = 6, split: str = "test") -> Path:
    """Write a PNG grid of `rows` x `cols` tiles: each database image followed by its nearest query.

    Tiles are the image size (upscaled by `tile_scale` when narrow) plus a `CAPTION_H` caption, separated
    by `PAD` pixels; captions give the role, heading, distance and east/north of each image.
    """
    if rows < 1 or cols < 2 or cols % 2:
        raise UsageError(f"contact sheet of {rows}x{cols} tiles: use rows >= 1 and an even cols >= 2")
    db_dir = Path(dataset_dir) / "images" / split / "database"
    q_dir = Path(dataset_dir) / "images" / split / "queries"
    if not db_dir.is_dir() or not q_dir.is_dir():
        raise UsageError(f"{dataset_dir}: no images/{split}/database and queries folders; "
                         "pass a dataset written by generate_city")
    db_files, db = _poses(db_dir)
    q_files, q = _poses(q_dir)
    if not db_files or not q_files:
        raise UsageError(f"{dataset_dir}: split {split!r} has no database or query images; regenerate the dataset")
    with Image.open(db_files[0]) as first:
        w, h = first.size
    scale = tile_scale(w)
    tw, th = w * scale, h * scale
    sheet = Image.new("RGB", (cols * tw + (cols + 1) * PAD, rows * (th + CAPTION_H) + (rows + 1) * PAD),
                      (24, 24, 28))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    pairs = rows * cols // 2
    picks = np.unique(np.linspace(0, len(q_files) - 1, min(pairs, len(q_files))).round().astype(int))
    for slot, qi in enumerate(picks):
        dist = np.hypot(db[:, 0] - q[qi, 0], db[:, 1] - q[qi, 1])
        turn = np.abs((db[:, 2] - q[qi, 2] + 180.0) % 360.0 - 180.0)
        di = int(np.argmin(dist + np.where(turn <= 30.0, 0.0, 1e6)))
        r, c = divmod(slot, cols // 2)
        for k, (path, pose, label) in enumerate((
            (db_files[di], db[di], f"DB  h={db[di, 2]:.1f}"),
            (q_files[qi], q[qi], f"Q  h={q[qi, 2]:.1f}  d={dist[di]:.1f}m"),
        )):
            x = PAD + (2 * c + k) * (tw + PAD)
            y = PAD + r * (th + CAPTION_H + PAD)
            with Image.open(path) as img:
                sheet.paste(img.convert("RGB").resize((tw, th), Image.NEAREST), (x, y))
            draw.text((x + 1, y + th + 1), label, fill=(235, 235, 235), font=font)
            draw.text((x + 1, y + th + 13), f"{pose[0]:.1f} {pose[1]:.1f}", fill=(170, 200, 235), font=font)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png, format="PNG")
    return out_png
