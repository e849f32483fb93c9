"""The index directory: a self-contained, atomically written bundle that reloads bit-identically.

Layout: `manifest.json`, `model.pt` (vpr checkpoint), `pca.h5` (optional), `index.faiss` (ivfpq
and hnsw only: a flat index is searched on the descriptors), `database.h5` (`paths`, `utm`,
`heading`, `descriptors`). Writing it is `write_index`; loading it is `load_index`, whose file-by-file checks are
in `vpr.retrieval.index_files`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
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
from vpr.errors import DependencyError, IndexFormatError, UsageError
from vpr.fileio import MARKER, atomic_dir, file_sha256, h5_file, marker_kind
from vpr.models.checkpoints import save_checkpoint
from vpr.models.model import VPRModel
from vpr.models.pca import PCA
from vpr.retrieval.search import (
    ADD_CHUNK, INDEX_KINDS, empty_faiss_index, exact_search, faiss_available, search_by_kind, training_rows,
    write_faiss_index,
)
from vpr.retrieval.local_features import LOCAL_FEATURES_FILE, LocalFeatureStore, read_local_features
from vpr.retrieval.generation import Generation, file_record, read_generation
from vpr.retrieval.index_files import (
    FORMAT, FORMAT_VERSION, INDEX_FILES, REQUIRED_FILES, check_files, manifest_of, read_database, read_faiss, read_model,
    read_pca,
)
from vpr.retrieval.rows import RowReader, open_rows, project

log = logging.getLogger(__name__)
MAX_SEARCH_PARAM = 1 << 20  # nprobe / efSearch: FAISS takes C ints; larger values search everything anyway
LAZY_KINDS = ("ivfpq", "hnsw")  # searched on index.faiss: database.h5's descriptors stay on disk


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
    generation: Generation | None = field(default=None, repr=False)  # the directory generation its files came from

    def local_features(self) -> LocalFeatureStore:
        """The database's local features (`--local-features`), from the same generation as the rest."""
        where = self.directory / LOCAL_FEATURES_FILE
        present = self.generation.has(LOCAL_FEATURES_FILE) if self.generation is not None else where.is_file()
        if not present:
            raise UsageError(f"{self.directory}: the index has no local features for `rerank=local`; "
                             "rebuild it with `local_features`")
        source = self.generation.stream(LOCAL_FEATURES_FILE) if self.generation is not None else None
        return read_local_features(where, len(self.database), source, self.manifest.get("generation"))

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
        for option, value, wanted in (("`nprobe`", nprobe, "ivfpq"), ("`ef_search`", ef_search, "hnsw")):
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
        if k == n and kind != "flat":  # the whole database asked for: an approximate shortlist would drop rows
            return exact_search(np.asarray(self.descriptors), queries, k)
        if self.faiss_index is None and kind != "flat" and torch.device(device).type != "cuda":
            raise DependencyError(f"{self.directory}: a '{kind}' index needs FAISS: pip install -e '.[cpu]'")
        return search_by_kind(kind, self.descriptors, self.faiss_index, queries, k, device=device, resident=self.resident)


def check_index_kind(kind: str) -> None:
    """Refuse an unknown index kind (before any work is done)."""
    if kind not in INDEX_KINDS:
        raise UsageError(f"`kind` {kind}: unknown index kind; choose one of {', '.join(INDEX_KINDS)}")
    if kind != "flat" and not faiss_available():
        raise DependencyError(f"`kind` {kind} needs FAISS: pip install -e '.[cpu]'")


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
    generation = secrets.token_hex(8)
    with atomic_dir(Path(out_dir), kind="index", foreign=foreign_files) as tmp:
        if skipped:
            (tmp / "skipped.txt").write_text("".join(f"{p}\t{reason}\n" for p, reason in skipped))
        save_checkpoint(model, tmp / "model.pt", pca=model_pca)
        if pca is not None:
            with h5_file(tmp / "pca.h5") as f:
                for key, value in (("mean", pca.mean), ("components", pca.components), ("scale", pca.scale)):
                    f.create_dataset(key, data=value)
                f.attrs["whiten"] = pca.whiten
                f.attrs["generation"] = generation
        rows = training_rows(count, kind, seed) if kind != "flat" else np.zeros(0, dtype=np.int64)
        index = empty_faiss_index(count, dim, kind, descriptors[rows], seed) if kind != "flat" else None
        max_norm = 0.0
        with h5_file(tmp / "database.h5") as f:
            f.attrs["generation"] = generation
            _write_labels(f, database, chunk)
            # contiguous (not chunked): a loaded index reads single rows at their file offset
            stored = f.create_dataset("descriptors", shape=(count, dim), dtype=np.float32)
            for start in range(0, count, chunk):
                block = np.ascontiguousarray(descriptors[start:start + chunk], dtype=np.float32)
                refuse_non_finite(block, Path(out_dir), start)
                if len(block):
                    max_norm = max(max_norm, float(np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64).max())))
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
            "generation": generation,
            "random_init": bool(getattr(model, "random_init", False)),
            "max_norm": max_norm,
            **(extras(tmp, generation) if extras is not None else {}),
        }
        manifest["files"] = {name: file_record(tmp / name) for name in sorted(os.listdir(tmp))
                             if name in INDEX_FILES and name not in ("manifest.json", MARKER)}
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


def load_index(directory: Path, lazy: bool | None = None) -> IndexBundle:
    """Load and validate an index directory written by `write_index`, all its files of one generation.

    ivfpq and hnsw indexes (`lazy` None) keep the descriptors on disk behind a `RowReader`: re-ranking
    reads only the shortlisted rows, so memory holds the FAISS index, not N x d floats. A flat index
    is searched on the descriptors and loads them into memory (4 * d bytes per image).
    """
    return read_generation(Path(directory), lambda gen: _load(gen, lazy))


def _load(gen: Generation, lazy: bool | None) -> IndexBundle:
    """The bundle of one generation of the index's files, every file checked against the manifest."""
    manifest = manifest_of(gen)
    check_files(gen, manifest)
    model, model_pca = read_model(gen, manifest)
    pca = read_pca(gen, manifest)
    lazy = manifest["index_kind"] in LAZY_KINDS if lazy is None else lazy
    database, descriptors = read_database(gen, manifest, lazy)
    out_dim = pca.out_dim if pca else model_pca.out_dim if model_pca else model.config.descriptor_dim
    if out_dim != manifest["dim"]:
        raise IndexFormatError(
            f"{gen.directory}: the model gives {out_dim}-d descriptors but the index holds {manifest['dim']}-d; rebuild it"
        )
    faiss_index = read_faiss(gen, manifest)
    return IndexBundle(gen.directory, manifest, model, model_pca, pca, database, descriptors, faiss_index, generation=gen)
