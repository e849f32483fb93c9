"""The index: a query finds its own place; a saved index reloads to identical results."""

import json
import shutil
from dataclasses import replace

import h5py
import numpy as np
import pytest

from vpr.data.datasets import load_image_set
from vpr.errors import ImageError, IndexFormatError
from vpr.evaluation.evaluate import evaluate
from vpr.evaluation.recall import recall_at_n
from vpr.retrieval.extract import extract_descriptors
from vpr.retrieval.options import ExtractOptions
from vpr.retrieval.search import build_faiss_index, faiss_search, torch_search, write_faiss_index
from vpr.api import Index
from vpr.retrieval.build import build_index, describe
from vpr.retrieval.store import load_index

OPTIONS = ExtractOptions(num_workers=0)  # the machine's cores are shared: decode in the main process


@pytest.fixture(scope="module")
def built(places, tmp_path_factory, tiny_config):
    from vpr.models.model import build_model

    out = tmp_path_factory.mktemp("idx") / "places"
    build_index(load_image_set(places / "database"), out, model=build_model(tiny_config, seed=0), options=OPTIONS)
    return out


def test_each_query_retrieves_its_own_place_first(built, places):
    index = Index.load(built, device="cpu")
    queries = load_image_set(places / "queries")
    for query, result in zip(queries.paths, index.query(queries.paths, k=3)):
        matches = result.matches
        assert matches[0].utm_east is not None
        assert abs(matches[0].utm_east - (float(query.name.split("@")[1]) - 3.0)) < 1e-6
        assert matches[0].distance <= matches[1].distance


def test_recall_on_the_place_set_is_perfect(built, places):
    report = evaluate(load_index(built), load_image_set(places / "queries"), ns=(1, 5), options=OPTIONS)
    assert report.recalls == {1: 100.0, 5: 100.0}
    assert report.num_queries == 12 and report.num_with_positives == 12


def test_recall_with_jpegs_decoded_on_the_device_is_the_same(built, places):
    """What `eval --gpu-decode` runs, here with torchvision's decoder on the CPU."""
    options = replace(OPTIONS, decode_on_device=True)
    report = evaluate(load_index(built), load_image_set(places / "queries"), ns=(1, 5), options=options)
    assert report.recalls == {1: 100.0, 5: 100.0}


def test_query_descriptors_keep_one_row_per_image_even_with_skip_bad(built, places, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageError, match="bad.jpg"):
        describe(load_index(built), [load_image_set(places / "queries").paths[0], bad], replace(OPTIONS, skip_bad=True))


def test_weights_are_hashed_only_for_a_cache_and_once_per_call(built, places, tmp_path, tiny_model, monkeypatch):
    import vpr.retrieval.extract as extract

    calls = []
    real = extract.model_fingerprint
    monkeypatch.setattr(extract, "model_fingerprint", lambda model: calls.append(1) or real(model))
    paths = load_image_set(places / "database").paths[:3]
    extract_descriptors(tiny_model, paths, OPTIONS)
    describe(load_index(built), paths, OPTIONS)
    assert calls == []
    extract_descriptors(tiny_model, paths, replace(OPTIONS, batch_size=1), cache=tmp_path / "cache")
    assert calls == [1]


def test_reloaded_index_gives_identical_results(built, places):
    queries = load_image_set(places / "queries").paths
    first, second = load_index(built), load_index(built)
    d1, d2 = describe(first, queries, OPTIONS), describe(second, queries, OPTIONS)
    assert np.array_equal(d1, d2)
    s1, i1 = first.search(d1, 5)
    s2, i2 = second.search(d2, 5)
    assert np.array_equal(i1, i2) and np.array_equal(s1, s2)


def test_manifest_records_the_model_and_sizes(built):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["count"] == 12 and manifest["dim"] == 64 and manifest["index_kind"] == "flat"
    assert manifest["model"]["backbone"] == "resnet18" and len(manifest["model_sha256"]) == 64


