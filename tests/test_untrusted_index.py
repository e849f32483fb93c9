"""Indexes and checkpoints from disk are validated before use: tampering gives a clear error."""

import json
import shutil

import h5py
import numpy as np
import pytest

from vpr.data.datasets import load_image_set
from vpr.errors import IndexFormatError, UsageError
from vpr.fileio import atomic_file
from vpr.retrieval.options import ExtractOptions
from vpr.retrieval.build import build_index
from vpr.retrieval.store import load_index


@pytest.fixture(scope="module")
def good_index(places, tmp_path_factory, tiny_config):
    from vpr.models.model import build_model

    out = tmp_path_factory.mktemp("good") / "idx"
    build_index(load_image_set(places / "database"), out, model=build_model(tiny_config, seed=0), options=ExtractOptions(num_workers=0))
    return out


@pytest.fixture()
def copy(good_index, tmp_path):
    target = tmp_path / "idx"
    shutil.copytree(good_index, target)
    return target


def _edit_manifest(directory, **changes):
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest.update(changes)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_index_from_another_format_version_is_refused(copy):
    _edit_manifest(copy, format_version=99, vpr_version="9.9")
    with pytest.raises(IndexFormatError, match="format 99 .*rebuild"):
        load_index(copy)


def test_descriptor_size_mismatch_is_refused(copy):
    _edit_manifest(copy, dim=32)
    with pytest.raises(IndexFormatError, match="rebuild"):
        load_index(copy)


def test_a_swapped_model_is_detected(copy, tiny_config):
    from vpr.models.checkpoints import save_checkpoint
    from vpr.models.model import build_model

    save_checkpoint(build_model(tiny_config, seed=5), copy / "model.pt")
    with pytest.raises(IndexFormatError, match="sha256"):
        load_index(copy)


def test_malformed_database_file_is_refused(copy):
    with h5py.File(copy / "database.h5", "a") as f:
        del f["descriptors"]
        f.create_dataset("descriptors", data=np.zeros((3, 64), dtype=np.float64))
    with pytest.raises(IndexFormatError, match="database.h5"):
        load_index(copy)


def test_garbage_manifest_is_refused(copy):
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(IndexFormatError, match="not valid JSON"):
        load_index(copy)


def test_database_of_only_bad_images_is_a_clear_error(tmp_path, tiny_model):
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "a.jpg").write_bytes(b"")
    with pytest.raises(UsageError, match="no readable images"):
        build_index(load_image_set(tmp_path / "db"), tmp_path / "idx", model=tiny_model, options=ExtractOptions(num_workers=0, skip_bad=True))
    assert not (tmp_path / "idx").exists()


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_text("old complete")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old complete"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_an_approximate_index_without_its_faiss_file_is_refused(tmp_path, tiny_model):
    from vpr.data.datasets import GeoImageSet
    from vpr.retrieval.store import write_index

    rng = np.random.default_rng(0)
    descriptors = rng.normal(size=(300, 64)).astype(np.float32)
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    database = GeoImageSet(paths=[tmp_path / f"{i}.jpg" for i in range(300)], utm=None, heading=None)
    write_index(tmp_path / "hnsw", model=tiny_model, model_pca=None, pca=None, database=database,
                descriptors=descriptors, kind="hnsw", source="test")
    assert load_index(tmp_path / "hnsw").search(descriptors[:3], 1)[1][:, 0].tolist() == [0, 1, 2]
    (tmp_path / "hnsw" / "index.faiss").unlink()
    with pytest.raises(IndexFormatError, match="index.faiss is missing; rebuild"):
        load_index(tmp_path / "hnsw")
