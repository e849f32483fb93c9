"""The public Python API: one index, queried with paths, PIL images, arrays or file bytes, gives typed
results whose dicts are what `vpr query --json` and `vpr serve` print."""

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from vpr.api import BuildOptions, ExtractOptions, ImageTooLarge, Index, NotAnImage, QueryResult, build_index, decode_image, new_model
from vpr.data.datasets import load_image_set
from vpr.data.geo import parse_at_name
from vpr.errors import ImageError, UsageError

MATCH_KEYS = ["rank", "id", "path", "distance", "similarity", "utm_east", "utm_north", "lat", "lon", "heading"]


@pytest.fixture(scope="module")
def index_dir(places_index):
    return places_index


@pytest.fixture(scope="module")
def index(index_dir):
    return Index.load(index_dir, device="cpu")


@pytest.fixture(scope="module")
def queries(places):
    return load_image_set(places / "queries").paths


def test_three_lines_find_each_query_place_with_its_position(index, queries):
    results = index.query(queries, k=3)
    assert [r.query for r in results] == [str(q) for q in queries]
    for query, result in zip(queries, results):
        truth = parse_at_name(query.name)
        best = result.matches[0]
        assert (best.utm_east, best.utm_north) == pytest.approx((truth.east - 3.0, truth.north + 2.0))
        assert [m.rank for m in result.matches] == [1, 2, 3]
        assert result.matches[0].distance <= result.matches[1].distance
        assert best.distance == pytest.approx(np.sqrt(2 - 2 * best.similarity), abs=1e-5)
        assert best.lat == pytest.approx(truth.lat, abs=1e-4) and best.lon == pytest.approx(truth.lon, abs=1e-4)
        assert result.position is not None and 0 < result.position.confidence <= 1
        assert abs(result.position.utm_east - truth.east) < 25 and abs(result.position.utm_north - truth.north) < 25


def test_paths_pil_images_arrays_and_bytes_give_the_same_answer(index, queries):
    path = queries[4]
    pil = Image.open(path)
    pil.load()
    inputs = [path, str(path), pil, np.asarray(pil), path.read_bytes()]
    results = index.query(inputs, k=5)
    for result in results[1:]:
        assert [m.id for m in result.matches] == [m.id for m in results[0].matches]
        assert [m.similarity for m in result.matches] == pytest.approx([m.similarity for m in results[0].matches], abs=1e-5)
    assert [r.query for r in results[2:]] == [str(path), "image 3", "image 4"]  # PIL keeps the file name it came from


def test_one_image_alone_is_a_list_of_one(index, queries):
    (result,) = index.query(queries[0], k=2, names=["mine"])
    assert isinstance(result, QueryResult) and result.query == "mine" and len(result.matches) == 2


def test_batch_size_does_not_change_the_answer(index_dir, queries):
    one, many = Index.load(index_dir, device="cpu", batch_size=1), Index.load(index_dir, device="cpu", batch_size=32)
    assert np.allclose(one.describe(queries), many.describe(queries), atol=1e-5)


def test_to_dict_is_the_query_json_shape_and_strict_json(index, queries):
    data = index.query(queries[:2], k=4)[0].to_dict()
    assert list(data) == ["query", "matches", "position"]
    assert [list(m) for m in data["matches"]] == [MATCH_KEYS] * 4
    assert list(data["position"]) == ["utm_east", "utm_north", "lat", "lon", "confidence", "support"]
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    match = data["matches"][0]
    assert index.bundle.database.paths[match["id"]] == index.bundle.database.paths[match["id"]].resolve()
    assert str(index.bundle.database.paths[match["id"]]) == match["path"]


def test_k_larger_than_the_database_returns_all_and_k_below_one_is_refused(index, queries):
    assert len(index.query(queries[0], k=1000)[0].matches) == len(index) == 12
    with pytest.raises(UsageError, match="k 0"):
        index.query(queries[0], k=0)


def test_info_names_model_size_count_and_kind(index):
    info = index.info()
    assert (info["dim"], info["count"], info["index_kind"], info["zone"], info["positions"]) == (64, 12, "flat", [10, "S"], True)
    assert info["model"]["backbone"] == "resnet18"


def test_a_database_without_coordinates_gives_matches_without_position(places, tmp_path, tiny_config, queries):
    plain = tmp_path / "plain"
    plain.mkdir()
    for i, path in enumerate(sorted((places / "database").iterdir())):
        shutil.copy(path, plain / f"{i:02d}.jpg")
    model, _ = new_model(tiny_config.backbone, descriptor_dim=tiny_config.descriptor_dim, input_size=tiny_config.input_size)
    build_index(plain, tmp_path / "idx", model=model, options=BuildOptions(cache=False, extract=ExtractOptions(num_workers=0)))
    (result,) = Index.load(tmp_path / "idx", device="cpu").query(queries[0], k=2)
    assert result.position is None
    assert result.matches[0].utm_east is None and result.matches[0].lat is None and result.matches[0].heading is None
    assert result.to_dict()["position"] is None


def _png(size: tuple[int, int], mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decode_image_names_each_kind_of_bad_upload(queries):
    with pytest.raises(NotAnImage, match="notes.txt: not an image"):
        decode_image(b"just some text", "notes.txt")
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"", "empty.jpg")
    truncated = queries[0].read_bytes()[:300]
    with pytest.raises(ImageError, match="corrupt or truncated") as caught:
        decode_image(truncated, "cut.jpg")
    assert not isinstance(caught.value, NotAnImage)
    with pytest.raises(ImageTooLarge, match="2000x1000 pixels is over the limit of 1,000,000"):
        decode_image(_png((2000, 1000)), "big.png", max_pixels=1_000_000)
    assert decode_image(_png((20, 10), "LA"), "grey.png").mode == "RGB"


def test_unusable_arrays_and_objects_are_refused_with_the_reason(index):
    with pytest.raises(UsageError, match="H x W x 3"):
        index.query(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(UsageError, match="not an image"):
        index.query([{"photo": 1}])
    with pytest.raises(ImageError, match="not found"):
        index.query("no/such/photo.jpg")