def test_pca_index_applies_the_same_projection_to_queries(places, tmp_path, tiny_model):
    out = tmp_path / "pca"
    build_index(load_image_set(places / "database"), out, model=tiny_model, pca_dim=8, pca_whiten=True, options=OPTIONS)
    bundle = load_index(out)
    assert bundle.dim == 8 and bundle.pca is not None
    queries = describe(bundle, load_image_set(places / "queries").paths, OPTIONS)
    assert queries.shape == (12, 8)
    assert np.allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)


def test_torch_search_matches_faiss_exact_search():
    rng = np.random.default_rng(0)
    db = rng.normal(size=(500, 32)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = db[:20] + 0.05 * rng.normal(size=(20, 32)).astype(np.float32)
    _, faiss_idx = faiss_search(build_faiss_index(db, "flat"), q, 10)
    _, torch_idx = torch_search(db, q, 10, chunk=64)
    assert np.array_equal(faiss_idx, torch_idx)


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_approximate_indexes_find_near_duplicates(kind):
    rng = np.random.default_rng(0)
    db = rng.normal(size=(2000, 64)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    _, idx = faiss_search(build_faiss_index(db, kind), db[:100], 1)
    assert np.mean(idx[:, 0] == np.arange(100)) >= 0.9


def test_extraction_resumes_from_its_cache(places, tmp_path, tiny_model):
    paths = load_image_set(places / "database").paths
    cache = tmp_path / "cache"
    first = extract_descriptors(tiny_model, paths[:5], OPTIONS, cache=cache)
    second = extract_descriptors(tiny_model, paths, OPTIONS, cache=cache)
    fresh = extract_descriptors(tiny_model, paths, OPTIONS)
    assert first.reused == 0 and second.reused == 5
    assert np.allclose(second.descriptors, fresh.descriptors, atol=1e-5)  # other batch sizes: other kernels
    assert sorted(p.name for p in cache.iterdir()) == [".vpr-owned", "main.h5"]  # parts merged on close
    with h5py.File(cache / "main.h5") as f:
        assert f["descriptors"].shape == (12, 64)


def test_cache_of_another_model_is_not_reused(places, tmp_path, tiny_model, tiny_config):
    from vpr.models.model import build_model

    paths = load_image_set(places / "database").paths[:3]
    extract_descriptors(tiny_model, paths, OPTIONS, cache=tmp_path / "cache")
    other = extract_descriptors(build_model(tiny_config, seed=1), paths, OPTIONS, cache=tmp_path / "cache")
    assert other.reused == 0


def test_bad_image_stops_extraction_unless_skipped(places, tmp_path, tiny_model):
    paths = load_image_set(places / "database").paths[:3]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageError, match="bad.jpg"):
        extract_descriptors(tiny_model, [paths[0], bad, paths[1]], OPTIONS)
    result = extract_descriptors(tiny_model, [paths[0], bad, paths[1]], replace(OPTIONS, skip_bad=True))
    assert result.kept.tolist() == [0, 2] and result.skipped[0][0] == bad


def test_recall_at_n_hand_computed():
    predictions = np.array([[3, 1, 2], [0, 4, 5], [7, 8, 9], [2, 2, 2]])
    positives = [np.array([1]), np.array([0, 9]), np.array([], dtype=np.int64), np.array([5])]
    # query 0 hits at rank 2, query 1 at rank 1, query 2 has no positive (a miss), query 3 never hits.
    assert recall_at_n(predictions, positives, (1, 2, 3)) == {1: 25.0, 2: 50.0, 3: 50.0}


def test_an_incomplete_index_directory_is_refused(built, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text((built / "manifest.json").read_text())
    with pytest.raises(IndexFormatError, match="missing model.pt, database.h5"):
        load_index(broken)
    with pytest.raises(IndexFormatError, match="no index here"):
        load_index(tmp_path / "nothing")


def test_a_flat_index_from_before_carries_an_unused_faiss_file_and_still_loads(built, places, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(built, old)
    bundle = load_index(built)
    write_faiss_index(build_faiss_index(bundle.descriptors, "flat"), old / "index.faiss")  # what earlier versions wrote
    queries = describe(bundle, load_image_set(places / "queries").paths, OPTIONS)
    assert np.array_equal(load_index(old).search(queries, 5)[1], bundle.search(queries, 5)[1])
