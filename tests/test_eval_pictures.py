"""Per-query pictures of an evaluation (frames coloured by positive or not, `only_wrong`, safe folder handling)
and the positions map at thousands of queries."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vpr.errors import OutputError, UsageError
from vpr.evaluation.pictures import GAP, HEADER, MARGIN, picture_name, save_query_pictures
from vpr.evaluation.viz import CORRECT, UNKNOWN, WRONG, positions_summary, save_positions_map
from vpr.fileio import MARKER, is_vpr_png, save_png
from vpr.retrieval.results import Match, QueryResult

SIZE = 64
BORDER = 4  # max(4, SIZE // 32)


def image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (80, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, quality=95)
    return path


def match(rank: int, path: Path, *, positive: bool | None, metres: float | None, similarity: float = 0.5) -> Match:
    return Match(rank, rank, path, similarity, 1.0, None, None, None, None, None, metres=metres, positive=positive)


@pytest.fixture
def results(tmp_path) -> list[QueryResult]:
    """Three queries: q0's top-1 is a positive, q1's is not, q2's is known only by its metres (10 m: right)."""
    good, bad = image(tmp_path / "db" / "good.jpg", (0, 0, 255)), image(tmp_path / "db" / "bad.jpg", (255, 255, 0))
    out = []
    for name, first in (("q0", (good, True, 3.0)), ("q1", (bad, False, 400.0)), ("q2", (bad, None, 10.0))):
        query = image(tmp_path / "queries" / f"{name}.jpg", (128, 128, 128), (60, 80))
        matches = [match(1, first[0], positive=first[1], metres=first[2], similarity=0.9),
                   match(2, bad, positive=False if first[1] is not None else None, metres=250.0),
                   match(3, good, positive=None, metres=None)]
        out.append(QueryResult(str(query), matches, None, error_m=first[2]))
    return out


def frame(picture: Path, tile: int) -> tuple[int, int, int]:
    """The frame colour of the `tile`-th tile (0: the query) of a picture drawn at `SIZE`."""
    x = MARGIN + tile * (SIZE + 2 * BORDER + GAP) + 1
    return Image.open(picture).convert("RGB").getpixel((x, HEADER + 1))


