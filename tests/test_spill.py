"""build-index past its memory bound: descriptors spill to an unnamed file next to the output, the PCA
fits on a sample, the index is written chunk by chunk, and the result is the in-memory build's."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from vpr.data.datasets import load_image_set
from vpr.errors import ImageError
from vpr.retrieval.extract import extract_descriptors
from vpr.retrieval.options import ExtractOptions
from vpr.retrieval.build import build_index
from vpr.retrieval.rows import RowReader
from vpr.retrieval.store import load_index


def stored(out) -> np.ndarray:
    with h5py.File(out / "database.h5", "r") as f:
        return f["descriptors"][:]


@pytest.mark.parametrize("pca_dim", [None, 8])
def test_a_spilled_build_equals_the_in_memory_build(places, tiny_model, tmp_path, pca_dim):
    images = load_image_set(places / "database")
    options = ExtractOptions(batch_size=5, num_workers=0)
    memory = build_index(images, tmp_path / "memory", model=tiny_model, options=options, pca_dim=pca_dim)
    spilled = build_index(images, tmp_path / "spilled", model=tiny_model, options=options, pca_dim=pca_dim, spill_bytes=0)
    np.testing.assert_allclose(stored(tmp_path / "spilled"), stored(tmp_path / "memory"), atol=1e-6)
    assert spilled.count == memory.count == len(images) and spilled.dim == memory.dim
    assert sorted(n for n in os.listdir(tmp_path) if not n.endswith(".lock")) == ["memory", "spilled"]  # the spill file had no name
    query = stored(tmp_path / "memory")[:3]
    assert np.array_equal(load_index(tmp_path / "spilled").search(query, 2)[1], load_index(tmp_path / "memory").search(query, 2)[1])


def test_spilled_extraction_returns_a_row_reader_with_the_in_memory_rows_and_skips(places, tiny_model, tmp_path):
    paths = sorted((places / "database").iterdir())[:6]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    paths = paths[:2] + [bad] + paths[2:]
    options = ExtractOptions(batch_size=2, num_workers=0, skip_bad=True)
    memory = extract_descriptors(tiny_model, paths, options)
    spilled = extract_descriptors(tiny_model, paths, options, spill=tmp_path)
    assert isinstance(spilled.descriptors, RowReader) and spilled.descriptors.shape == memory.descriptors.shape
    assert spilled.kept.tolist() == memory.kept.tolist() == [0, 1, 3, 4, 5, 6]
    np.testing.assert_allclose(spilled.descriptors[:], memory.descriptors, atol=1e-6)
    np.testing.assert_allclose(spilled.descriptors[[4, 0]], memory.descriptors[[4, 0]], atol=1e-6)
    with pytest.raises(ImageError, match="bad.jpg"):
        extract_descriptors(tiny_model, paths, ExtractOptions(batch_size=2, num_workers=0), spill=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jpg"]
