"""Search past RAM: lazy database rows, streamed index builds, sharded exact search."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from vpr.data.datasets import GeoImageSet
from vpr.retrieval.answer import answer
from vpr.retrieval.options import AnswerOptions, Expansion
from vpr.retrieval.search import (
    empty_faiss_index, exact_search, faiss_available, merge_topk, sharded_search, shard_database, torch_search,
    training_rows,
)
from vpr.retrieval.rows import RowReader
from vpr.retrieval.store import load_index, write_index, write_index_from_file

pytestmark = pytest.mark.skipif(not faiss_available(), reason="needs FAISS")
N, DIM = 1000, 16


def unit_rows(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class CountingRows:
    """An array that records every row it is asked for."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.read = array, array.shape, []

    def __getitem__(self, key):
        self.read.extend(np.arange(len(self.array))[key].ravel().tolist())
        return self.array[key]


def database(n: int) -> GeoImageSet:
    utm = np.stack([np.arange(n) * 10.0, np.zeros(n)], axis=1)
    return GeoImageSet(paths=[Path(f"/data/img{i}.jpg") for i in range(n)], utm=utm, heading=np.zeros(n))


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return unit_rows(N, 0)


@pytest.fixture(scope="module")
def ivfpq(tmp_path_factory, vectors, tiny_config_module) -> Path:
    from vpr.models.model import build_model

    out = tmp_path_factory.mktemp("scale") / "ivfpq"
    write_index(out, model=build_model(tiny_config_module, seed=0), model_pca=None, pca=None, database=database(N),
                descriptors=vectors, kind="ivfpq", source="synthetic")
    return out


@pytest.fixture(scope="module")
def tiny_config_module():
    from vpr.models.model import ModelConfig

    return ModelConfig(backbone="resnet18", head="cosplace", descriptor_dim=DIM, input_size=(48, 64))


def test_ivfpq_loads_lazily_and_answers_like_the_in_memory_database(ivfpq, vectors):
    lazy, eager = load_index(ivfpq), load_index(ivfpq, lazy=False)
    assert isinstance(lazy.descriptors, RowReader) and isinstance(eager.descriptors, np.ndarray)
    queries = unit_rows(20, 1)
    for options in (AnswerOptions(), AnswerOptions(qe=Expansion(n=2))):
        a, b = answer(lazy, queries, 5, options), answer(eager, queries, 5, options)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.similarities, b.similarities)
    np.testing.assert_array_equal(lazy.descriptors[[[5, 2], [5, -1]]], vectors[[[5, 2], [5, -1]]])
    np.testing.assert_array_equal(lazy.descriptors[10:20], vectors[10:20])


def test_reranking_reads_only_the_shortlisted_rows(ivfpq):
    bundle = load_index(ivfpq)
    counting = CountingRows(np.asarray(bundle.descriptors[:]))
    bundle.descriptors = RowReader(counting, ivfpq / "database.h5")
    queries = unit_rows(3, 2)
    _, candidates = bundle.faiss_index.search(queries, 300)
    bundle.search(queries, 5)
    assert sorted(counting.read) == sorted(set(candidates[candidates >= 0].tolist()))  # each row once, no others


def test_a_build_from_a_file_in_chunks_equals_the_one_shot_build(tmp_path, ivfpq, vectors, tiny_config_module):
    from vpr.models.model import build_model

    source = tmp_path / "descriptors.h5"
    with h5py.File(source, "w") as f:
        f.create_dataset("x", data=vectors, chunks=(64, DIM))  # chunked: read through h5py, not memory-mapped
    model = build_model(tiny_config_module, seed=0)
    out = write_index_from_file(tmp_path / "streamed", source, dataset="x", model=model, model_pca=None, pca=None,
                                database=database(N), kind="ivfpq", source="synthetic", chunk=300)
    one_shot, streamed = load_index(ivfpq), load_index(out)
    np.testing.assert_array_equal(streamed.descriptors[:], vectors)
    queries = unit_rows(10, 3)
    for a, b in zip(one_shot.search(queries, 5), streamed.search(queries, 5)):
        np.testing.assert_array_equal(a, b)
    assert (out / "index.faiss").read_bytes() == (ivfpq / "index.faiss").read_bytes()  # same sample, seed, codes
    faiss = pytest.importorskip("faiss")
    whole = empty_faiss_index(N, DIM, "ivfpq", vectors[training_rows(N, "ivfpq")])
    whole.add(vectors)  # every row in one call
    assert faiss.serialize_index(whole).tobytes() == (out / "index.faiss").read_bytes()


