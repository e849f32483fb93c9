"""The index directory: a self-contained, atomically written bundle that reloads bit-identically.

Layout: `manifest.json`, `model.pt` (vpr checkpoint), `pca.h5` (optional), `index.faiss` (ivfpq
and hnsw only: a flat index is searched on the descriptors), `database.h5` (`paths`, `utm`,
`heading`, `descriptors`).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch

from vpr import __version__
from vpr.data.datasets import GeoImageSet
from vpr.errors import CheckpointError, DependencyError, IndexFormatError, UsageError
from vpr.fileio import MARKER, atomic_dir, marker_kind
from vpr.models.checkpoints import file_sha256, load_checkpoint, save_checkpoint
from vpr.models.model import VPRModel
from vpr.models.pca import PCA
from vpr.retrieval.index import (
    ADD_CHUNK, INDEX_KINDS, empty_faiss_index, faiss_available, read_faiss_index, search_by_kind, training_rows,
    write_faiss_index,
)
from vpr.retrieval.local_features import LOCAL_FEATURES_FILE
from vpr.retrieval.rows import RowReader, StoredPaths, open_rows, project

log = logging.getLogger(__name__)
FORMAT = "vpr-index"
FORMAT_VERSION = 1
REQUIRED_FILES = ("manifest.json", "model.pt", "database.h5")
MAX_SEARCH_PARAM = 1 << 20  # nprobe / efSearch: FAISS takes C ints; larger values search everything anyway
INDEX_FILES = frozenset((*REQUIRED_FILES, "pca.h5", "index.faiss", "skipped.txt", LOCAL_FEATURES_FILE, MARKER))
LAZY_KINDS = ("ivfpq", "hnsw")  # searched on index.faiss: database.h5's descriptors stay on disk
LAZY_PATHS_ROWS = 100_000  # above this many images, paths are read from database.h5 when asked for too


def foreign_files(directory: Path) -> list[str]:
    """Entries of `directory` that a complete vpr index does not hold (all of them when it is no vpr index).

    Kinds count as well as names: a folder or a link called like an index file (`pca.h5/`) is not vpr's."""
    directory = Path(directory)
    names = set(os.listdir(directory))
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError, RecursionError):
        return sorted(names)
    written = isinstance(manifest, dict) and manifest.get("format") == FORMAT and marker_kind(directory) in (None, "index")
    if not written or not set(REQUIRED_FILES) <= names:
        return sorted(names)
    return sorted(name for name in names if name not in INDEX_FILES or not _regular_file(directory / name))


