"""Descriptor rows read on demand: an N x d float32 array on disk that behaves like one in memory.

`FileRows` reads (and writes) a contiguous array in an open file with positioned reads and writes;
`RowReader` checks what it reads; `ProjectedRows` projects rows into an index's space as they are read
(`project`: checkpoint PCA, then the index's PCA); `StoredPaths` reads database paths one by one;
`spill_rows` makes an unnamed on-disk array for extractions too large for memory.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from vpr.errors import IndexFormatError, OutputError
from vpr.models.pca import PCA


class LazyRows:
    """What an N x d float32 row source read on demand shares with an array: `shape`, `dtype`, `len`,
    and `np.asarray` (reads every row); subclasses set `shape` and answer `[key]`."""

    shape: tuple[int, int]
    dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self[:], dtype=dtype)


class RowReader(LazyRows):
    """Rows of an on-disk N x d float32 array, read on demand: indexing reads only the rows asked for.

    `source` is a `FileRows` over database.h5's contiguous descriptors, or any array-like that takes
    slices and increasing row arrays (an h5py dataset). Integer arrays of any shape gather rows
    (sorted, each row read once); slices read a block.
    """

    def __init__(self, source, where: Path, max_norm: float | None = None) -> None:
        self.source = source
        self.where = where
        self.max_norm = max_norm
        self.shape = tuple(source.shape)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self._checked(np.asarray(self.source[int(key)], dtype=np.float32))
        if isinstance(key, slice):
            return self._checked(np.asarray(self.source[key], dtype=np.float32))
        key = np.asarray(key, dtype=np.int64)
        if key.size and (key.min() < -len(self) or key.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        rows, inverse = np.unique(np.where(key < 0, key + len(self), key).ravel(), return_inverse=True)
        if len(rows) == 0:
            return np.zeros((*key.shape, self.shape[1]), dtype=np.float32)
        block = self._checked(np.asarray(self.source[rows], dtype=np.float32))
        return block[inverse].reshape(*key.shape, self.shape[1])

    def _checked(self, rows: np.ndarray) -> np.ndarray:
        """`rows`, or an error naming the file when one holds NaN, infinity or a norm above `max_norm`."""
        check_rows(rows, self.where, self.max_norm)
        return rows


NORM_SLACK = 1e-3  # relative: float32 rounding between writing the largest norm and reading it back


def check_rows(rows: np.ndarray, where: Path, max_norm: float | None = None) -> None:
    """Refuse descriptor rows holding NaN or infinity, or longer than `max_norm` (the largest norm the index
    was built with: a row of 1e30 would be every query's top match)."""
    if not np.isfinite(rows).all():
        raise IndexFormatError(f"{where}: descriptors hold NaN or infinite values; rebuild the index")
    if max_norm is not None and rows.size:
        longest = float(np.sqrt(np.einsum("...i,...i->...", rows, rows, dtype=np.float64).max()))
        if longest > max_norm * (1 + NORM_SLACK) + 1e-6:
            raise IndexFormatError(f"{where}: a descriptor of norm {longest:.3g} is longer than any the index was built "
                                   f"with ({max_norm:.3g}); the file was altered: rebuild the index")


class FileRows:
    """A contiguous, uncompressed N x d float32 array at `offset` in an open file, read with positioned
    reads: no memory map, so resident memory holds only the rows read (a map would count every page it
    touched). In a file opened for writing, rows are also written with positioned writes (`spill_rows`)."""

    def __init__(self, file, offset: int, shape: tuple[int, int]) -> None:
        self.file = file
        self.offset, self.shape = offset, tuple(shape)
        self.row_bytes = 4 * self.shape[1]

    def _at(self, row: int) -> int:
        """Byte offset of `row` in the file."""
        return self.offset + int(row) * self.row_bytes

    def _read(self, first: int, count: int) -> np.ndarray:
        data = os.pread(self.file.fileno(), count * self.row_bytes, self._at(first))
        return np.frombuffer(data, dtype=np.float32).reshape(count, self.shape[1])

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self._read(int(key), 1)[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            return self._read(start, max(0, stop - start))[::step]
        rows = np.asarray(key, dtype=np.int64)  # increasing: runs of consecutive rows are read at once
        runs = _runs(rows)
        self._prefetch(rows, runs)
        return np.concatenate([self._read(rows[at], count) for at, count in runs])

    def _prefetch(self, rows: np.ndarray, runs: list[tuple[int, int]]) -> None:
        """Ask the kernel for every run before reading any, so the disk serves the scattered rows of a
        shortlist together instead of one seek after another (7 instead of 45 ms per cold 10M query)."""
        if len(runs) > 1 and hasattr(os, "posix_fadvise"):
            for at, count in runs:
                os.posix_fadvise(self.file.fileno(), self._at(rows[at]), count * self.row_bytes, os.POSIX_FADV_WILLNEED)

    def __setitem__(self, key, values: np.ndarray) -> None:
        """Write rows (a slice, or row indices in any order) with positioned writes."""
        if isinstance(key, slice):
            start, stop, _ = key.indices(self.shape[0])
            rows = np.arange(start, stop)
        else:
            rows = np.asarray(key, dtype=np.int64).ravel()
        values = np.ascontiguousarray(values, dtype=np.float32).reshape(len(rows), self.shape[1])
        order = np.argsort(rows, kind="stable")
        rows, values = rows[order], values[order]
        for at, count in _runs(rows):
            os.pwrite(self.file.fileno(), values[at:at + count].tobytes(), self._at(rows[at]))

    def head(self, count: int) -> "FileRows":
        """The first `count` rows, over the same open file."""
        return FileRows(self.file, self.offset, (count, self.shape[1]))


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """(position, length) of each run of consecutive values in the increasing `rows`: one read or write each."""
    starts = np.concatenate([[0], np.flatnonzero(np.diff(rows) != 1) + 1]) if len(rows) else np.zeros(0, dtype=np.int64)
    return [(int(a), int(b - a)) for a, b in zip(starts, [*starts[1:], len(rows)])]


def spill_rows(directory: Path, shape: tuple[int, int]) -> FileRows:
    """A new N x d float32 array in an unnamed temporary file in `directory`, read and written by rows:
    it has no name, so a kill leaves nothing behind and no other process can see or touch it."""
    try:
        handle = tempfile.TemporaryFile(dir=directory, buffering=0)
        handle.truncate(int(shape[0]) * int(shape[1]) * 4)  # sparse until written
    except OSError as exc:
        raise OutputError(f"{directory}: cannot hold {shape[0]:,} x {shape[1]} descriptors on disk ({exc.strerror}); "
                          "free disk space there") from exc
    return FileRows(handle, 0, shape)


class ProjectedRows(LazyRows):
    """Rows of `source` (an array or a `RowReader`) in index space, projected as they are read: the
    streaming form of `project` (checkpoint PCA, then the index's PCA)."""

    def __init__(self, source, model_pca: PCA | None, pca: PCA | None) -> None:
        self.source, self.model_pca, self.pca = source, model_pca, pca
        last = pca or model_pca
        self.shape = (len(source), last.components.shape[0] if last is not None else source.shape[1])

    def __getitem__(self, key) -> np.ndarray:
        return project(np.asarray(self.source[key], dtype=np.float32), self.model_pca, self.pca)


class StoredPaths(Sequence):
    """database.h5's image paths, read one by one when asked for (millions of Path objects would not fit)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return [Path(p) for p in self.dataset[key].astype(str)]
        return Path(self.dataset.asstr()[int(key) if key >= 0 else int(key) + len(self)])


def open_rows(path: Path, dataset: str = "descriptors") -> RowReader:
    """A row reader over `dataset` of the HDF5 file `path`: positioned file reads when the data is stored
    contiguous and uncompressed (what vpr writes), else reads through h5py."""
    f = h5py.File(path, "r")
    ds = f[dataset]
    offset = ds.id.get_offset() if ds.chunks is None and ds.compression is None else None
    if offset is not None and ds.dtype == np.float32 and ds.ndim == 2:
        shape = ds.shape
        f.close()
        return RowReader(FileRows(open(path, "rb", buffering=0), offset, shape), Path(path))
    return RowReader(ds, Path(path))


def project(raw: np.ndarray, model_pca: PCA | None, pca: PCA | None) -> np.ndarray:
    """Apply the optional checkpoint PCA then the optional index PCA."""
    out = raw
    for step in (model_pca, pca):
        if step is not None:
            out = step.transform(out)
    return np.ascontiguousarray(out, dtype=np.float32)
