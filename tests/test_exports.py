"""Pairs and global features for hloc, COLMAP and kapture (vpr.retrieval.exports), each read back the way the tool
reads it, and the ownership rules: a user's file is never replaced, vpr's own is replaced on a rerun."""

from __future__ import annotations

import errno
import os
import sys

import h5py
import numpy as np
import pytest

from vpr.errors import DependencyError, OutputError, UsageError
from vpr.retrieval import exports
from vpr.retrieval.exports import relative_names, write_global_features, write_pairs

QUERIES = ["query/q1.jpg", "query/q2.jpg"]
DB = ["db/a.jpg", "db/b.jpg", "db/sub/c.jpg", "query/q1.jpg"]
INDICES = np.array([[3, 2, 0, 1], [1, -1, 0, 2]])  # q1's first match is itself; q2 has a missing slot
SCORES = np.array([[1.0, 0.9, 0.5, -0.2], [0.8, np.nan, 0.3, 0.1]], dtype=np.float32)


def hloc_pairs(path) -> list[tuple[str, str]]:
    """hloc's `parse_retrieval`: every non-empty line is `q r` split at whitespace."""
    lines = [line for line in path.read_text().rstrip("\n").split("\n") if line]
    return [tuple(line.split()) for line in lines]


def colmap_pairs(path) -> list[tuple[str, str]]:
    """COLMAP's `ReadImagePairsText`: trimmed lines, `#` and empty lines skipped, names split at one space."""
    pairs = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            first, _, rest = line.partition(" ")
            pairs.append((first, rest.partition(" ")[0]))
    return pairs


def hloc_descriptors(path, names) -> np.ndarray:
    """hloc's `get_descriptors` and `list_h5_names`: the image names are the groups holding a dataset."""
    with h5py.File(str(path), "r", libver="latest") as fd:
        found = set()
        fd.visititems(lambda _, obj: found.add(obj.parent.name.strip("/")) if isinstance(obj, h5py.Dataset) else None)
        assert found == set(names)
        return np.stack([fd[n]["global_descriptor"].__array__() for n in names], 0)


