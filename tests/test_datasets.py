"""Loading image sets: `@` folders, CSV manifests, ground-truth files, positives."""

import os
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vpr.data.datasets import GeoImageSet, load_image_set, load_manifest
from vpr.data.ground_truth import load_ground_truth, positives_within
from vpr.errors import ImageError, LabelError, UsageError, VPRError


def _img(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)
    return path


def test_at_folder_is_labelled(places):
    images = load_image_set(places / "database")
    assert len(images) == 12 and images.labelled
    assert images.utm.shape == (12, 2) and images.utm.dtype == np.float64
    assert images.zone == (10, "S")
    assert np.all((images.heading >= 0) & (images.heading < 360))


def test_unlabelled_folder_loads_without_coordinates(tmp_path):
    for name in ("b.jpg", "a.png", "sub/c.jpg"):
        _img(tmp_path / name)
    images = load_image_set(tmp_path)
    assert [p.name for p in images.paths] == ["a.png", "b.jpg", "c.jpg"]
    assert not images.labelled
    with pytest.raises(LabelError, match="no coordinates"):
        images.require_labels("eval")


def test_folder_with_one_unnamed_image_names_it(tmp_path):
    _img(tmp_path / "@1@2@.jpg")
    _img(tmp_path / "@2@3@.jpg")
    _img(tmp_path / "@zz.jpg")
    with pytest.raises(LabelError, match="@zz.jpg"):
        load_image_set(tmp_path)


def test_folder_spanning_two_zones_is_refused(tmp_path):
    _img(tmp_path / "@500000@4000000@10@S@@@@@@@@@@@.jpg")
    _img(tmp_path / "@500000@4000000@11@S@@@@@@@@@@@.jpg")
    with pytest.raises(LabelError, match="zones"):
        load_image_set(tmp_path)


def test_empty_or_missing_folder_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no images"):
        load_image_set(tmp_path)
    with pytest.raises(UsageError, match="no such"):
        load_image_set(tmp_path / "nope")


def test_latlon_manifest_converts_to_utm(tmp_path):
    _img(tmp_path / "imgs/a.jpg")
    _img(tmp_path / "imgs/b.jpg")
    csv = tmp_path / "m.csv"
    csv.write_text("path,lat,lon,heading\nimgs/a.jpg,37.76904,-122.48347,90\nimgs/b.jpg,37.77,-122.48,\n")
    images = load_manifest(csv)
    assert images.paths[0] == tmp_path / "imgs/a.jpg"
    assert images.zone == (10, "S")
    assert images.utm[0] == pytest.approx([545490, 4180353], abs=50)
    assert images.heading[0] == 90 and np.isnan(images.heading[1])


def test_utm_manifest(tmp_path):
    _img(tmp_path / "a.jpg")
    csv = tmp_path / "m.csv"
    csv.write_text("path,utm_east,utm_north\na.jpg,1.5,2.5\n")
    assert load_manifest(csv).utm.tolist() == [[1.5, 2.5]]


@pytest.mark.parametrize(
    "body,message",
    [
        ("path,lat,lon\na.jpg,nan,1\n", "lat"),
        ("path,lat,lon\na.jpg,,1\n", "lat"),
        ("path,lat\na.jpg,1\n", "lat,lon"),
        ("file,lat,lon\na.jpg,1,2\n", "'path'"),
        ("path,lat,lon\na.jpg,95,2\n", "out of range"),
        ("path,lat,lon,heading\na.jpg,37,-122,400\n", "heading"),
        ("path,lat,lon\na.jpg,37.7,-122.4\nb.jpg,37.7,-115.0\n", "zones"),
    ],
)
def test_bad_manifests_raise_one_line_label_errors(tmp_path, body, message):
    _img(tmp_path / "a.jpg")
    _img(tmp_path / "b.jpg")
    csv = tmp_path / "m.csv"
    csv.write_text(body)
    with pytest.raises(LabelError, match=message) as info:
        load_manifest(csv)
    assert "\n" not in str(info.value) and "m.csv" in str(info.value)


