"""Silent omissions and false confidence: linked images are indexed or reported, a featureless query claims
no position, `-k` past an approximate index returns the whole database, whitening refuses directions the
data does not span, and the Python API answers bad arguments with vpr's one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli, write_places
from vpr import api
from vpr.data.datasets import GeoImageSet, list_images, load_image_set
from vpr.data.geo import format_at_name
from vpr.errors import ImageError, UsageError, VPRError
from vpr.models.model import ModelConfig, build_model
from vpr.models.pca import fit_pca
from vpr.retrieval.options import ExtractOptions
from vpr.retrieval.build import build_index
from vpr.retrieval.store import write_index

OPTIONS = ExtractOptions(num_workers=0)
NO_CACHE = api.BuildOptions(cache=False, extract=OPTIONS)


def test_images_behind_symlinks_are_indexed_once_and_broken_links_are_reported(places, tmp_path):
    real = sorted((places / "database").iterdir())
    db = tmp_path / "db"
    (db / "sub").mkdir(parents=True)
    os.symlink(real[0], db / real[0].name)  # a linked file
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for path in real[1:4]:
        os.symlink(path, elsewhere / path.name)
    os.symlink(elsewhere, db / "linked")  # a linked folder
    os.symlink(elsewhere, db / "sub" / "again")  # the same folder through a second link: listed once
    os.symlink(db, db / "sub" / "loop")  # a loop back to the top
    assert len(list_images(db)) == 4
    dangling = db / format_at_name(551000.0, 4180000.0, 10, "S")
    os.symlink(tmp_path / "gone.jpg", dangling)
    listed = list_images(db)
    assert len(listed) == 5 and dangling in listed
    model = build_model(ModelConfig(descriptor_dim=16, input_size=(32, 32), layer=3), seed=0)
    with pytest.raises(ImageError, match=f"{dangling.name}: broken symlink"):
        build_index(load_image_set(db), tmp_path / "idx", model=model, options=OPTIONS)
    report = build_index(load_image_set(db), tmp_path / "idx", model=model, options=ExtractOptions(num_workers=0, skip_bad=True))
    assert report.count == 4 and [p.name for p, _ in report.skipped] == [dangling.name]
    assert dangling.name in (tmp_path / "idx" / "skipped.txt").read_text()


def test_a_featureless_query_claims_no_position(tmp_path):
    write_places(tmp_path / "p", 4, seed=1)
    config = ModelConfig(backbone="pixels", head="patchnorm", input_size=(8, 16), patch_size=4)
    api.build_index(tmp_path / "p" / "database", tmp_path / "idx", model=build_model(config), options=NO_CACHE)
    index = api.Index.load(tmp_path / "idx", device="cpu")
    grey = np.full((48, 64, 3), 128, dtype=np.uint8)  # nothing to normalise: a zero descriptor
    result = index.query([grey], k=3)[0]
    assert all(m.similarity == 0.0 for m in result.matches)
    assert result.position is None
    textured = index.query(sorted((tmp_path / "p" / "queries").iterdir())[:1], k=3)[0]
    assert textured.position is not None and textured.position.confidence > 0


def test_k_beyond_an_approximate_index_returns_every_image(tmp_path):
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(400, 32)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    model = build_model(ModelConfig(descriptor_dim=32, input_size=(32, 32), layer=3), seed=0)
    write_index(tmp_path / "idx", model=model, model_pca=None, pca=None, source="test", kind="ivfpq", descriptors=rows,
                database=GeoImageSet(paths=[tmp_path / f"{i}.jpg" for i in range(400)], utm=None, heading=None))
    index = api.Index.load(tmp_path / "idx", device="cpu", nprobe=1)  # a short shortlist: one IVF list
    result = index.search(rows[:2], k=1000)
    assert [len(r.matches) for r in result] == [400, 400]
    assert sorted(m.id for m in result[0].matches) == list(range(400))
    assert result[0].matches[0].id == 0


def test_whitening_refuses_a_dimension_the_descriptors_do_not_span():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(40, 64)).astype(np.float32)
    with pytest.raises(UsageError, match="span only 39 dimensions.*pca_dim 39"):
        fit_pca(rows, 40, whiten=True)
    pca = fit_pca(rows, 39, whiten=True)
    assert float(pca.scale.max()) < 1e3
    assert fit_pca(rows, 40, whiten=False).out_dim == 40  # unwhitened, an empty direction only adds zeros


@pytest.mark.parametrize("option", ["--map", "--cache"])
def test_groups_never_writes_into_the_dataset_s_image_folders(monkeypatch, capsys, tmp_path, option):
    write_places(tmp_path / "city" / "images" / "train", 3, seed=2)
    inside = tmp_path / "city" / "images" / "train" / "database" / ("map.png" if option == "--map" else "groups.h5")
    code, _, err = run_cli(monkeypatch, capsys, "groups", tmp_path / "city" / "images" / "train" / "database",
                           "--min-images-per-class", "1", option, inside)
    assert code == 1 and "lies inside the input" in err and option in err
    assert not inside.exists()


@pytest.fixture(scope="module")
def index(places, tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "idx"
    model = build_model(ModelConfig(descriptor_dim=32, input_size=(48, 64), layer=3), seed=0)
    api.build_index(places / "database", out, model=model, options=NO_CACHE)
    return api.Index.load(out, device="cpu")


def query_path(places) -> Path:
    return sorted((places / "queries").iterdir())[0]


@pytest.mark.parametrize("call, match", [
    (lambda i, q: i.query([q, q], names=["a"]), "2 queries"),
    (lambda i, q: i.query([q], k="5"), "k '5'"),
    (lambda i, q: i.query([q], k=2.5), "k 2.5"),
    (lambda i, q: i.query(None), "NoneType is not an image"),
    (lambda i, q: i.query(5), "int is not an image"),
    (lambda i, q: i.query(np.zeros((8, 8, 3), dtype=np.float32)), r"uint8, got \(8, 8, 3\) float32"),
    (lambda i, q: i.search(np.zeros((1, 7), dtype=np.float32)), "the index takes N x 32"),
    (lambda i, q: i.search(np.zeros(32, dtype=np.float32)), "the index takes N x 32"),
    (lambda i, q: i.search(np.full((1, 32), np.nan, dtype=np.float32)), "NaN"),
    (lambda i, q: i.search(np.zeros((2, 32), dtype=np.float32), names=["a"]), "2 queries"),
    (lambda i, q: api.Index(i.bundle, "cpu", batch_size=-1), "batch_size -1"),
    (lambda i, q: api.Index(i.bundle, "cpu", batch_size="8"), "batch_size '8'"),
    (lambda i, q: api.build_index(5, "out"), "database: a int"),
    (lambda i, q: api.build_index(q.parent, "out", options=api.BuildOptions(extract=api.ExtractOptions(batch_size=0))), "batch_size 0"),
    (lambda i, q: api.build_index(q.parent, "out", options=api.BuildOptions(extract=api.ExtractOptions(num_workers=-1))), "workers -1"),
    (lambda i, q: api.build_index(q.parent, "out", options="fast"), "not BuildOptions"),
    (lambda i, q: api.new_model("resnet18x"), "unknown backbone"),
    (lambda i, q: api.decode_image("abc"), "bytes of an image file"),
])
def test_bad_api_arguments_are_vpr_errors_naming_the_parameter(index, places, call, match):
    with pytest.raises(VPRError, match=match) as info:
        call(index, query_path(places))
    assert "\n" not in str(info.value) and not str(info.value).startswith("--")


def test_an_array_image_of_the_right_kind_is_one_query(index):
    image = np.asarray(Image.new("RGB", (64, 48), (90, 120, 30)))
    assert len(index.query(image, k=2)) == 1