def test_large_databases_read_paths_on_demand(ivfpq, monkeypatch):
    import vpr.retrieval.index_files as index_files
    from vpr.retrieval.rows import StoredPaths

    monkeypatch.setattr(index_files, "LAZY_PATHS_ROWS", 100)
    paths = load_index(ivfpq).database.paths
    assert isinstance(paths, StoredPaths) and len(paths) == N
    assert [paths[0], paths[-1], *paths[3:5]] == [Path("/data/img0.jpg"), Path(f"/data/img{N - 1}.jpg"),
                                                   Path("/data/img3.jpg"), Path("/data/img4.jpg")]


def test_file_rows_read_runs_of_rows_at_their_offset(ivfpq, vectors):
    rows = load_index(ivfpq).descriptors.source
    np.testing.assert_array_equal(rows[np.array([0, 1, 2, 7, 9, 10])], vectors[[0, 1, 2, 7, 9, 10]])
    np.testing.assert_array_equal(rows[5:11:2], vectors[5:11:2])
    np.testing.assert_array_equal(rows[N - 1], vectors[N - 1])


def test_a_non_finite_row_is_refused_when_read(tmp_path, vectors, tiny_config_module):
    from vpr.errors import IndexFormatError

    path = tmp_path / "bad.h5"
    bad = vectors.copy()
    bad[7, 0] = np.nan
    with h5py.File(path, "w") as f:
        f.create_dataset("descriptors", data=bad)
    rows = RowReader(h5py.File(path, "r")["descriptors"], path)
    rows[[1, 2]]
    with pytest.raises(IndexFormatError, match="NaN"):
        rows[[1, 7]]


@pytest.mark.parametrize("shards", [1, 2, 3, 7])
def test_sharded_exact_search_equals_unsharded(vectors, shards):
    queries = unit_rows(25, 4)
    sims, idx = torch_search(vectors, queries, 10)
    shard_sims, shard_idx = sharded_search(shard_database(vectors, ["cpu"] * shards, chunk=150), queries, 10)
    np.testing.assert_array_equal(shard_idx, idx)
    np.testing.assert_allclose(shard_sims, sims, rtol=0, atol=1e-6)


def test_exact_search_on_a_row_reader_merges_its_chunks_exactly(ivfpq, vectors):
    queries = unit_rows(15, 5)
    sims, idx = exact_search(load_index(ivfpq).descriptors, queries, 8, chunk=111)
    ref_sims, ref_idx = exact_search(vectors, queries, 8)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, ref_sims, rtol=0, atol=1e-6)


def test_merge_topk_keeps_the_best_of_all_parts_and_drops_missing():
    a = (np.array([[0.9, 0.1]], np.float32), np.array([[3, 4]]))
    b = (np.array([[0.5, 7.0]], np.float32), np.array([[8, -1]]))
    sims, idx = merge_topk([a, b], 3)
    np.testing.assert_array_equal(idx, [[3, 8, 4]])
    np.testing.assert_allclose(sims, [[0.9, 0.5, 0.1]])


def test_sequence_matching_refuses_a_lazy_database_past_its_memory_bound(ivfpq, monkeypatch):
    import vpr.retrieval.answer as answering
    from vpr.errors import UsageError
    from vpr.retrieval.options import SequenceOptions

    monkeypatch.setattr(answering, "SEQUENCE_MAX_BYTES", N * DIM * 4 - 1)
    with pytest.raises(UsageError, match="sequence"):
        answer(load_index(ivfpq), unit_rows(4, 6), 3, AnswerOptions(sequence=SequenceOptions()))