@given(st.lists(st.lists(st.text(max_size=12).filter(lambda s: "\n" not in s and "\r" not in s), min_size=1, max_size=4), max_size=4))
@settings(max_examples=150, deadline=None)
def test_any_manifest_rows_parse_or_raise_our_error(tmp_path_factory, rows):
    csv = tmp_path_factory.mktemp("m") / "m.csv"
    csv.write_text("path,lat,lon,heading\n" + "".join(",".join(r) + "\n" for r in rows))
    try:
        images = load_manifest(csv)
    except VPRError:
        return
    assert np.isfinite(images.utm).all()


def test_ground_truth_by_names_and_indices(tmp_path):
    for name in ("q0.jpg", "q1.jpg", "q2.jpg"):
        _img(tmp_path / "q" / name)
    for name in ("d0.jpg", "d1.jpg", "d2.jpg"):
        _img(tmp_path / "d" / name)
    gt = tmp_path / "gt.csv"
    gt.write_text("query,positives\nq0.jpg,d1.jpg d0.jpg\nq1.jpg,2\n")
    positives = load_ground_truth(gt, load_image_set(tmp_path / "q"), load_image_set(tmp_path / "d"))
    assert [p.tolist() for p in positives] == [[0, 1], [2], []]
    gt.write_text("query,positives\nq0.jpg,d9.jpg\n")
    with pytest.raises(LabelError, match="d9.jpg"):
        load_ground_truth(gt, load_image_set(tmp_path / "q"), load_image_set(tmp_path / "d"))


def test_positives_within_radius_sorted_by_distance():
    db = np.array([[0.0, 0.0], [10.0, 0.0], [30.0, 0.0], [24.0, 0.0]])
    queries = np.array([[1.0, 0.0], [100.0, 0.0]])
    positives = positives_within(db, queries, 25.0)
    assert positives[0].tolist() == [0, 1, 3] and positives[1].tolist() == []


# --- UTM manifests with a zone column ---------------------------------------------------------


@pytest.mark.parametrize(
    "header,zone_cells",
    [("zone,zone_letter", ["10,S", "10,S"]), ("zone", ["10S", "10s"]), ("zone,letter", ["10,S", " 10 , S "]), ("zone", ["10S", ""])],
)
def test_utm_manifest_zone_column_sets_the_zone(tmp_path, header, zone_cells):
    _img(tmp_path / "a.jpg")
    _img(tmp_path / "b.jpg")
    csv = tmp_path / "m.csv"
    csv.write_text(f"path,utm_east,utm_north,{header},heading\n" + "".join(
        f"{name},550000,4180000,{cells},90\n" for name, cells in zip(("a.jpg", "b.jpg"), zone_cells)
    ))
    images = load_manifest(csv)
    assert images.zone == (10, "S") and images.heading.tolist() == [90.0, 90.0]


def test_utm_manifest_spanning_two_zones_is_refused(tmp_path):
    _img(tmp_path / "a.jpg")
    _img(tmp_path / "b.jpg")
    csv = tmp_path / "m.csv"
    csv.write_text("path,utm_east,utm_north,zone\na.jpg,550000,4180000,10S\nb.jpg,450000,4180000,11S\n")
    with pytest.raises(LabelError) as info:
        load_manifest(csv)
    assert str(info.value) == f"{csv}: rows span UTM zones [10, 11]; split the manifest by zone, one index per zone"


@pytest.mark.parametrize(
    "cells,message",
    [("x", "zone 'x' is not a zone number 1..60"), ("61S", "'61' is not a zone number"), ("10I", "letter 'I' is not valid"),
     ("10,O", "letter 'O' is not valid"), ("10", "has no letter"), ("10SS", "letter 'SS'")],
)
def test_malformed_zone_cell_names_the_csv_line(tmp_path, cells, message):
    _img(tmp_path / "a.jpg")
    _img(tmp_path / "b.jpg")
    csv = tmp_path / "m.csv"
    csv.write_text(f"path,utm_east,utm_north,zone,zone_letter\na.jpg,1,2,10,S\nb.jpg,1,2,{cells}\n")
    with pytest.raises(LabelError, match=message) as info:
        load_manifest(csv)
    assert str(info.value).startswith(f"{csv}:3: ") and "\n" not in str(info.value)