def unit_rows(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class Rows:
    """A lazy row source like the index's RowReader: `shape`, slices only, and the largest block read."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.largest = array, array.shape, 0

    def __getitem__(self, key: slice) -> np.ndarray:
        assert isinstance(key, slice)
        block = self.array[key]
        self.largest = max(self.largest, len(block))
        return block


def test_relative_names(tmp_path):
    root = tmp_path / "images"
    paths = [root / "a.jpg", root / "sub" / "b.jpg", str(root / "x" / ".." / "c.jpg")]
    assert relative_names(paths, root) == ["a.jpg", "sub/b.jpg", "c.jpg"]
    csv = root / "list.csv"
    csv.parent.mkdir(parents=True)
    csv.write_text("path\n")
    assert relative_names([root / "a.jpg"], csv) == ["a.jpg"]  # a CSV stands for its folder
    for outside in (tmp_path / "other" / "a.jpg", root, tmp_path / "images2" / "a.jpg"):
        with pytest.raises(UsageError, match="lies outside root") as caught:
            relative_names([outside], root)
        assert "\n" not in str(caught.value)


def test_hloc_and_colmap_pairs(tmp_path):
    for fmt, read in (("hloc", hloc_pairs), ("colmap", colmap_pairs)):
        out = tmp_path / f"pairs-{fmt}.txt"
        assert write_pairs(out, QUERIES, DB, INDICES, SCORES, fmt) == 6
        assert read(out) == [("query/q1.jpg", "db/sub/c.jpg"), ("query/q1.jpg", "db/a.jpg"), ("query/q1.jpg", "db/b.jpg"),
                             ("query/q2.jpg", "db/b.jpg"), ("query/q2.jpg", "db/a.jpg"), ("query/q2.jpg", "db/sub/c.jpg")]
        assert all(len(line.split(" ")) == 2 for line in out.read_text().splitlines())
    out = tmp_path / "top.txt"
    assert write_pairs(out, QUERIES, DB, INDICES, SCORES, "hloc", num_matched=2, min_score=0.2) == 4
    assert hloc_pairs(out) == [("query/q1.jpg", "db/sub/c.jpg"), ("query/q1.jpg", "db/a.jpg"),
                               ("query/q2.jpg", "db/b.jpg"), ("query/q2.jpg", "db/a.jpg")]
    with pytest.raises(UsageError, match="num_matched 0"):
        write_pairs(out, QUERIES, DB, INDICES, SCORES, "hloc", num_matched=0)
    with pytest.raises(UsageError, match="rows outside the 4 database names"):
        write_pairs(out, QUERIES, DB, INDICES + 1, SCORES, "hloc")


def test_kapture_pairsfile(tmp_path):
    from kapture.io.csv import get_version_from_csv_file, table_from_file

    out = tmp_path / "pairs.txt"
    write_pairs(out, QUERIES, DB, INDICES, SCORES, "kapture")
    assert get_version_from_csv_file(str(out)) == "1.1"
    with open(out) as f:
        rows = table_from_file(f)
    hloc = tmp_path / "hloc.txt"
    write_pairs(hloc, QUERIES, DB, INDICES, SCORES, "hloc")
    assert [(q, m) for q, m, _ in rows] == hloc_pairs(hloc)  # the same pairs, with their scores
    assert [np.float32(s) for _, _, s in rows] == [np.float32(v) for v in (0.9, 0.5, -0.2, 0.8, 0.3, 0.1)]


@pytest.mark.parametrize("fmt, name", [("hloc", "db/a b.jpg"), ("colmap", "db/a\tb.jpg"), ("kapture", "db/a,b.jpg"),
                                       ("kapture", " db/a.jpg"), ("hloc", "#a.jpg"), ("kapture", "a\nb.jpg")])
def test_names_the_tool_would_misread_are_refused(tmp_path, fmt, name):
    out = tmp_path / "pairs.txt"
    with pytest.raises(UsageError, match="cannot go into a"):
        write_pairs(out, [name], DB, np.array([[0]]), np.array([[0.5]]), fmt)
    assert not out.exists()


def test_pairs_ownership(tmp_path):
    out = tmp_path / "pairs.txt"
    out.write_text("query/q1.jpg db/a.jpg\n")  # a list the user (or hloc) wrote
    for fmt in exports.PAIRS_FORMATS:
        with pytest.raises(OutputError, match="not a pairs file written by vpr"):
            write_pairs(out, QUERIES, DB, INDICES, SCORES, fmt)
    assert out.read_text() == "query/q1.jpg db/a.jpg\n"
    mine = tmp_path / "mine.txt"
    write_pairs(mine, QUERIES, DB, INDICES, SCORES, "hloc")
    assert write_pairs(mine, QUERIES, DB, INDICES, SCORES, "colmap", num_matched=1) == 2  # vpr's own: replaced
    assert len(hloc_pairs(mine)) == 2
    assert os.getxattr(mine, "user.vpr").startswith(b"pairs sha256=")
    assert sorted(os.listdir(tmp_path)) == ["mine.txt", "pairs.txt"]  # no temporary left behind
    with open(mine, "a") as f:
        f.write("query/q1.jpg db/mine.jpg\n")  # edited since vpr wrote it: the user's now
    with pytest.raises(OutputError, match="not a pairs file written by vpr"):
        write_pairs(mine, QUERIES, DB, INDICES, SCORES, "hloc")
    link = tmp_path / "link.txt"
    link.symlink_to(out)
    with pytest.raises(OutputError, match="link"):
        write_pairs(link, QUERIES, DB, INDICES, SCORES, "hloc")


def test_pairs_where_the_filesystem_keeps_no_tags(tmp_path, monkeypatch):
    def unsupported(*args):
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))

    monkeypatch.setattr(os, "setxattr", unsupported)
    monkeypatch.setattr(os, "getxattr", unsupported)
    out = tmp_path / "pairs.txt"
    write_pairs(out, QUERIES, DB, INDICES, SCORES, "hloc")
    with pytest.raises(OutputError, match="vpr cannot tell it wrote it") as caught:
        write_pairs(out, QUERIES, DB, INDICES, SCORES, "hloc")
    assert "`out`" in caught.value.args[0] and "\n" not in str(caught.value)
    kapture_file = tmp_path / "kapture.txt"
    write_pairs(kapture_file, QUERIES, DB, INDICES, SCORES, "kapture")
    write_pairs(kapture_file, QUERIES, DB, INDICES, SCORES, "kapture", num_matched=1)  # its comment proves it
    assert len(kapture_file.read_text().splitlines()) == 3 + 2


def test_hloc_global_features(tmp_path, monkeypatch):
    names = ["db/a.jpg", "db/sub/c.jpg", "top.jpg", "db/sub/d.jpg"]
    rows = Rows(unit_rows(4))
    monkeypatch.setattr(exports, "CHUNK_BYTES", 2 * 8 * 4)  # two rows a block
    out = tmp_path / "global.h5"
    assert write_global_features(out, names, rows, "hloc") == out
    assert rows.largest == 2
    read = hloc_descriptors(out, names)
    assert read.dtype == np.float32 and np.array_equal(read, rows.array)
    with h5py.File(out, "r") as f:
        assert isinstance(f["db"]["sub"], h5py.Group) and f["db/sub/c.jpg/global_descriptor"].shape == (8,)
    write_global_features(out, names[:2], unit_rows(2, seed=1), "hloc")  # vpr's own: replaced
    hloc_descriptors(out, names[:2])


def test_npz_global_features(tmp_path):
    out = tmp_path / "db.npz"
    descriptors = unit_rows(3)
    write_global_features(out, ["a.jpg", "b/c.jpg", "d.jpg"], descriptors, "npy")
    with np.load(out, allow_pickle=False) as f:
        assert list(f["names"]) == ["a.jpg", "b/c.jpg", "d.jpg"] and str(f["format"]) == "vpr-global-features"
        assert f["descriptors"].dtype == np.float32 and np.array_equal(f["descriptors"], descriptors)
    write_global_features(out, ["a.jpg"], descriptors[:1], "npy")
    np.savez(tmp_path / "user.npz", names=np.array(["a.jpg"]), descriptors=descriptors[:1])
    with pytest.raises(OutputError, match="not a global-features file written by vpr"):
        write_global_features(tmp_path / "user.npz", ["a.jpg"], descriptors[:1], "npy")
    with pytest.raises(UsageError, match="name an .npz file"):
        write_global_features(tmp_path / "db.npy", ["a.jpg"], descriptors[:1], "npy")


def test_kapture_global_features(tmp_path):
    from kapture.io.csv import global_features_from_dir
    from kapture.io.features import get_global_features_fullpath, image_global_features_from_file

    root = tmp_path / "mapping"
    (root / "sensors").mkdir(parents=True)
    (root / "sensors" / "sensors.txt").write_text("# the user's dataset\n")
    names = ["db/a.jpg", "db/sub/c.jpg", "top.jpg"]
    descriptors = unit_rows(3)
    folder = write_global_features(root, names, descriptors, "kapture", feature_type="netvlad")
    assert folder == root / "reconstruction" / "global_features" / "netvlad"
    features = global_features_from_dir("netvlad", str(root), None)
    assert (features.type_name, features.dtype, features.dsize, features.metric_type) == ("netvlad", np.float32, 8, "L2")
    assert sorted(features) == sorted(names)
    for i, name in enumerate(names):
        row = image_global_features_from_file(get_global_features_fullpath("netvlad", str(root), name), np.float32, 8)
        assert np.array_equal(row[0], descriptors[i])
    write_global_features(root, names[:1], descriptors[:1], "kapture", feature_type="netvlad")  # vpr's own: replaced
    assert sorted(global_features_from_dir("netvlad", str(root), None)) == names[:1]
    assert (root / "sensors" / "sensors.txt").read_text() == "# the user's dataset\n"
    assert sorted(os.listdir(folder.parent)) == [".netvlad.lock", "netvlad"]
    theirs = folder.parent / "theirs"
    theirs.mkdir()
    (theirs / "global_features.txt").write_text("# kapture format: 1.1\n")
    with pytest.raises(OutputError, match="holding files vpr did not write"):
        write_global_features(root, names, descriptors, "kapture", feature_type="theirs")
    assert os.listdir(theirs) == ["global_features.txt"]
    with pytest.raises(UsageError, match="feature_type '../x'"):
        write_global_features(root, names, descriptors, "kapture", feature_type="../x")


def test_kapture_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "kapture", None)
    with pytest.raises(DependencyError, match=r"pip install -e '\.\[interop\]'"):
        write_global_features(tmp_path / "k", ["a.jpg"], unit_rows(1), "kapture")


def test_feature_inputs_refused(tmp_path):
    out = tmp_path / "g.h5"
    bad = unit_rows(2)
    bad[1, 0] = np.nan
    with pytest.raises(UsageError, match="NaN"):
        write_global_features(out, ["a.jpg", "b.jpg"], bad, "hloc")
    assert not out.exists()
    for names, match in ((["a.jpg", "a.jpg"], "repeat"), (["/abs.jpg", "b.jpg"], "no relative image path"),
                         (["a.jpg"], "must be")):
        with pytest.raises(UsageError, match=match):
            write_global_features(out, names, unit_rows(2), "hloc")
    out.write_bytes(b"user data")
    with pytest.raises(OutputError, match="not a global-features file written by vpr"):
        write_global_features(out, ["a.jpg"], unit_rows(1), "hloc")
    assert out.read_bytes() == b"user data"
    with pytest.raises(UsageError, match="fmt 'faiss'"):
        write_global_features(out, ["a.jpg"], unit_rows(1), "faiss")
    with pytest.raises(UsageError, match="fmt 'txt'"):
        write_pairs(out, QUERIES, DB, INDICES, SCORES, "txt")
