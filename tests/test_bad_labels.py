"""Fuzzing user-written label files: any text gives a valid result or a one-line `VPRError`, never a crash."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vpr.data.datasets import GeoImageSet, load_folder, load_manifest
from vpr.data.ground_truth import load_ground_truth
from vpr.data.geo import UTM_LETTERS
from vpr.errors import VPRError

IMAGES = ("a.jpg", "b.jpg", "sub/a.jpg", "x y.png", "é.jpg")
CELLS = st.one_of(
    st.sampled_from([
        *IMAGES, "a.jpg b.jpg", "0", "1", "4", "5", "-1", "1.5", "²", "٣", "nan", "inf", "1e3", "", " ",
        "37.7", "-122.4", "-0.001", "95", "550000", "4180000", "10S", "10", "10I", "S", "I", "400", '"a,b"', '"',
    ]),
    st.text(max_size=6),
)
ROWS = st.lists(st.lists(CELLS, min_size=1, max_size=6), max_size=6)
GT_HEADERS = st.sampled_from(["query,positives", "query, positives", "positives,query", "\ufeffquery,positives", "query", ""])
MANIFEST_HEADERS = st.sampled_from([
    "path,lat,lon,heading", "path,utm_east,utm_north,zone", "path,utm_east,utm_north,zone,zone_letter,heading",
    "path,lat,lon", "\ufeffpath,lat,lon", "path,path,lat,lon", "query,positives", "",
])
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder holding the images the fuzzed files may name."""
    root = tmp_path_factory.mktemp("fuzz")
    for name in IMAGES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(root / name)
    return root


def csv_text(headers: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A header, then rows of random cells (names, numbers, quotes, unicode) with random separators and blank lines."""
    return st.builds(
        lambda header, rows, comma, newline: header + newline + "".join(comma.join(r) + newline for r in rows),
        headers, ROWS, st.sampled_from([",", ", ", ",,", ";", " "]), st.sampled_from(["\n", "\r\n", "\n\n", "\r"]),
    )


def ground_truth_text() -> st.SearchStrategy[str]:
    """Plausible ground truth: one query and space-separated positives per row, some tokens bad."""
    token = st.sampled_from([*IMAGES, "./b.jpg", "sub/a.jpg", "0", "3", "4", "5", "-1", "²", "gone.jpg"])
    row = st.tuples(token, st.lists(token, max_size=3).map(" ".join))
    return st.lists(row, max_size=5).map(lambda rows: "query,positives\n" + "".join(f"{q},{p}\n" for q, p in rows))


def manifest_text() -> st.SearchStrategy[str]:
    """Plausible manifests: right-sized rows of mostly valid cells, some bad, some rows a cell short or long."""
    number = st.sampled_from(["37.7", "-122.4", "37.71", "550000", "4180000", "0", "-0.001", "95", "nan", "", "1,5"])
    zone = st.sampled_from(["10", "10S", "10s", "S", "", "11", "10I", "61", "90", "400"])
    row = st.tuples(st.sampled_from([*IMAGES, "gone.jpg", "sub", ""]), number, number, zone, zone, zone)
    header = st.sampled_from(["path,lat,lon", "path,lat,lon,heading", "path,utm_east,utm_north,zone", "path,utm_east,utm_north,zone,zone_letter,heading"])
    return st.builds(
        lambda header, rows, extra: header + "\n" + "".join(",".join(r[: header.count(",") + 1 + extra]) + "\n" for r in rows),
        header, st.lists(row, min_size=1, max_size=4), st.sampled_from([0, 0, 0, 1, -1]),
    )


def csv_bytes(text: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    """`text` in a random encoding (mostly UTF-8, some UTF-16 or Latin-1), or raw bytes."""
    encoded = st.tuples(text, st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "utf-16", "latin-1"])).map(
        lambda te: te[0].encode(te[1], errors="replace")
    )
    return st.one_of(encoded, encoded, encoded, st.binary(max_size=80))


def _one_line(exc: VPRError) -> None:
    assert str(exc) and "\n" not in str(exc) and "\r" not in str(exc)


@given(data=st.one_of(csv_bytes(csv_text(GT_HEADERS)), csv_bytes(ground_truth_text())))
@FUZZ
def test_any_ground_truth_file_loads_or_raises_our_error(folder, tmp_path, data):
    images = load_folder(folder)
    gt = tmp_path / "gt.csv"
    gt.write_bytes(data)
    try:
        positives = load_ground_truth(gt, images, images)
    except VPRError as exc:
        _one_line(exc)
        return
    assert len(positives) == len(images)
    for p in positives:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0) and np.all((p >= 0) & (p < len(images)))


@given(data=st.one_of(csv_bytes(csv_text(MANIFEST_HEADERS)), csv_bytes(manifest_text())))
@FUZZ
def test_any_manifest_loads_or_raises_our_error(folder, data):
    manifest = folder / "m.csv"
    manifest.write_bytes(data)
    try:
        images = load_manifest(manifest)
    except VPRError as exc:
        _one_line(exc)
        return
    assert isinstance(images, GeoImageSet) and len(images) > 0 and all(p.is_file() for p in images.paths)
    assert images.utm.shape == (len(images), 2) and np.isfinite(images.utm).all()
    assert np.all(np.isnan(images.heading) | ((images.heading >= 0) & (images.heading < 360)))
    assert images.zone is None or (1 <= images.zone[0] <= 60 and images.zone[1] in UTM_LETTERS)