def test_sets_spanning_the_equator_are_refused(tmp_path):
    _img(tmp_path / "a.jpg")
    _img(tmp_path / "b.jpg")
    csv = tmp_path / "m.csv"
    csv.write_text("path,lat,lon\na.jpg,-0.001,10\nb.jpg,0.001,10\n")
    with pytest.raises(LabelError, match="both hemispheres"):
        load_manifest(csv)
    _img(tmp_path / "f/@500000@9999900@32@M@@@@@@@@@@@.jpg")
    _img(tmp_path / "f/@500000@100@32@N@@@@@@@@@@@.jpg")
    with pytest.raises(LabelError, match="both hemispheres"):
        load_image_set(tmp_path / "f")


# --- folders of @ names ------------------------------------------------------------------------


def test_folder_of_at_names_with_one_plain_name_names_it(tmp_path):
    _img(tmp_path / "@550000@4180000@10@S@@@@@@@@@@@.jpg")
    _img(tmp_path / "@550100@4180000@10@S@@@@@@@@@@@.jpg")
    _img(tmp_path / "0001.png")
    with pytest.raises(LabelError) as info:
        load_image_set(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / '0001.png'}: file name has no coordinates")


@pytest.mark.parametrize("name,message", [("@1@2@10@@.jpg", "no zone letter"), ("@1@2@10@I@.jpg", "'I' is not valid")])
def test_folder_with_a_bad_zone_letter_names_the_file(tmp_path, name, message):
    _img(tmp_path / "@0@0@10@S@.jpg")
    _img(tmp_path / name)
    with pytest.raises(LabelError, match=message) as info:
        load_image_set(tmp_path)
    assert str(info.value).startswith(f"{tmp_path / name}: ")


def test_folder_of_names_without_zones_stays_labelled_without_zone(tmp_path):
    _img(tmp_path / "@1@2@.jpg")
    _img(tmp_path / "@3@4@@@.jpg")
    images = load_image_set(tmp_path)
    assert images.utm.tolist() == [[1.0, 2.0], [3.0, 4.0]] and images.zone is None


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes arbitrary name bytes")
def test_file_name_that_is_not_utf8_is_named_safely(tmp_path):
    _img(tmp_path / "a.jpg")
    with open(os.fsencode(tmp_path) + b"/\xff.jpg", "wb") as handle:
        handle.write((tmp_path / "a.jpg").read_bytes())
    with pytest.raises(ImageError) as info:
        load_image_set(tmp_path)
    message = str(info.value)
    assert message == f"{tmp_path}/\\xff.jpg: file name is not valid UTF-8; rename it (e.g. with convmv)"
    message.encode("utf-8")  # printable: no lone surrogates


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes arbitrary name bytes")
def test_manifest_in_a_folder_whose_name_is_not_utf8_is_refused(tmp_path):
    folder = os.fsencode(tmp_path) + b"/caf\xe9"
    os.mkdir(folder)
    _img(tmp_path / os.fsdecode(b"caf\xe9") / "a.jpg")
    csv = tmp_path / os.fsdecode(b"caf\xe9") / "m.csv"
    csv.write_text("path,lat,lon\na.jpg,37.7,-122.4\n")
    with pytest.raises(ImageError, match=r"m\.csv:2: .*caf\\xe9/a\.jpg: file name is not valid UTF-8"):
        load_manifest(csv)


# --- manifest rows and encodings ---------------------------------------------------------------