def _regular_file(path: Path) -> bool:
    """A plain file, not a link, folder or device."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def is_vpr_index(directory: Path) -> bool:
    """Whether `directory` is a complete index vpr wrote: a vpr manifest, the required files, nothing else."""
    return Path(directory).is_dir() and not foreign_files(directory)


@dataclass
class IndexBundle:
    """A loaded index: the model and projections that make query descriptors, and the database."""

    directory: Path
    manifest: dict
    model: VPRModel
    model_pca: PCA | None
    pca: PCA | None
    database: GeoImageSet
    descriptors: np.ndarray | RowReader  # a RowReader (rows read on demand) for ivfpq and hnsw
    faiss_index: object | None
    resident: dict = field(default_factory=dict, repr=False)  # device -> database tensor or faiss-gpu index

    @property
    def dim(self) -> int:
        return int(self.descriptors.shape[1])

    def project(self, raw: np.ndarray) -> np.ndarray:
        """Model descriptors -> index space (checkpoint PCA, then the index's own PCA)."""
        return project(raw, self.model_pca, self.pca)

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """IVF lists probed (ivfpq, default 16) or HNSW's candidate list (hnsw, default 128): larger values
        find the exact neighbours more often and cost more time per query."""
        kind = self.manifest["index_kind"]
        for option, value, wanted in (("--nprobe", nprobe, "ivfpq"), ("--ef-search", ef_search, "hnsw")):
            if value is not None and kind != wanted:
                raise UsageError(f"{option} applies to {wanted} indexes; {self.directory} is a {kind} index")
            if value is not None and not 1 <= value <= MAX_SEARCH_PARAM:
                raise UsageError(f"{option} {value}: must be between 1 and {MAX_SEARCH_PARAM}")
        if self.faiss_index is not None and nprobe is not None:
            self.faiss_index.nprobe = min(nprobe, self.faiss_index.nlist)
        if self.faiss_index is not None and ef_search is not None:
            self.faiss_index.hnsw.efSearch = ef_search
        self.resident.clear()  # GPU clones are made again with the new settings

    def search(self, queries: np.ndarray, k: int, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
        """Top-k (similarities, database indices) for descriptors already in index space.

        flat: exact search on the descriptors. ivfpq: a shortlist from the compressed index, re-ranked
        with exact inner products. hnsw: the graph search. On CUDA: faiss-gpu when installed (not
        hnsw), else exact fp16 torch search with the database kept on the device.
        """
        n = len(self.descriptors)
        if n == 0:
            raise IndexFormatError(f"{self.directory}: the index is empty; rebuild it from a folder with images")
        k = min(k, n)
        kind = self.manifest["index_kind"]
        if self.faiss_index is None and kind != "flat" and torch.device(device).type != "cuda":
            raise DependencyError(f"{self.directory}: a '{kind}' index needs FAISS: pip install -e '.[cpu]'")
        return search_by_kind(kind, self.descriptors, self.faiss_index, queries, k, device=device, resident=self.resident)


def check_index_kind(kind: str) -> None:
    """Refuse an unknown index kind (before any work is done)."""
    if kind not in INDEX_KINDS:
        raise UsageError(f"--index {kind}: unknown index kind; choose one of {', '.join(INDEX_KINDS)}")
    if kind != "flat" and not faiss_available():
        raise DependencyError(f"--index {kind} needs FAISS: pip install -e '.[cpu]'")


def refuse_non_finite(descriptors: np.ndarray, where: Path, first_row: int = 0) -> None:
    """Raise when a descriptor holds NaN or infinity: such an index would silently return nothing."""
    bad = ~np.isfinite(descriptors).all(axis=1)
    if bad.any():
        raise IndexFormatError(
            f"{where}: {int(bad.sum())} descriptors hold NaN or infinite values (first at row "
            f"{first_row + int(np.argmax(bad))}); the model is broken: use another checkpoint and rebuild"
        )


def write_index(
    out_dir: Path, *, model: VPRModel, model_pca: PCA | None, pca: PCA | None, database: GeoImageSet,
    descriptors: np.ndarray | RowReader, kind: str, source: str, skipped: list[tuple[Path, str]] = (),
    extras: Callable[[Path], dict] | None = None, chunk: int = ADD_CHUNK, seed: int = 0,
) -> Path:
    """Write a complete index directory atomically (marked temporary sibling, then rename).

    `descriptors` (index space) may be an array or a `RowReader` over a file: either way they are
    streamed `chunk` rows at a time into database.h5 and the FAISS index, which trains on a sample
    (`training_rows`), so a reader's rows are never all in memory. The caller holds
    `output_lock(out_dir)`; an existing `out_dir` must be empty or a vpr index. Unreadable database
    images that were skipped are listed in `skipped.txt`. `extras` writes more files into the
    temporary directory (local features) and returns entries for the manifest.
    """
    check_index_kind(kind)
    count, dim = descriptors.shape
    if len(database) != count:
        raise UsageError(f"{count} descriptors for {len(database)} database images")
    with atomic_dir(Path(out_dir), kind="index", foreign=foreign_files) as tmp:
        if skipped:
            (tmp / "skipped.txt").write_text("".join(f"{p}\t{reason}\n" for p, reason in skipped))
        save_checkpoint(model, tmp / "model.pt", pca=model_pca)
        if pca is not None:
            with h5py.File(tmp / "pca.h5", "w") as f:
                for key, value in (("mean", pca.mean), ("components", pca.components), ("scale", pca.scale)):
                    f.create_dataset(key, data=value)
                f.attrs["whiten"] = pca.whiten
        rows = training_rows(count, kind, seed) if kind != "flat" else np.zeros(0, dtype=np.int64)
        index = empty_faiss_index(count, dim, kind, descriptors[rows], seed) if kind != "flat" else None
        with h5py.File(tmp / "database.h5", "w") as f:
            _write_labels(f, database, chunk)
            # contiguous (not chunked): a loaded index reads single rows at their file offset
            stored = f.create_dataset("descriptors", shape=(count, dim), dtype=np.float32)
            for start in range(0, count, chunk):
                block = np.ascontiguousarray(descriptors[start:start + chunk], dtype=np.float32)
                refuse_non_finite(block, Path(out_dir), start)
                stored[start:start + len(block)] = block
                if index is not None:  # a flat index is searched on database.h5's descriptors: no second copy
                    index.add(block)
                log.debug("wrote descriptors %d-%d of %d", start, start + len(block), count)
        if index is not None:
            write_faiss_index(index, tmp / "index.faiss")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "vpr_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": model.config.to_dict(),
            "model_sha256": file_sha256(tmp / "model.pt"),
            "model_pca_dim": None if model_pca is None else model_pca.out_dim,
            "pca_dim": None if pca is None else pca.out_dim,
            "pca_whiten": None if pca is None else pca.whiten,
            "index_kind": kind,
            "dim": int(dim),
            "count": int(count),
            "zone": None if database.zone is None else list(database.zone),
            "source": source,
            **(extras(tmp) if extras is not None else {}),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return Path(out_dir)


def _write_labels(f: h5py.File, database: GeoImageSet, chunk: int) -> None:
    """database.h5's paths and optional positions, headings and times, paths written `chunk` at a time."""
    paths = f.create_dataset("paths", shape=(len(database),), dtype=h5py.string_dtype())
    for start in range(0, len(database), chunk):
        paths[start:start + chunk] = [str(Path(p).resolve()) for p in database.paths[start:start + chunk]]
    if database.utm is not None:
        f.create_dataset("utm", data=np.asarray(database.utm, dtype=np.float64))
        f.create_dataset("heading", data=np.asarray(database.heading, dtype=np.float64))
    if database.time is not None:
        f.create_dataset("time", data=np.asarray(database.time, dtype=np.float64))


def write_index_from_file(
    out_dir: Path, descriptors_path: Path, *, dataset: str = "descriptors", model: VPRModel,
    model_pca: PCA | None, pca: PCA | None, database: GeoImageSet, kind: str, source: str,
    chunk: int = ADD_CHUNK, seed: int = 0,
) -> Path:
    """`write_index` for descriptors already on disk (`dataset` of the HDF5 file `descriptors_path`, in
    index space): read `chunk` rows at a time, so memory holds the FAISS index and one chunk, not the database."""
    return write_index(out_dir, model=model, model_pca=model_pca, pca=pca, database=database,
                       descriptors=open_rows(Path(descriptors_path), dataset), kind=kind, source=source,
                       chunk=chunk, seed=seed)


def read_manifest(directory: Path) -> dict:
    """Validate the directory's files and manifest; a one-line error says what is wrong and the fix."""
    directory = Path(directory)
    if not directory.is_dir():
        raise IndexFormatError(f"{directory}: no index here; build one with `vpr build-index DATABASE --out {directory}`")
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise IndexFormatError(f"{directory}: incomplete index (missing {', '.join(missing)}); rebuild it with `vpr build-index`")
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexFormatError(f"{directory}/manifest.json: not valid JSON ({exc}); rebuild the index") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{directory}: manifest.json is not a vpr index manifest; rebuild the index")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexFormatError(
            f"{directory}: index format {manifest.get('format_version')} (vpr {manifest.get('vpr_version')}) "
            f"is not supported by vpr {__version__} (format {FORMAT_VERSION}); rebuild the index"
        )
    for key, kind in (("dim", int), ("count", int), ("index_kind", str), ("model", dict), ("model_sha256", str)):
        if not isinstance(manifest.get(key), kind):
            raise IndexFormatError(f"{directory}/manifest.json: field '{key}' missing or malformed; rebuild the index")
    if manifest["index_kind"] not in INDEX_KINDS:
        raise IndexFormatError(
            f"{directory}/manifest.json: unknown index kind '{manifest['index_kind']}' (this vpr knows "
            f"{', '.join(INDEX_KINDS)}); rebuild the index"
        )
    return manifest


def _read_pca(path: Path) -> PCA:
    with h5py.File(path, "r") as f:
        return PCA(
            mean=f["mean"][:].astype(np.float32), components=f["components"][:].astype(np.float32),
            scale=f["scale"][:].astype(np.float32), whiten=bool(f.attrs["whiten"]),
        )


def _read_database(path: Path, manifest: dict, lazy: bool) -> tuple[GeoImageSet, np.ndarray | RowReader]:
    """The database's labels and descriptors: in memory, or when `lazy` a `RowReader` (and, above
    LAZY_PATHS_ROWS images, paths read on demand from the file, which then stays open)."""
    count, dim = manifest["count"], manifest["dim"]
    lazy_paths = lazy and count > LAZY_PATHS_ROWS
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise IndexFormatError(f"{path}: unreadable or missing datasets ({exc}); rebuild the index") from exc
    try:
        try:
            paths = StoredPaths(f["paths"]) if lazy_paths else [Path(p) for p in f["paths"][:].astype(str)]
            stored = f["descriptors"]
            shape, dtype = stored.shape, stored.dtype
            descriptors = None if lazy else stored[:]
            utm = f["utm"][:] if "utm" in f else None
            heading = f["heading"][:] if "heading" in f else None
            time = f["time"][:] if "time" in f else None
        except (OSError, KeyError) as exc:
            raise IndexFormatError(f"{path}: unreadable or missing datasets ({exc}); rebuild the index") from exc
        if len(paths) != count or shape != (count, dim) or dtype != np.float32:
            raise IndexFormatError(
                f"{path}: holds {len(paths)} paths and descriptors {shape} {dtype}, "
                f"manifest says {count} x {dim} float32; rebuild the index"
            )
        if utm is not None and (utm.shape != (count, 2) or heading is None or heading.shape != (count,)):
            raise IndexFormatError(f"{path}: utm/heading shapes do not match {count} images; rebuild the index")
        if time is not None and time.shape != (count,):
            raise IndexFormatError(f"{path}: time has shape {time.shape}, not ({count},); rebuild the index")
    except BaseException:
        f.close()
        raise
    if not lazy_paths:
        f.close()
    if lazy:
        descriptors = open_rows(path)
    zone = tuple(manifest["zone"]) if manifest.get("zone") else None
    return GeoImageSet(paths=paths, utm=utm, heading=heading, zone=zone, source=path, time=time), descriptors


def load_index(directory: Path, lazy: bool | None = None) -> IndexBundle:
    """Load and validate an index directory written by `write_index`.

    ivfpq and hnsw indexes (`lazy` None) keep the descriptors on disk behind a `RowReader`: re-ranking
    reads only the shortlisted rows, so memory holds the FAISS index, not N x d floats. A flat index
    is searched on the descriptors and loads them into memory (4 * d bytes per image).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if file_sha256(directory / "model.pt") != manifest["model_sha256"]:
        raise IndexFormatError(f"{directory}/model.pt: does not match the manifest's sha256; rebuild the index")
    try:
        model, model_pca = load_checkpoint(directory / "model.pt")
    except CheckpointError as exc:
        raise IndexFormatError(f"{directory}: {exc}") from exc
    pca = _read_pca(directory / "pca.h5") if (directory / "pca.h5").is_file() else None
    if (pca is None) != (manifest.get("pca_dim") is None):
        raise IndexFormatError(f"{directory}: pca.h5 and the manifest disagree; rebuild the index")
    lazy = manifest["index_kind"] in LAZY_KINDS if lazy is None else lazy
    database, descriptors = _read_database(directory / "database.h5", manifest, lazy)
    if not lazy:  # a row reader refuses non-finite rows as it reads them
        refuse_non_finite(descriptors, directory / "database.h5")
    out_dim = pca.out_dim if pca else model_pca.out_dim if model_pca else model.config.descriptor_dim
    if out_dim != manifest["dim"]:
        raise IndexFormatError(
            f"{directory}: the model gives {out_dim}-d descriptors but the index holds {manifest['dim']}-d; rebuild it"
        )
    faiss_index = None
    if manifest["index_kind"] != "flat" and faiss_available():
        if not (directory / "index.faiss").is_file():
            raise IndexFormatError(f"{directory}: index.faiss is missing; rebuild the index with `vpr build-index`")
        faiss_index = read_faiss_index(directory / "index.faiss")
        if faiss_index.ntotal != manifest["count"] or faiss_index.d != manifest["dim"]:
            raise IndexFormatError(f"{directory}/index.faiss: size does not match the manifest; rebuild the index")
    return IndexBundle(directory, manifest, model, model_pca, pca, database, descriptors, faiss_index)
