"""Reading an index directory's files, each checked before it is trusted: the manifest and its fields, the files it
lists (sizes, hashes, one generation), model.pt, pca.h5, database.h5 and index.faiss. A file that fails a check is
one `IndexFormatError` line that names it and says to rebuild the index.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from vpr import __version__
from vpr.data.datasets import GeoImageSet
from vpr.data.geo import is_zone
from vpr.errors import CheckpointError, IndexFormatError
from vpr.fileio import MARKER
from vpr.models.checkpoints import load_vpr_checkpoint
from vpr.models.model import VPRModel
from vpr.models.pca import PCA
from vpr.retrieval.generation import Generation, read_generation
from vpr.retrieval.local_features import LOCAL_FEATURES_FILE
from vpr.retrieval.rows import FileRows, RowReader, StoredPaths, check_rows
from vpr.retrieval.search import INDEX_KINDS, faiss_available, read_faiss_index

FORMAT = "vpr-index"
FORMAT_VERSION = 1
REQUIRED_FILES = ("manifest.json", "model.pt", "database.h5")
INDEX_FILES = frozenset((*REQUIRED_FILES, "pca.h5", "index.faiss", "skipped.txt", LOCAL_FEATURES_FILE, MARKER))
MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few kB; anything this large was not written by vpr
LAZY_PATHS_ROWS = 100_000  # above this many images, paths are read from database.h5 when asked for too


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
    for key, kind in (("generation", str), ("files", dict), ("max_norm", (int, float)), ("local_features", dict), ("dba", dict),
                      ("random_init", bool)):
        if manifest.get(key) is not None and not isinstance(manifest[key], kind):
            raise malformed(key)
    for name, record in (manifest.get("files") or {}).items():
        if name not in INDEX_FILES or not (isinstance(record, dict) and isinstance(record.get("size"), int)
                                           and isinstance(record.get("sha256"), str)):
            raise malformed("files", f"has a bad entry for {str(name)[:40]}")


def check_files(gen: Generation, manifest: dict) -> None:
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


def read_pca(gen: Generation, manifest: dict) -> PCA | None:
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


def read_model(gen: Generation, manifest: dict) -> tuple[VPRModel, PCA | None]:
    """model.pt, checked against the manifest's sha256 and loaded from the bytes that were hashed."""
    if gen.sha256("model.pt") != manifest["model_sha256"]:
        raise IndexFormatError(f"{gen.directory}/model.pt: does not match the manifest's sha256; rebuild the index")
    try:
        with gen.stream("model.pt") as handle:
            return load_vpr_checkpoint(handle, gen.directory / "model.pt")
    except CheckpointError as exc:
        raise IndexFormatError(f"{gen.directory}: {exc}") from exc


def read_database(gen: Generation, manifest: dict, lazy: bool) -> tuple[GeoImageSet, np.ndarray | RowReader]:
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
    """An optional numeric dataset of database.h5 as float64 (None when absent)."""
    if dataset is None:
        return None
    if dataset.dtype.kind not in "fiu":
        raise IndexFormatError(f"{where}: {key} is {dataset.dtype}, not numbers; rebuild the index")
    return np.asarray(dataset[:], dtype=np.float64)


def read_faiss(gen: Generation, manifest: dict):
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
