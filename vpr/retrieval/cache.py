"""A crash-safe descriptor cache: a directory of HDF5 files keyed by image content.

A row's key is the image's absolute path, size and a hash of its bytes (`vpr.data.loading.content_key`),
so a file whose content changed is recomputed even when its size and modification time were kept
(restored from an archive, or two files swapped); a later run hashes the cached images again (a read,
no decode) to find what it can reuse.

New descriptors go to small `part-*.h5` files, each written to a temporary name and renamed, so a
kill at any moment loses at most the unflushed batches and never corrupts what was saved. On a
clean close the parts are merged into `main.h5`, chunk by chunk. Only a path -> (key, file, row) map
is held in memory, never the descriptors, so memory does not grow with the cache. The cache is tied
to the model's fingerprint; a cache of another model is discarded.

Safety: the directory carries vpr's marker and a path that is not a vpr cache is refused, never
deleted; the caller holds `output_lock` on it (rank 0 holds it for every rank of a distributed run,
each rank writing its own parts), part names carry a random token so two writers can never collide,
and every row read back is checked against its stored key.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
from pathlib import Path

import h5py
import numpy as np

from vpr.errors import OutputError
from vpr.fileio import atomic_file, h5_file, make_owned_dir, marker_kind

log = logging.getLogger(__name__)
FLUSH_ROWS = 1024
FLUSH_SECONDS = 2.0
CHUNK_BYTES = 4 << 20  # descriptors read or copied at a time: bounded memory whatever the cache size
MAIN = "main.h5"
PART = re.compile(r"part-(\d{10})(-[0-9a-f]{8})?\.h5")


def check_cache_path(path: Path) -> None:
    """Refuse, writing nothing, a cache path that is not new, empty, or a descriptor cache vpr wrote (its
    marker): a file, a link, or a folder of the user's own (a `main.h5` included, which is never unlinked)."""
    path = Path(path)
    refuse = f"{path}: exists and is not a vpr descriptor cache; move it away or build with `cache=False`"
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputError(refuse)
    if path.is_dir() and marker_kind(path) != "cache" and os.listdir(path):
        raise OutputError(refuse)


def _create(f: h5py.File, fingerprint: str, dim: int, rows: int) -> tuple[h5py.Dataset, h5py.Dataset]:
    f.attrs["fingerprint"] = fingerprint
    keys = f.create_dataset("keys", shape=(rows,), dtype=h5py.string_dtype())
    data = f.create_dataset("descriptors", shape=(rows, dim), dtype=np.float32, chunks=(max(1, min(rows, 1024)), dim))
    return keys, data