def test_manifest_row_with_a_missing_image_names_the_line(tmp_path):
    _img(tmp_path / "a.jpg")
    csv = tmp_path / "m.csv"
    csv.write_text("path,lat,lon\na.jpg,37.7,-122.4\nx.jpg,37.7,-122.4\n")
    with pytest.raises(ImageError) as info:
        load_manifest(csv)
    assert str(info.value) == f"{csv}:3: image 'x.jpg' not found (looked at '{tmp_path / 'x.jpg'}'); fix the path or remove the row"


def test_manifest_row_naming_a_directory_says_so(tmp_path):
    (tmp_path / "d.jpg").mkdir()
    csv = tmp_path / "m.csv"
    csv.write_text("path,lat,lon\nd.jpg,37.7,-122.4\n")
    with pytest.raises(ImageError, match=r"m\.csv:2: image 'd\.jpg' is a directory, not an image file"):
        load_manifest(csv)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "latin-1"])
def test_manifest_not_in_utf8_asks_for_utf8(tmp_path, encoding):
    _img(tmp_path / "café.jpg")
    csv = tmp_path / "m.csv"
    csv.write_bytes("path,lat,lon\ncafé.jpg,37.7,-122.4\n".encode(encoding))
    with pytest.raises(LabelError) as info:
        load_manifest(csv)
    assert str(info.value).startswith(f"{csv}: not UTF-8 text") and "save it as UTF-8" in str(info.value)


def test_utf8_manifest_with_bom_and_blank_lines_counts_lines_right(tmp_path):
    _img(tmp_path / "a.jpg")
    csv = tmp_path / "m.csv"
    csv.write_bytes("path,lat,lon\r\n\r\na.jpg,37.7,-122.4\r\n\r\nb.jpg,37.7,-122.4\r\n".encode("utf-8-sig"))
    with pytest.raises(ImageError, match=r"m\.csv:5: image 'b\.jpg' not found"):
        load_manifest(csv)


@pytest.mark.parametrize(
    "body,column",
    [('path,lat,lon\na.jpg,"37,7",-122.4\n', "lat"), ("path,lat,lon\na.jpg,95,-122.4\n", "")],
)
def test_bad_latlon_cell_names_the_line_once(tmp_path, body, column):
    _img(tmp_path / "a.jpg")
    csv = tmp_path / "comma.csv"
    csv.write_text(body)
    with pytest.raises(LabelError) as info:
        load_manifest(csv)
    assert str(info.value).startswith(f"{csv}:2: ") and str(info.value).count("comma.csv:2:") == 1
    assert f"column '{column}'" in str(info.value) or not column


def test_manifest_row_with_more_fields_than_the_header_is_refused(tmp_path):
    _img(tmp_path / "a.jpg")
    csv = tmp_path / "m.csv"
    csv.write_text("path,lat,lon\na.jpg,37,7,-122,4\n")  # decimal commas
    with pytest.raises(LabelError, match=r"m\.csv:2: 5 fields but the header has 3 columns; quote values"):
        load_manifest(csv)
    csv.write_text("path,lat,lon\na.jpg,37.7,-122.4,,\n")  # trailing empty cells are fine
    assert load_manifest(csv).zone == (10, "S")


# --- ground truth ------------------------------------------------------------------------------


@pytest.fixture()
def gt_sets(tmp_path):
    """Queries q0..q2 and a database d0, d1, a/x.jpg, b/x.jpg (the same name twice)."""
    for name in ("q0.jpg", "q1.jpg", "q2.jpg"):
        _img(tmp_path / "q" / name)
    for name in ("d0.jpg", "d1.jpg", "a/x.jpg", "b/x.jpg"):
        _img(tmp_path / "d" / name)
    return load_image_set(tmp_path / "q"), load_image_set(tmp_path / "d")


def _gt(tmp_path, text, sets):
    gt = tmp_path / "gt.csv"
    gt.write_text(text)
    return load_ground_truth(gt, *sets)


