"""One picture per evaluated query: the query beside its top matches, each framed green when it is a positive and
red when not, with its distance to the query (metres) and similarity written under it."""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

from PIL import Image, ImageDraw

from vpr.data.images import load_thumbnail
from vpr.errors import ImageError, UsageError
from vpr.evaluation.viz import CORRECT, MISSING_FILL, UNKNOWN, WRONG, font
from vpr.fileio import MARKER, check_replaceable_dir, is_vpr_png, make_owned_dir, marker_kind, output_lock, save_png
from vpr.retrieval.results import Match, QueryResult

log = logging.getLogger(__name__)

KIND = "pictures"  # the marker of a folder of query pictures
QUERY_FRAME, BACKGROUND, PAD = (60, 60, 60), (255, 255, 255), (235, 235, 235)
MARGIN, GAP, HEADER, TEXT, LINE = 10, 10, 30, 16, 22  # pixels: border, between tiles, title strip, caption font and line
NAME_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
LEFTOVER = re.compile(r"\..+\.png\.tmp-[a-z0-9_]{8}")  # `atomic_file`'s temporary of a PNG (mkstemp's 8 characters)


def is_positive(match: Match, threshold: float) -> bool | None:
    """Whether a match is a positive: the evaluation's ground truth when known, else within `threshold` metres;
    None when neither is known."""
    if match.positive is not None:
        return match.positive
    return None if match.metres is None else match.metres <= threshold


def picture_name(index: int, query: str, count: int) -> str:
    """`NNNN-STEM.png`: the query's position (unique, sorted like the results) and its file stem (a video frame's
    name whole, with its time), made safe."""
    name = Path(query).name
    stem = name if "#t=" in name else Path(query).stem
    stem = NAME_SAFE.sub("_", stem)[:80].strip("._") or "query"
    return f"{index:0{max(4, len(str(count - 1)))}d}-{stem}.png"


def _is_leftover(folder: Path, name: str) -> bool:
    """A temporary PNG of `atomic_file` that a killed run left in a folder of vpr's pictures."""
    return LEFTOVER.fullmatch(name) is not None and marker_kind(folder) == KIND


def foreign_pictures(folder: Path) -> list[str]:
    """Entries of a pictures folder that vpr did not write: anything but its PNGs, its marker and its leftovers."""
    def ours(name: str) -> bool:
        entry = folder / name
        if entry.is_symlink():
            return False
        if name == MARKER:
            return marker_kind(folder) == KIND
        return (name.endswith(".png") and entry.is_file() and is_vpr_png(entry)) or _is_leftover(folder, name)

    return [name for name in os.listdir(folder) if not ours(name)]