def test_one_picture_per_query_with_frames_coloured_by_positive(results, tmp_path):
    written = save_query_pictures(results, tmp_path / "pics", num_preds=3, size=SIZE)
    assert [p.name for p in written] == ["0000-q0.png", "0001-q1.png", "0002-q2.png"]
    assert all(is_vpr_png(p) for p in written)
    assert frame(written[0], 1) == CORRECT and frame(written[0], 2) == WRONG and frame(written[0], 3) == UNKNOWN
    assert frame(written[1], 1) == WRONG
    assert frame(written[2], 1) == CORRECT and frame(written[2], 2) == WRONG  # no ground truth: metres vs 25 m
    centre = (MARGIN + SIZE + 2 * BORDER + GAP + BORDER + SIZE // 2, HEADER + BORDER + SIZE // 2)  # of match 1's image
    tile = Image.open(written[0]).convert("RGB").getpixel(centre)
    assert max(abs(a - b) for a, b in zip(tile, (0, 0, 255))) < 20  # the match image itself is inside the frame
    assert Image.open(written[0]).width == 2 * MARGIN + 4 * (SIZE + 2 * BORDER) + 3 * GAP


def test_threshold_decides_only_where_ground_truth_is_unknown(results, tmp_path):
    written = save_query_pictures(results, tmp_path / "pics", num_preds=2, threshold=5.0, size=SIZE)
    assert frame(written[2], 1) == WRONG  # 10 m is over 5 m
    assert frame(written[0], 1) == CORRECT  # the ground truth says positive (3 m)
    assert Image.open(written[0]).width == 2 * MARGIN + 3 * (SIZE + 2 * BORDER) + 2 * GAP  # num_preds=2


def test_only_wrong_keeps_queries_whose_top1_is_wrong(results, tmp_path):
    assert [p.name for p in save_query_pictures(results, tmp_path / "pics", only_wrong=True, size=SIZE)] == ["0001-q1.png"]
    unknown = QueryResult(results[0].query, [match(1, results[0].matches[0].path, positive=None, metres=None)], None)
    with pytest.raises(UsageError, match="only_wrong"):
        save_query_pictures([unknown], tmp_path / "other", only_wrong=True, size=SIZE)
    assert not (tmp_path / "other").exists()


def test_refuses_a_folder_holding_a_users_file(results, tmp_path):
    folder = tmp_path / "holiday"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    Image.new("RGB", (4, 4)).save(folder / "photo.png")  # a PNG vpr did not write
    with pytest.raises(OutputError, match="notes.txt, photo.png"):
        save_query_pictures(results, folder, size=SIZE)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt", "photo.png"]
    assert (folder / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError):
        save_query_pictures(results, tmp_path / "file", size=SIZE)


def test_rerun_replaces_vprs_own_pictures_and_drops_stale_ones(results, tmp_path):
    folder = tmp_path / "pics"
    first = save_query_pictures(results, folder, size=SIZE)
    before = first[1].read_bytes()
    again = save_query_pictures(results, folder, only_wrong=True, size=2 * SIZE)
    assert again == [first[1]] and first[1].read_bytes() != before
    assert sorted(p.name for p in folder.iterdir()) == sorted([MARKER, first[1].name])


def test_vpr_pngs_in_an_unmarked_folder_are_kept(results, tmp_path):
    folder = tmp_path / "figures"
    folder.mkdir()
    save_png(Image.new("RGB", (8, 8)), folder / "map.png", "`viz`")
    save_query_pictures(results, folder, only_wrong=True, size=SIZE)
    assert sorted(p.name for p in folder.iterdir()) == sorted([MARKER, "0001-q1.png", "map.png"])


def test_file_names_are_unique_and_safe(tmp_path):
    assert picture_name(3, "/data/a/la vue/ü?*:x.jpg", 12000) == "00003-x.png"
    assert picture_name(0, "/data/../..", 1) == "0000-query.png"
    q = image(tmp_path / "a" / "same.jpg", (10, 10, 10))
    other = image(tmp_path / "b" / "same.jpg", (10, 10, 10))
    results = [QueryResult(str(q), [], None), QueryResult(str(other), [], None)]
    written = save_query_pictures(results, tmp_path / "pics", size=SIZE)  # no matches at all: the query alone
    assert len({p.name for p in written}) == 2


def test_unreadable_images_become_grey_tiles(results, tmp_path):
    results[0].matches[0].path.unlink()
    written = save_query_pictures(results[:1], tmp_path / "pics", size=SIZE)
    assert frame(written[0], 1) == CORRECT


def test_bad_arguments_are_refused(results, tmp_path):
    with pytest.raises(UsageError, match="num_preds 0"):
        save_query_pictures(results, tmp_path / "pics", num_preds=0)
    with pytest.raises(UsageError, match="size 8"):
        save_query_pictures(results, tmp_path / "pics", size=8)
    assert not (tmp_path / "pics").exists()


def test_positions_map_renders_3000_queries(tmp_path):
    rng = np.random.default_rng(0)
    database = rng.uniform(0, 3000, size=(5000, 2)) + (550000, 4180000)
    queries = database[rng.choice(5000, 3000, replace=False)] + rng.normal(0, 3, (3000, 2))
    estimates = queries + rng.normal(0, 5, (3000, 2))
    wrong = rng.choice(3000, 600, replace=False)
    estimates[wrong] = database[rng.choice(5000, 600)]
    estimates[:20] = np.nan  # no estimate
    path = save_positions_map(database, queries, estimates, tmp_path / "map.png")
    assert is_vpr_png(path)
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert pixels.shape[1] >= 1500
    reddish = (pixels[..., 0] > 180) & (pixels[..., 1] < 120) & (pixels[..., 2] < 120)
    greenish = (pixels[..., 1] > 130) & (pixels[..., 0] < 90) & (pixels[..., 2] < 110)
    assert reddish.sum() > 1000 and greenish.sum() > 1000
    summary = positions_summary(queries, estimates, 25.0)
    assert summary.startswith("3000 queries") and "% within 25 m" in summary and "median error" in summary
    assert "20 without estimate" in summary


def test_positions_map_without_true_positions(tmp_path):
    estimates = np.array([[0.0, 0.0], [50.0, 10.0]])
    assert is_vpr_png(save_positions_map(np.array([[0.0, 0.0], [100.0, 100.0]]), None, estimates, tmp_path / "m.png"))
    assert positions_summary(None, estimates, 25.0) == "2 queries; no true positions, so no errors"
