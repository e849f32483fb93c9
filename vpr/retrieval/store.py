"""The index directory: a self-contained, atomically written bundle that reloads bit-identically.

Layout: `manifest.json`, `model.pt` (vpr checkpoint), `pca.h5` (optional), `index.faiss` (ivfpq
and hnsw only: a flat index is searched on the descriptors), `database.h5` (`paths`, `utm`,
`heading`, `descriptors`).
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
from vpr.errors import CheckpointError, DependencyError, IndexFormatError, UsageError
from vpr.fileio import MARKER, atomic_dir, h5_file, marker_kind
from vpr.data.geo import is_zone
from vpr.models.checkpoints import file_sha256, load_vpr_checkpoint, save_checkpoint
from vpr.models.model import VPRModel
from vpr.models.pca import PCA
from vpr.retrieval.search import (
    ADD_CHUNK, INDEX_KINDS, empty_faiss_index, exact_search, faiss_available, read_faiss_index, search_by_kind, training_rows,
    write_faiss_index,
)
from vpr.retrieval.local_features import LOCAL_FEATURES_FILE, LocalFeatureStore, read_local_features
from vpr.retrieval.generation import Generation, file_record, read_generation
from vpr.retrieval.rows import FileRows, RowReader, StoredPaths, check_rows, open_rows, project

log = logging.getLogger(__name__)
FORMAT = "vpr-index"
FORMAT_VERSION = 1
REQUIRED_FILES = ("manifest.json", "model.pt", "database.h5")
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few kB; anything this large was not written by vpr
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


def read_manifest(directory: Path) -> dict:
    """The validated manifest of the index at `directory`; a one-line error says what is wrong and the fix."""
    return read_generation(Path(directory), manifest_of)


def manifest_of(gen: Generation) -> dict:
    """The generation's manifest, every field a later step relies on checked (`check_manifest`)."""
    where = gen.directory
    missing = [name for name in REQUIRED_FILES if not gen.has(name)]
    if missing:
        raise IndexFormatError(f"{where}: incomplete index (missing {', '.join(missing)}); rebuild it with `vpr build-index`")
    if gen.size("manifest.json") > MAX_MANIFEST_BYTES:
        raise IndexFormatError(f"{where}/manifest.json: {gen.size('manifest.json'):,} bytes, not a vpr manifest; rebuild the index")
    try:
        manifest = json.loads(gen.read_bytes("manifest.json"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:100]
        raise IndexFormatError(f"{where}/manifest.json: not valid JSON ({reason}); rebuild the index") from None
    check_manifest(manifest, where)
    return manifest


def check_manifest(manifest: object, where: Path) -> None:
    """Refuse a manifest vpr did not write or whose fields are of the wrong kind (one line each)."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexFormatError(f"{where}: manifest.json is not a vpr index manifest; rebuild the index")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexFormatError(
            f"{where}: index format {str(manifest.get('format_version'))[:20]} (vpr {str(manifest.get('vpr_version'))[:20]}) "
            f"is not supported by vpr {__version__} (format {FORMAT_VERSION}); rebuild the index"
        )

    def malformed(key: str, detail: str = "missing or malformed") -> IndexFormatError:
        return IndexFormatError(f"{where}/manifest.json: field '{key}' {detail}; rebuild the index")

    for key, kind in (("dim", int), ("count", int), ("index_kind", str), ("model", dict), ("model_sha256", str)):
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise malformed(key)
    if manifest["dim"] < 1 or manifest["count"] < 0:
        raise malformed("dim" if manifest["dim"] < 1 else "count", "out of range")
    if manifest["index_kind"] not in INDEX_KINDS:
        raise IndexFormatError(
            f"{where}/manifest.json: unknown index kind '{manifest['index_kind'][:40]}' (this vpr knows "
            f"{', '.join(INDEX_KINDS)}); rebuild the index"
        )
    zone = manifest.get("zone")
    if zone is not None and not (isinstance(zone, list) and len(zone) == 2 and is_zone(*zone)):
        raise malformed("zone", f"is {str(zone)[:40]}, not a UTM zone [1..60, letter C..X]")
    for key in ("pca_dim", "model_pca_dim"):
        value = manifest.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise malformed(key)
    for key, kind in (("generation", str), ("files", dict), ("max_norm", (int, float)), ("local_features", dict), ("dba", dict)):
        if manifest.get(key) is not None and not isinstance(manifest[key], kind):
            raise malformed(key)
    for name, record in (manifest.get("files") or {}).items():
        if name not in INDEX_FILES or not (isinstance(record, dict) and isinstance(record.get("size"), int)
                                           and isinstance(record.get("sha256"), str)):
            raise malformed("files", f"has a bad entry for {str(name)[:40]}")


def _check_files(gen: Generation, manifest: dict) -> None:
    """Every file the manifest lists is here with its size, and the small ones with their sha256
    (index.faiss is hashed as it is read, database.h5 and local features are bound by the generation id)."""
    for name, record in (manifest.get("files") or {}).items():
        if not gen.has(name):
            raise IndexFormatError(f"{gen.directory}: {name} is missing; rebuild the index with `vpr build-index`")
        if gen.size(name) != record["size"]:
            raise IndexFormatError(f"{gen.directory}/{name}: {gen.size(name):,} bytes, the manifest says {record['size']:,}; "
                                   "the files are of different builds: rebuild the index")
        if name in ("pca.h5", "skipped.txt") and gen.sha256(name) != record["sha256"]:
            raise IndexFormatError(f"{gen.directory}/{name}: does not match the manifest's sha256; rebuild the index")


def _same_generation(manifest: dict, attrs, where: str) -> None:
    """An HDF5 file of the index carries the manifest's generation id (indexes of earlier versions have none)."""
    expected = manifest.get("generation")
    if expected is not None and attrs.get("generation") != expected:
        raise IndexFormatError(f"{where}: belongs to another build of the index than manifest.json; rebuild the index")


def _read_pca(gen: Generation, manifest: dict) -> PCA | None:
    """The index's PCA (pca.h5), its arrays checked for shape and finite values."""
    if not gen.has("pca.h5"):
        if manifest.get("pca_dim") is not None:
            raise IndexFormatError(f"{gen.directory}: pca.h5 and the manifest disagree; rebuild the index")
        return None
    where = f"{gen.directory}/pca.h5"
    try:
        with gen.stream("pca.h5") as handle, h5py.File(handle, "r") as f:
            _same_generation(manifest, f.attrs, where)
            mean, components, scale = (np.asarray(f[key][:], dtype=np.float32) for key in ("mean", "components", "scale"))
            whiten = bool(f.attrs["whiten"])
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise IndexFormatError(f"{where}: unreadable or malformed ({str(exc)[:80]}); rebuild the index") from None
    out_dim = manifest.get("pca_dim")
    shapes_fit = (mean.ndim == 1 and components.ndim == 2 and components.shape[1] == mean.shape[0]
                  and scale.shape == (components.shape[0],) and components.shape[0] == out_dim)
    if not shapes_fit:
        raise IndexFormatError(f"{where}: arrays of shapes {mean.shape}, {components.shape}, {scale.shape} do not make a "
                               f"{out_dim}-d projection; rebuild the index")
    if not all(np.isfinite(a).all() for a in (mean, components, scale)):
        raise IndexFormatError(f"{where}: holds NaN or infinite values; rebuild the index")
    return PCA(mean=mean, components=components, scale=scale, whiten=whiten)


def _read_model(gen: Generation, manifest: dict) -> tuple[VPRModel, PCA | None]:
    """model.pt, checked against the manifest's sha256 and loaded from the bytes that were hashed."""
    if gen.sha256("model.pt") != manifest["model_sha256"]:
        raise IndexFormatError(f"{gen.directory}/model.pt: does not match the manifest's sha256; rebuild the index")
    try:
        with gen.stream("model.pt") as handle:
            return load_vpr_checkpoint(handle, gen.directory / "model.pt")
    except CheckpointError as exc:
        raise IndexFormatError(f"{gen.directory}: {exc}") from exc


def _read_database(gen: Generation, manifest: dict, lazy: bool) -> tuple[GeoImageSet, np.ndarray | RowReader]:
    """The database's labels and descriptors: in memory, or when `lazy` a `RowReader` (and, above
    LAZY_PATHS_ROWS images, paths read on demand from the file, which then stays open)."""
    count, dim = manifest["count"], manifest["dim"]
    where = Path(f"{gen.directory}/database.h5")
    lazy_paths = lazy and count > LAZY_PATHS_ROWS
    handle = gen.stream("database.h5")
    try:
        f = h5py.File(handle, "r")
    except OSError as exc:
        handle.close()
        raise IndexFormatError(f"{where}: unreadable or missing datasets ({exc}); rebuild the index") from exc
    try:
        _same_generation(manifest, f.attrs, str(where))
        try:
            labels = {key: f[key] for key in ("paths", "descriptors", "utm", "heading", "time") if key in f}
            stored = labels["descriptors"]
            if stored.dtype != np.float32 or stored.shape != (count, dim) or labels["paths"].shape != (count,):
                raise IndexFormatError(
                    f"{where}: holds {labels['paths'].shape[0] if labels['paths'].ndim else 0} paths and descriptors "
                    f"{stored.shape} {stored.dtype}, manifest says {count} x {dim} float32; rebuild the index"
                )
            if labels["paths"].dtype.kind not in "OSU":
                raise IndexFormatError(f"{where}: paths are {labels['paths'].dtype}, not text; rebuild the index")
            paths = StoredPaths(labels["paths"]) if lazy_paths else [Path(p) for p in labels["paths"][:].astype(str)]
            descriptors = None if lazy else stored[:]
            offset = stored.id.get_offset() if stored.chunks is None and stored.compression is None else None
            utm, heading, time = (_float_array(labels.get(key), key, where) for key in ("utm", "heading", "time"))
        except (OSError, KeyError, TypeError, ValueError) as exc:
            raise IndexFormatError(f"{where}: unreadable or missing datasets ({str(exc)[:80]}); rebuild the index") from None
        if utm is not None and (utm.shape != (count, 2) or heading is None or heading.shape != (count,)):
            raise IndexFormatError(f"{where}: utm/heading shapes do not match {count} images; rebuild the index")
        if time is not None and time.shape != (count,):
            raise IndexFormatError(f"{where}: time has shape {time.shape}, not ({count},); rebuild the index")
    except BaseException:
        f.close()
        handle.close()
        raise
    if not lazy_paths:
        f.close()
        handle.close()
    max_norm = manifest.get("max_norm")
    if lazy:
        if offset is None:
            raise IndexFormatError(f"{where}: descriptors are not stored as vpr writes them (contiguous); rebuild the index")
        descriptors = RowReader(FileRows(gen.stream("database.h5"), offset, (count, dim)), where, max_norm=max_norm)
    else:
        check_rows(descriptors, where, max_norm)
    zone = tuple(manifest["zone"]) if manifest.get("zone") else None
    return GeoImageSet(paths=paths, utm=utm, heading=heading, zone=zone, source=where, time=time), descriptors


def _float_array(dataset, key: str, where: Path) -> np.ndarray | None:
    if dataset is None:
        return None
    if dataset.dtype.kind not in "fiu":
        raise IndexFormatError(f"{where}: {key} is {dataset.dtype}, not numbers; rebuild the index")
    return np.asarray(dataset[:], dtype=np.float64)


def _read_faiss(gen: Generation, manifest: dict):
    """index.faiss (ivfpq, hnsw), hashed as it is read and checked against the manifest's size and count."""
    if manifest["index_kind"] == "flat" or not faiss_available():
        return None
    where = f"{gen.directory}/index.faiss"
    if not gen.has("index.faiss"):
        raise IndexFormatError(f"{gen.directory}: index.faiss is missing; rebuild the index with `vpr build-index`")
    expected = (manifest.get("files") or {}).get("index.faiss")
    try:
        index, digest = read_faiss_index(gen.stream("index.faiss"))
    except RuntimeError as exc:
        raise IndexFormatError(f"{where}: not a readable FAISS index ({str(exc).splitlines()[0][:80]}); rebuild the index") from None
    if expected is not None and digest != expected["sha256"]:
        raise IndexFormatError(f"{where}: does not match the manifest's sha256; rebuild the index")
    if index.ntotal != manifest["count"] or index.d != manifest["dim"]:
        raise IndexFormatError(f"{where}: size does not match the manifest; rebuild the index")
    return index


def load_index(directory: Path, lazy: bool | None = None) -> IndexBundle:
    """Load and validate an index directory written by `write_index`, all its files of one generation.

    ivfpq and hnsw indexes (`lazy` None) keep the descriptors on disk behind a `RowReader`: re-ranking
    reads only the shortlisted rows, so memory holds the FAISS index, not N x d floats. A flat index
    is searched on the descriptors and loads them into memory (4 * d bytes per image).
    """
    return read_generation(Path(directory), lambda gen: _load(gen, lazy))


def _load(gen: Generation, lazy: bool | None) -> IndexBundle:
    manifest = manifest_of(gen)
    _check_files(gen, manifest)
    model, model_pca = _read_model(gen, manifest)
    pca = _read_pca(gen, manifest)
    lazy = manifest["index_kind"] in LAZY_KINDS if lazy is None else lazy
    database, descriptors = _read_database(gen, manifest, lazy)
    out_dim = pca.out_dim if pca else model_pca.out_dim if model_pca else model.config.descriptor_dim
    if out_dim != manifest["dim"]:
        raise IndexFormatError(
            f"{gen.directory}: the model gives {out_dim}-d descriptors but the index holds {manifest['dim']}-d; rebuild it"
        )
    faiss_index = _read_faiss(gen, manifest)
    return IndexBundle(gen.directory, manifest, model, model_pca, pca, database, descriptors, faiss_index, generation=gen)
