"""Loading image sets: `@` folders, CSV manifests, ground-truth files, positives."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vpr.data.datasets import load_ground_truth, load_image_set, load_manifest, positives_within
from vpr.errors import LabelError, UsageError


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
    except (LabelError, UsageError):
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