def _read(dataset: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Rows (sorted, repeats allowed) of a dataset: one slice read when they are dense, else a point selection."""
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if hi - lo == len(rows) and np.all(np.diff(rows) == 1):  # exactly rows lo..hi-1
        return dataset[lo:hi]
    if hi - lo <= 2 * len(rows):
        return dataset[lo:hi][rows - lo]
    unique, inverse = np.unique(rows, return_inverse=True)
    return dataset[unique][inverse]


class DescriptorCache:
    """Descriptors of images already processed by one model, reusable by a later or resumed run."""

    def __init__(self, path: Path, fingerprint: str, dim: int) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.dim = dim
        self.rows: dict[str, tuple[str, str, int]] = {}  # path -> (content part of its key, file name, row): the newest
        self.pending_keys: list[str] = []
        self.pending: list[np.ndarray] = []
        self.parts = 0
        self.chunk_rows = max(1, CHUNK_BYTES // (4 * dim))
        self.last_flush = time.monotonic()
        self._open()

    def _files(self) -> list[Path]:
        """main.h5 first, then the parts in the order they were written."""
        main = self.path / MAIN
        parts = sorted(self.path / name for name in os.listdir(self.path) if PART.fullmatch(name))
        return ([main] if main.is_file() else []) + parts

    def _claim(self) -> None:
        check_cache_path(self.path)
        make_owned_dir(self.path, "cache", "descriptor cache", "choose a writable `out` or build with `cache=False`")

    def _open(self) -> None:
        self._claim()
        try:
            for file in self._files():
                with h5py.File(file, "r") as f:
                    self._check(f, file)
                    self._take(f, file.name)
        except (OSError, KeyError, ValueError) as exc:
            log.warning("descriptor cache %s unusable (%s); starting afresh", self.path, exc)
            for file in self._files():
                file.unlink()
            self.rows = {}
        self._number_parts()

    def _number_parts(self) -> None:
        numbers = [int(PART.fullmatch(part.name).group(1)) for part in self._files() if part.name != MAIN]
        self.parts = max(numbers, default=-1) + 1  # never reuse the number of a part still on disk

    def refresh(self) -> None:
        """Take in the parts other processes wrote since this one opened the cache (the ranks of a
        distributed run, before rank 0 merges); a part that cannot be read is left out and kept."""
        known = {name for _, name, _ in self.rows.values()}
        for file in self._files():
            if file.name in known:
                continue
            try:
                with h5py.File(file, "r") as f:
                    self._check(f, file)
                    self._take(f, file.name)
            except (OSError, KeyError, ValueError) as exc:
                log.warning("descriptor cache %s: part %s unusable (%s); left out", self.path, file.name, exc)
        self._number_parts()

    def _check(self, f: h5py.File, file: Path) -> None:
        if f.attrs["fingerprint"] != self.fingerprint:
            raise ValueError("built by another model")
        if f["descriptors"].shape[1:] != (self.dim,) or f["descriptors"].shape[0] != f["keys"].shape[0]:
            raise ValueError(f"{file.name} has inconsistent shapes")

    def _take(self, f: h5py.File, name: str) -> None:
        """List the rows of the open cache file `name` (later files win)."""
        for row, key in enumerate(f["keys"].asstr()[:]):
            path, content = _split(key)
            self.rows[path] = (content, name, row)

    def knows(self, path: str) -> bool:
        """Whether the cache holds a descriptor for the image at the absolute `path` (of some content)."""
        return path in self.rows

    def fill(self, keys: list[str | None], out: np.ndarray) -> np.ndarray:
        """Copy the cached descriptors of `keys` (None: not looked up) into the matching rows of `out`;
        return those row positions."""
        by_file: dict[str, tuple[list[int], list[int]]] = {}
        for position, key in enumerate(keys):
            if key is None:
                continue
            path, content = _split(key)
            found = self.rows.get(path)
            if found is not None and found[0] == content:
                rows, positions = by_file.setdefault(found[1], ([], []))
                rows.append(found[2])
                positions.append(position)
        found: list[int] = []
        for name, (rows, positions) in by_file.items():
            rows_a, positions_a = np.array(rows), np.array(positions)
            order = np.argsort(rows_a, kind="stable")
            rows_a, positions_a = rows_a[order], positions_a[order]
            with h5py.File(self.path / name, "r") as f:
                for start in range(0, len(rows_a), self.chunk_rows):
                    chunk = slice(start, start + self.chunk_rows)
                    stored = np.asarray(_read(f["keys"].asstr(), rows_a[chunk]), dtype=object)
                    match = stored == np.array([keys[p] for p in positions_a[chunk]], dtype=object)  # a row is used only for the image whose key it was saved with
                    if not match.all():
                        log.warning("descriptor cache %s: %d rows of %s do not hold their key; recomputing them",
                                    self.path, int((~match).sum()), name)
                    out[positions_a[chunk][match]] = _read(f["descriptors"], rows_a[chunk])[match]
                    found.extend(positions_a[chunk][match].tolist())
        return np.array(sorted(found), dtype=np.int64)

    def append(self, keys: list[str], descriptors: np.ndarray) -> None:
        """Add descriptors; they reach disk every FLUSH_ROWS rows or FLUSH_SECONDS seconds."""
        self.pending_keys.extend(keys)
        self.pending.append(np.array(descriptors, dtype=np.float32))
        if len(self.pending_keys) >= FLUSH_ROWS or time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write pending descriptors to a new part file (atomically)."""
        if self.pending_keys:
            name = f"part-{self.parts:010d}-{secrets.token_hex(4)}.h5"  # unique even beside another writer
            with atomic_file(self.path / name) as tmp, h5_file(tmp) as f:
                keys, data = _create(f, self.fingerprint, self.dim, len(self.pending_keys))
                keys[:] = self.pending_keys
                data[:] = np.concatenate(self.pending)
            for row, key in enumerate(self.pending_keys):
                path, content = _split(key)
                self.rows[path] = (content, name, row)
            self.parts += 1
            self.pending_keys, self.pending = [], []
        self.last_flush = time.monotonic()

    def close(self) -> None:
        """Flush, then merge the parts into main.h5 (streamed in chunks) so the cache stays a few files."""
        self.flush()
        files = self._files()
        if not any(file.name != MAIN for file in files):
            return
        order = {file.name: i for i, file in enumerate(files)}
        paths = sorted(self.rows, key=lambda path: (order[self.rows[path][1]], self.rows[path][2]))
        keys = [_join(path, self.rows[path][0]) for path in paths]
        try:
            with atomic_file(self.path / MAIN) as tmp, h5_file(tmp) as f:
                out_keys, out_data = _create(f, self.fingerprint, self.dim, len(keys))
                for start in range(0, len(keys), self.chunk_rows):
                    chunk = keys[start:start + self.chunk_rows]
                    out_keys[start:start + len(chunk)] = chunk
                    out_data[start:start + len(chunk)] = self._read_rows(chunk)
        except _Unmatched:
            log.warning("descriptor cache %s: rows do not match their keys; kept the parts unmerged", self.path)
            return
        for file in files:
            if file.name != MAIN:
                file.unlink()
        self.rows = {path: (self.rows[path][0], MAIN, row) for row, path in enumerate(paths)}
        self.parts = 0

    def _read_rows(self, keys: list[str]) -> np.ndarray:
        out = np.empty((len(keys), self.dim), dtype=np.float32)
        if len(self.fill(keys, out)) != len(keys):
            raise _Unmatched
        return out


def _split(key: str) -> tuple[str, str]:
    """A key `PATH|SIZE|HASH` as (path, "SIZE|HASH"), the path possibly holding '|' itself; a key of
    another shape is a path of its own, with no content part (`_join` gives the key back)."""
    parts = key.rsplit("|", 2)
    return (parts[0], f"{parts[1]}|{parts[2]}") if len(parts) == 3 else (key, "")


def _join(path: str, content: str) -> str:
    return f"{path}|{content}" if content else path


class _Unmatched(Exception):
    """A cached row no longer holds the key it is listed under (the merge is abandoned)."""