def _image(path: Path, size: int) -> Image.Image:
    """A thumbnail of `path` (longest side `size`: small images are enlarged to it), or a grey `missing` stand-in
    when it cannot be read."""
    try:
        img = load_thumbnail(path, size)
        scale = size / max(img.size)
        return img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC) if scale > 1 else img
    except ImageError as exc:
        log.info("%s; drawn as a grey 'missing' tile", exc)
        img = Image.new("RGB", (size, size * 3 // 4), MISSING_FILL)
        ImageDraw.Draw(img).text((size // 2, size * 3 // 8), "missing", fill=(255, 255, 255), font=font(TEXT), anchor="mm")
        return img


def _fit(draw: ImageDraw.ImageDraw, line: str, width: int, text) -> str:
    """`line`, cut to `width` pixels (ending in `~` when cut)."""
    if draw.textlength(line, font=text) <= width:
        return line
    while line and draw.textlength(line + "~", font=text) > width:
        line = line[:-1]
    return line + "~"


def _tile(path: Path, size: int, frame: tuple[int, int, int], lines: tuple[str, str]) -> Image.Image:
    """The image fitted into a `size` square, framed in `frame`, with two caption lines under it."""
    border = max(4, size // 32)
    side = size + 2 * border
    tile = Image.new("RGB", (side, side + 2 * LINE + 4), BACKGROUND)
    draw = ImageDraw.Draw(tile)
    draw.rectangle((0, 0, side - 1, side - 1), fill=frame)
    draw.rectangle((border, border, border + size - 1, border + size - 1), fill=PAD)
    img = _image(path, size)
    tile.paste(img, (border + (size - img.width) // 2, border + (size - img.height) // 2))
    text = font(TEXT)
    for row, line in enumerate(lines):
        draw.text((2, side + 2 + row * LINE), _fit(draw, line, side - 4, text), fill=(0, 0, 0), font=text)
    return tile


def _match_lines(match: Match, positive: bool | None) -> tuple[str, str]:
    verdict = "?" if positive is None else "positive" if positive else "wrong"
    metres = "" if match.metres is None or not math.isfinite(match.metres) else f"   {match.metres:.1f} m"
    return f"#{match.rank} {verdict}{metres}", f"similarity {match.similarity:.3f}"


def query_picture(result: QueryResult, *, num_preds: int, threshold: float, size: int) -> Image.Image:
    """One query's picture: a title line, then the query and its first `num_preds` matches side by side."""
    tiles = [_tile(Path(result.query), size, QUERY_FRAME, ("query", Path(result.query).name))]
    for match in result.matches[:num_preds]:
        positive = is_positive(match, threshold)
        frame = UNKNOWN if positive is None else CORRECT if positive else WRONG
        tiles.append(_tile(match.path, size, frame, _match_lines(match, positive)))
    width = 2 * MARGIN + sum(t.width for t in tiles) + GAP * (len(tiles) - 1)
    sheet = Image.new("RGB", (width, HEADER + MARGIN + tiles[0].height), BACKGROUND)
    first = is_positive(result.matches[0], threshold) if result.matches else False
    verdict = "top-1 unknown" if first is None else "top-1 right" if first else "top-1 wrong"
    error = "" if result.error_m is None else f"   position error {result.error_m:.1f} m"
    draw, title = ImageDraw.Draw(sheet), font(18)
    name = _fit(draw, Path(result.query).name, width - 2 * MARGIN - int(draw.textlength(f"   {verdict}{error}", font=title)), title)
    draw.text((MARGIN, HEADER // 2), f"{name}   {verdict}{error}", fill=(0, 0, 0), font=title, anchor="lm")
    x = MARGIN
    for tile in tiles:
        sheet.paste(tile, (x, HEADER))
        x += tile.width + GAP
    return sheet


def top1_wrong(result: QueryResult, threshold: float) -> bool:
    """Whether the query's first match is not a positive (no match at all counts as wrong)."""
    if not result.matches:
        return True
    positive = is_positive(result.matches[0], threshold)
    if positive is None:
        raise UsageError(f"{result.query}: `only_wrong` needs to know which matches are right, and this query's "
                         "top match has neither ground truth nor metres; evaluate with positions or ground truth")
    return not positive


def save_query_pictures(results: list[QueryResult], out_dir: Path, *, num_preds: int = 5, only_wrong: bool = False,
                        threshold: float = 25.0, size: int = 256) -> list[Path]:
    """One PNG per query in `out_dir` (the query beside its top `num_preds` matches, `size` pixels each): green
    frames positives, red the others (grey: unknown); `only_wrong` keeps queries whose top-1 is wrong.

    `out_dir` must be new, empty, or hold only vpr's PNGs; a folder this function wrote before is refreshed: its
    pictures that this run does not write again are removed. Returns the paths written, in query order."""
    if num_preds < 1:
        raise UsageError(f"`num_preds` {num_preds}: draw at least 1 match per query")
    if size < 32:
        raise UsageError(f"`size` {size}: give at least 32 pixels per image")
    if not math.isfinite(threshold) or threshold < 0:
        raise UsageError(f"`threshold` {threshold}: give a distance in metres, 0 or more")
    out_dir = Path(out_dir)
    check_replaceable_dir(out_dir, foreign_pictures, "`out_dir`")
    chosen = [(i, r) for i, r in enumerate(results) if not only_wrong or top1_wrong(r, threshold)]
    with output_lock(out_dir):
        check_replaceable_dir(out_dir, foreign_pictures, "`out_dir`")
        refresh = out_dir.is_dir() and marker_kind(out_dir) == KIND
        make_owned_dir(out_dir, KIND, "pictures folder", "choose a writable `out_dir`")
        written = []
        for i, result in chosen:
            path = out_dir / picture_name(i, result.query, len(results))
            save_png(query_picture(result, num_preds=num_preds, threshold=threshold, size=size), path, "`out_dir`")
            written.append(path)
        if refresh:
            _remove_stale(out_dir, {p.name for p in written})
    return written


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Delete, in a folder of pictures vpr made, its PNGs and leftovers that this run did not write."""
    for name in os.listdir(folder):
        entry = folder / name
        if name in keep or name == MARKER or entry.is_symlink():
            continue
        if (name.endswith(".png") and entry.is_file() and is_vpr_png(entry)) or _is_leftover(folder, name):
            entry.unlink()