def test_ground_truth_with_comma_separated_positives_is_refused(tmp_path, gt_sets):
    with pytest.raises(LabelError) as info:
        _gt(tmp_path, "query,positives\nq0.jpg,d0.jpg\nq1.jpg,0,1\n", gt_sets)
    assert str(info.value).startswith(f"{tmp_path / 'gt.csv'}:3: 3 fields but the header has 2 columns; separate positives with spaces")


def test_ground_truth_with_a_duplicate_query_names_both_lines(tmp_path, gt_sets):
    with pytest.raises(LabelError) as info:
        _gt(tmp_path, "query,positives\nq0.jpg,0\nq1.jpg,1\nq0.jpg,1\n", gt_sets)
    assert str(info.value).startswith(f"{tmp_path / 'gt.csv'}:4: query 'q0.jpg' already has a row on line 2")


def test_ground_truth_ambiguous_name_asks_for_the_relative_path(tmp_path, gt_sets):
    with pytest.raises(LabelError) as info:
        _gt(tmp_path, "query,positives\nq0.jpg,x.jpg\n", gt_sets)
    assert str(info.value).startswith(f"{tmp_path / 'gt.csv'}:2: database image 'x.jpg' is ambiguous: it matches 2 images (a/x.jpg, b/x.jpg)")
    assert "use the path relative to the database folder" in str(info.value)
    positives = _gt(tmp_path, "query,positives\nq0.jpg,b/x.jpg ./a/x.jpg d1.jpg\n", gt_sets)
    assert [p.tolist() for p in positives] == [[0, 1, 3], [], []]  # sorted paths: a/x, b/x, d0, d1


def test_ground_truth_relative_paths_resolve_against_an_index_database(tmp_path, gt_sets):
    queries, database = gt_sets
    indexed = GeoImageSet(paths=[p.resolve() for p in database.paths], source=tmp_path / "idx" / "database.h5")
    gt = tmp_path / "gt.csv"
    gt.write_text("query,positives\nq2.jpg,b/x.jpg d/d0.jpg\n")
    assert [p.tolist() for p in load_ground_truth(gt, queries, indexed)] == [[], [], [1, 2]]


def test_ground_truth_header_with_spaces(tmp_path, gt_sets):
    positives = _gt(tmp_path, "query, positives\nq1.jpg, d1.jpg 0\n", gt_sets)
    assert [p.tolist() for p in positives] == [[], [0, 3], []]


@pytest.mark.parametrize("token", ["²", "-1", "1.5", "4", "99999999999999999999999"])
def test_ground_truth_weird_positive_names_the_line_and_token(tmp_path, gt_sets, token):
    with pytest.raises(LabelError) as info:
        _gt(tmp_path, f"query,positives\nq0.jpg,0\nq1.jpg,1 {token}\n", gt_sets)
    assert str(info.value).startswith(f"{tmp_path / 'gt.csv'}:3: database image {token!r} is not in the database set")


@pytest.mark.parametrize("encoding", ["utf-16", "cp1252"])
def test_ground_truth_not_in_utf8_asks_for_utf8(tmp_path, gt_sets, encoding):
    gt = tmp_path / "gt.csv"
    gt.write_bytes("query,positives\nq0.jpg,d0.jpg\n# é\n".encode(encoding))
    with pytest.raises(LabelError, match="save it as UTF-8") as info:
        load_ground_truth(gt, *gt_sets)
    assert str(info.value).startswith(f"{gt}: not UTF-8 text")


def test_unreadable_or_unparsable_label_files_are_our_errors(tmp_path, gt_sets):
    with pytest.raises(UsageError, match=r": cannot read it \(Is a directory\); check the path"):
        load_ground_truth(tmp_path, *gt_sets)
    csv = tmp_path / "m.csv"
    csv.write_text('path,lat,lon\n"a.jpg,37.7,-122.4\n' + "x" * 200_000 + "\n")  # an unclosed quote swallows the file
    with pytest.raises(LabelError, match=r"m\.csv:3: not valid CSV \(field larger than field limit .*\); fix the quoting"):
        load_manifest(csv)
