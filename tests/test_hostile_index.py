"""An index's files under attack: they load as one generation or not at all, every file is bound to the
manifest, the cache follows image content, and each tampered field is a one-line error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from vpr.data.datasets import GeoImageSet, load_image_set
from vpr.data.geo import format_at_name
from vpr.errors import IndexFormatError
from vpr.models.model import ModelConfig, build_model
from vpr.retrieval.options import ExtractOptions
from vpr.retrieval.build import build_index, cache_dir_for
from vpr.retrieval.store import load_index, write_index

OPTIONS = ExtractOptions(num_workers=0)


def tiny(dim: int) -> ModelConfig:
    return ModelConfig(backbone="resnet18", head="cosplace", descriptor_dim=dim, input_size=(32, 32), layer=3)


@pytest.fixture(scope="module")
def index_with_pca(places, tmp_path_factory):
    out = tmp_path_factory.mktemp("bound") / "idx"
    build_index(load_image_set(places / "database"), out, model=build_model(tiny(32), seed=0), pca_dim=8, options=OPTIONS)
    return out


@pytest.fixture()
def copy(index_with_pca, tmp_path):
    target = tmp_path / "idx"
    shutil.copytree(index_with_pca, target)
    return target


def manifest_of(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def write_manifest(directory: Path, manifest: dict) -> None:
    (directory / "manifest.json").write_text(json.dumps(manifest))


def as_legacy(directory: Path) -> None:
    """What an index of vpr before the generation binding looks like: no generation, file table or norm."""
    manifest = manifest_of(directory)
    for key in ("generation", "files", "max_norm"):
        manifest.pop(key, None)
    write_manifest(directory, manifest)


def refused(directory: Path, match: str) -> str:
    with pytest.raises(IndexFormatError, match=match) as info:
        load_index(directory)
    assert "\n" not in str(info.value)
    return str(info.value)


# ---------------------------------------------------------------- one generation, read during rebuilds

READER = Path(__file__).parent / "acceptance" / "generation_reader.py"  # loads in a loop, reports errors and mixes


@pytest.mark.slow
def test_a_reader_looping_during_real_rebuilds_always_gets_one_whole_generation(places, tmp_path):
    out, stop = tmp_path / "idx", tmp_path / "stop"
    images = load_image_set(places / "database")
    models = [build_model(tiny(64), seed=0), build_model(tiny(32), seed=1)]  # every rebuild changes model and size
    build_index(images, out, model=models[0], options=OPTIONS)
    reader = subprocess.Popen([sys.executable, str(READER), str(out), str(stop)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    tally = Path(f"{stop}.loads")
    try:
        while not tally.exists() or tally.stat().st_size == 0:  # the reader imports torch, then loads once
            assert reader.poll() is None, reader.stderr.read()
            time.sleep(0.1)
        start = tally.stat().st_size
        for i in range(200):  # rebuild until the reader has loaded 30 times during the rebuilds
            build_index(images, out, model=models[(i + 1) % 2], options=OPTIONS)
            if tally.stat().st_size - start >= 30:
                break
    finally:
        stop.touch()
        stdout, stderr = reader.communicate(timeout=120)
    assert reader.returncode == 0, stderr
    report = json.loads(stdout)
    assert report["loads"] >= 30, report
    assert report["error_count"] == 0 and report["mixed"] == 0, report


# ---------------------------------------------------------------- the descriptor cache follows image content

def test_two_images_swapped_keeping_size_and_mtime_are_recomputed_not_served_from_the_cache(tmp_path):
    """Same-size BMPs (as a tar restores them) swapped with their mtimes kept: each row follows its content."""
    folder = tmp_path / "db"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [format_at_name(550000.0 + 90 * i, 4180000.0, 10, "S") for i in range(2)]
    for name in names:
        pixels = np.asarray(Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((32, 32), Image.BICUBIC))
        Image.fromarray(pixels).save((folder / name).with_suffix(".bmp"))
    a, b = sorted(folder.iterdir())
    assert a.stat().st_size == b.stat().st_size
    model = build_model(tiny(32), seed=0)
    out = tmp_path / "idx"
    build_index(load_image_set(folder), out, model=model, options=OPTIONS, cache=cache_dir_for(out))
    before = np.asarray(load_index(out).descriptors)
    times = [(p.stat().st_atime_ns, p.stat().st_mtime_ns) for p in (a, b)]
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    for path, stamp in zip((a, b), times):
        os.utime(path, ns=stamp)
    report = build_index(load_image_set(folder), out, model=model, options=OPTIONS, cache=cache_dir_for(out))
    after = np.asarray(load_index(out).descriptors)
    assert report.reused == 0
    np.testing.assert_allclose(after, before[::-1], atol=1e-6)  # each row moved with its image's content
    unchanged = build_index(load_image_set(folder), out, model=model, options=OPTIONS, cache=cache_dir_for(out))
    assert unchanged.reused == 2


# ---------------------------------------------------------------- every file bound to the manifest

def test_nan_in_pca_h5_is_refused_with_and_without_the_file_table(copy):
    with h5py.File(copy / "pca.h5", "a") as f:
        f["mean"][0] = np.nan
    refused(copy, "pca.h5: does not match the manifest's sha256")
    as_legacy(copy)
    refused(copy, "pca.h5: holds NaN or infinite values")


def test_another_index_s_database_h5_is_refused(copy, places, tmp_path):
    other = tmp_path / "other"
    build_index(load_image_set(places / "database"), other, model=build_model(tiny(32), seed=7), pca_dim=8, options=OPTIONS)
    shutil.copy(other / "database.h5", copy / "database.h5")
    refused(copy, "database.h5: belongs to another build of the index")


def test_a_descriptor_row_of_1e30_is_refused_flat_at_load(copy):
    with h5py.File(copy / "database.h5", "a") as f:
        f["descriptors"][3] = 1e30
    refused(copy, "norm .* longer than any the index was built with")


def ivfpq_index(directory: Path, model, count: int = 400, dim: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(count, dim)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    database = GeoImageSet(paths=[directory.parent / f"{i}.jpg" for i in range(count)], utm=None, heading=None)
    write_index(directory, model=model, model_pca=None, pca=None, database=database, descriptors=rows, kind="ivfpq",
                source="test")
    return rows


def test_a_reordered_index_faiss_is_refused(tmp_path):
    """index.faiss of the same database in another row order: every id would name another image."""
    model = build_model(tiny(32), seed=0)
    rows = ivfpq_index(tmp_path / "a", model)
    write_index(tmp_path / "b", model=model, model_pca=None, pca=None,
                database=GeoImageSet(paths=[tmp_path / f"{i}.jpg" for i in range(len(rows))], utm=None, heading=None),
                descriptors=np.roll(rows, 1, axis=0), kind="ivfpq", source="test")
    shutil.copy(tmp_path / "b" / "index.faiss", tmp_path / "a" / "index.faiss")
    refused(tmp_path / "a", "index.faiss: ")


def test_a_descriptor_row_of_1e30_is_refused_by_a_lazy_index_when_read(tmp_path):
    rows = ivfpq_index(tmp_path / "a", build_model(tiny(32), seed=0))
    with h5py.File(tmp_path / "a" / "database.h5", "a") as f:
        f["descriptors"][0] = 1e30
    bundle = load_index(tmp_path / "a")  # the rows stay on disk: the altered one is caught when the search reads it
    with pytest.raises(IndexFormatError, match="longer than any the index was built with"):
        bundle.search(rows[:1], 5)


def test_a_file_of_another_size_than_the_manifest_says_is_refused(copy):
    with open(copy / "database.h5", "ab") as f:
        f.write(b"\0" * 16)
    refused(copy, "database.h5: .* bytes, the manifest says")


# ---------------------------------------------------------------- tampered fields: one line each

@pytest.mark.parametrize("zone", [[10.5, "S"], [99, "S"], ["10", "S"], [10, "I"], [10], "10S", [10, None], [True, "S"]])
def test_a_bad_zone_in_the_manifest_is_refused(copy, zone):
    manifest = manifest_of(copy)
    manifest["zone"] = zone
    write_manifest(copy, manifest)
    refused(copy, "field 'zone'")


def test_a_deeply_nested_manifest_is_refused(copy):
    (copy / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(copy, "not valid JSON")


@pytest.mark.parametrize("field, value", [("dim", "32"), ("count", -1), ("dim", True), ("pca_dim", "8"), ("files", []),
                                          ("max_norm", "big"), ("index_kind", ["flat"])])
def test_a_manifest_field_of_the_wrong_kind_is_refused(copy, field, value):
    manifest = manifest_of(copy)
    manifest[field] = value
    write_manifest(copy, manifest)
    refused(copy, f"field '{field}'|unknown index kind")


@pytest.mark.parametrize("dataset, data", [("paths", np.arange(12)), ("utm", np.array([["a", "b"]] * 12, dtype="S1")),
                                           ("heading", np.array(["n"] * 12, dtype="S1"))])
def test_wrong_dtypes_in_database_h5_are_refused(copy, dataset, data):
    as_legacy(copy)
    with h5py.File(copy / "database.h5", "a") as f:
        del f[dataset]
        f[dataset] = data
    refused(copy, f"database.h5: {dataset}|database.h5: paths are")


@pytest.mark.parametrize("damage", ["missing mean", "wrong shape", "not hdf5", "no whiten"])
def test_a_malformed_pca_h5_is_refused(copy, damage):
    as_legacy(copy)
    if damage == "not hdf5":
        (copy / "pca.h5").write_bytes(b"\x89HDF garbage" * 10)
    else:
        with h5py.File(copy / "pca.h5", "a") as f:
            if damage == "missing mean":
                del f["mean"]
            elif damage == "wrong shape":
                del f["scale"]
                f["scale"] = np.ones(3, dtype=np.float32)
            else:
                del f.attrs["whiten"]
    refused(copy, "pca.h5: ")


def test_a_corrupt_index_faiss_is_refused(tmp_path):
    ivfpq_index(tmp_path / "a", build_model(tiny(32), seed=0))
    as_legacy(tmp_path / "a")
    size = (tmp_path / "a" / "index.faiss").stat().st_size
    (tmp_path / "a" / "index.faiss").write_bytes(b"\x00garbage" * (size // 8))
    refused(tmp_path / "a", "index.faiss: not a readable FAISS index")


@pytest.mark.parametrize("attr", ["min_side", "max_side"])
def test_local_features_with_absurd_working_sizes_are_refused(places, tmp_path, attr):
    pytest.importorskip("cv2")
    from vpr.retrieval.answer import answer
    from vpr.retrieval.options import AnswerOptions
    from vpr.retrieval.options import LocalFeatureConfig
    from vpr.retrieval.options import RerankOptions

    out = tmp_path / "idx"
    build_index(load_image_set(places / "database"), out, model=build_model(tiny(32), seed=0), options=OPTIONS,
                local_features=LocalFeatureConfig(max_keypoints=50))
    as_legacy(out)
    with h5py.File(out / "local_features.h5", "a") as f:
        f.attrs[attr] = 30000
        if attr == "min_side":
            f.attrs["max_side"] = 30000
    bundle = load_index(out)
    queries = load_image_set(places / "queries").paths[:1]
    with pytest.raises(IndexFormatError, match="local feature"):
        answer(bundle, np.asarray(bundle.descriptors[:1]), 3, AnswerOptions(rerank=RerankOptions(k=3)), query_paths=queries)
