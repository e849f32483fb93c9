"""A crash-safe descriptor cache: a directory of HDF5 files keyed by image path, size and mtime.

New descriptors go to small `part-*.h5` files, each written to a temporary name and renamed, so a
kill at any moment loses at most the unflushed batches and never corrupts what was saved. On a
clean close the parts are merged into `main.h5`. The cache is tied to the model's fingerprint; a
cache of another model is discarded.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import h5py
import numpy as np

from vpr.fileio import atomic_file

log = logging.getLogger(__name__)
FLUSH_ROWS = 1024
FLUSH_SECONDS = 2.0


def _write(path: Path, fingerprint: str, keys: list[str], descriptors: np.ndarray) -> None:
    with atomic_file(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["fingerprint"] = fingerprint
            f.create_dataset("keys", data=keys, dtype=h5py.string_dtype())
            f.create_dataset("descriptors", data=descriptors.astype(np.float32), chunks=(min(len(keys), 1024), descriptors.shape[1]))


class DescriptorCache:
    """Descriptors of images already processed by one model, reusable by a later or resumed run."""

    def __init__(self, path: Path, fingerprint: str, dim: int) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.dim = dim
        self.main_rows: dict[str, int] = {}
        self.loaded: dict[str, np.ndarray] = {}  # from part files and this run
        self.pending_keys: list[str] = []
        self.pending: list[np.ndarray] = []
        self.last_flush = time.monotonic()
        self._open()

    def _open(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            self.path.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            main = self.path / "main.h5"
            if main.is_file():
                keys, _ = self._read(main, with_data=False)
                self.main_rows = {k: i for i, k in enumerate(keys)}
            for part in sorted(self.path.glob("part-*.h5")):
                keys, data = self._read(part, with_data=True)
                self.loaded.update(zip(keys, data))
        except (OSError, KeyError, ValueError) as exc:
            log.warning("descriptor cache %s unusable (%s); starting afresh", self.path, exc)
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir(parents=True)
            self.main_rows, self.loaded = {}, {}

    def _read(self, file: Path, with_data: bool) -> tuple[list[str], np.ndarray | None]:
        with h5py.File(file, "r") as f:
            if f.attrs["fingerprint"] != self.fingerprint:
                raise ValueError("built by another model")
            if f["descriptors"].shape[1:] != (self.dim,) or f["descriptors"].shape[0] != f["keys"].shape[0]:
                raise ValueError(f"{file.name} has inconsistent shapes")
            keys = list(f["keys"][:].astype(str))
            return keys, (f["descriptors"][:] if with_data else None)

    def get(self, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(positions in `keys` found in the cache, their descriptors)."""
        positions, rows = [], []
        out = np.zeros((len(keys), self.dim), dtype=np.float32)
        for i, key in enumerate(keys):
            if key in self.loaded:
                out[i] = self.loaded[key]
                positions.append(i)
            elif key in self.main_rows:
                positions.append(i)
                rows.append((self.main_rows[key], i))
        if rows:
            rows.sort()
            with h5py.File(self.path / "main.h5", "r") as f:
                data = f["descriptors"][[r for r, _ in rows]]
            out[[i for _, i in rows]] = data
        found = np.array(sorted(positions), dtype=np.int64)
        return found, out[found]

    def append(self, keys: list[str], descriptors: np.ndarray) -> None:
        """Add descriptors; they reach disk every FLUSH_ROWS rows or FLUSH_SECONDS seconds."""
        self.pending_keys.extend(keys)
        self.pending.append(np.asarray(descriptors, dtype=np.float32))
        if len(self.pending_keys) >= FLUSH_ROWS or time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write pending descriptors to a new part file (atomically)."""
        if self.pending_keys:
            data = np.concatenate(self.pending)
            part = self.path / f"part-{len(self.main_rows) + len(self.loaded):010d}.h5"
            _write(part, self.fingerprint, self.pending_keys, data)
            self.loaded.update(zip(self.pending_keys, data))
            self.pending_keys, self.pending = [], []
        self.last_flush = time.monotonic()

    def close(self) -> None:
        """Flush, then merge the parts into main.h5 so the cache stays a few files."""
        self.flush()
        parts = sorted(self.path.glob("part-*.h5"))
        if not parts:
            return
        main_keys = list(self.main_rows)
        keys = main_keys + [k for k in self.loaded if k not in self.main_rows]
        data = np.zeros((len(keys), self.dim), dtype=np.float32)
        if main_keys:
            with h5py.File(self.path / "main.h5", "r") as f:
                data[: len(main_keys)] = f["descriptors"][:]
        for i, key in enumerate(keys[len(main_keys):], start=len(main_keys)):
            data[i] = self.loaded[key]
        _write(self.path / "main.h5", self.fingerprint, keys, data)
        for part in parts:
            part.unlink()
        self.main_rows = {k: i for i, k in enumerate(keys)}
        self.loaded = {}
