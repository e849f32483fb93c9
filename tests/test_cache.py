"""The descriptor cache: exact round trips, crash leftovers, and memory that does not grow with its size."""

import tracemalloc

import h5py
import numpy as np

from vpr.retrieval import cache as cache_module
from vpr.retrieval.cache import DescriptorCache


def rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def test_descriptors_round_trip_through_parts_and_the_merged_file(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "FLUSH_ROWS", 7)
    data = rows(50, 16)
    keys = [f"img{i}" for i in range(50)]
    store = DescriptorCache(tmp_path / "c", "fp", 16)
    for start in range(0, 50, 5):
        store.append(keys[start:start + 5], data[start:start + 5])
    store.flush()
    assert len(list((tmp_path / "c").glob("part-*.h5"))) > 1
    out = np.zeros((3, 16), dtype=np.float32)
    assert store.fill(["img3", "missing", "img3"], out).tolist() == [0, 2]  # a repeated key is filled twice
    assert np.array_equal(out[[0, 2]], data[[3, 3]]) and not out[1].any()
    store.close()
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [".vpr-owned", "main.h5"]
    reopened = DescriptorCache(tmp_path / "c", "fp", 16)
    out = np.zeros((50, 16), dtype=np.float32)
    wanted = keys[::-1]
    assert reopened.fill(wanted, out).tolist() == list(range(50))
    assert np.array_equal(out, data[::-1])


def test_parts_left_by_a_kill_are_reused_and_the_newest_copy_of_a_key_wins(tmp_path):
    first = DescriptorCache(tmp_path / "c", "fp", 4)
    first.append(["a", "b"], np.ones((2, 4)))
    first.close()
    killed = DescriptorCache(tmp_path / "c", "fp", 4)
    killed.append(["b", "c"], np.full((2, 4), 2.0))
    killed.flush()  # then killed: no close, the part stays beside main.h5
    resumed = DescriptorCache(tmp_path / "c", "fp", 4)
    resumed.append(["d"], np.full((1, 4), 3.0))
    resumed.close()
    with h5py.File(tmp_path / "c" / "main.h5") as f:
        assert sorted(f["keys"].asstr()[:]) == ["a", "b", "c", "d"]  # merged without duplicates
    out = np.zeros((4, 4), dtype=np.float32)
    DescriptorCache(tmp_path / "c", "fp", 4).fill(["a", "b", "c", "d"], out)
    assert out[:, 0].tolist() == [1.0, 2.0, 2.0, 3.0]


def test_a_new_part_never_takes_the_name_of_one_still_on_disk(tmp_path):
    store = DescriptorCache(tmp_path / "c", "fp", 4)
    for i in range(3):
        store.append([f"k{i}"], np.full((1, 4), float(i)))
        store.flush()
    next((tmp_path / "c").glob("part-0000000000-*.h5")).unlink()  # as if a merge was killed while removing parts
    resumed = DescriptorCache(tmp_path / "c", "fp", 4)
    resumed.append(["new"], np.full((1, 4), 9.0))
    resumed.flush()
    out = np.zeros((3, 4), dtype=np.float32)
    assert DescriptorCache(tmp_path / "c", "fp", 4).fill(["k1", "k2", "new"], out).tolist() == [0, 1, 2]
    assert out[:, 0].tolist() == [1.0, 2.0, 9.0]


def test_merge_and_lookup_memory_stays_far_below_the_cache_size(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "FLUSH_ROWS", 4096)
    n, dim = 40_000, 512  # 82 MB of descriptors
    data = rows(4096, dim)
    keys = [f"/photos/{i:08d}.jpg|1234|5678" for i in range(n)]
    store = DescriptorCache(tmp_path / "c", "fp", dim)
    for start in range(0, n, 4096):
        store.append(keys[start:start + 4096], data[: min(4096, n - start)])
    store.flush()
    size = n * dim * 4
    tracemalloc.start()
    store.close()
    _, merge_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out = np.zeros((n, dim), dtype=np.float32)  # the caller's array, which fill writes into
    tracemalloc.start()
    found = DescriptorCache(tmp_path / "c", "fp", dim).fill(keys, out)
    _, fill_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(found) == n and np.array_equal(out[4096:8192], data)
    assert merge_peak < 0.3 * size, f"merge peak {merge_peak / 1e6:.0f} MB for {size / 1e6:.0f} MB of descriptors"
    assert fill_peak < 0.3 * size, f"lookup peak {fill_peak / 1e6:.0f} MB for {size / 1e6:.0f} MB of descriptors"
