"""Retrieval results and global descriptors in the SfM tools' own formats (docs/interop.md).

Pairs: hloc's retrieval list (`query db` lines, as `pairs_from_retrieval` writes them), COLMAP's custom match
list (the same lines: `matches_importer --match_type pairs` reads them) and kapture's pairsfile (`query, map,
score` rows, as kapture-localization's `compute_image_pairs` writes them). Global features: hloc's HDF5 (one
group per image holding `global_descriptor`), a kapture `reconstruction/global_features/TYPE/` folder, or one
NumPy `.npz` with `names`, `descriptors` and `format`. Image names are paths relative to the image folder the
tool is given, with `/` separators (`relative_names`).

Ownership: an existing output is replaced only when vpr wrote it. The HDF5 and `.npz` files say so in their
`format`, the kapture pairsfile in a `# written by vpr` comment (kapture's readers skip `#` lines) and the
kapture folder in its `.vpr-owned` marker; hloc and COLMAP lists hold no comment (hloc parses every line), so
every pairs file is tagged in its extended attribute `user.vpr` with its content's hash (`vpr.fileio.tag_file`).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from vpr.errors import DependencyError, OutputError, UsageError
from vpr.fileio import (
    MARKER, atomic_dir, atomic_file, check_replaceable_file, h5_file, is_tagged_file, keeps_tags, marker_kind, output_lock,
    tagged_file,
)

PAIRS_FORMATS = ("hloc", "colmap", "kapture")
FEATURE_FORMATS = ("hloc", "kapture", "npy")
FEATURES_FORMAT = "vpr-global-features"  # the `format` of vpr's hloc HDF5 and .npz files
KAPTURE_HEADER = ("# kapture format: 1.1", "# query_image, map_image, score", "# written by vpr")
KAPTURE_KIND = "kapture-global-features"  # the marker kind of vpr's kapture global-features folder
PAIRS_TAG = "pairs"
CHUNK_BYTES = 64 << 20  # descriptor rows read from the source at a time


def common_root(*image_lists: Sequence[str | Path]) -> Path:
    """The deepest folder holding every image given (a video's frames: the folder holding the video), so names
    relative to it stay unique across all the lists."""
    from vpr.data.frames import holder

    folders = {str(holder(Path(os.path.abspath(path)))) for paths in image_lists for path in paths}
    common = Path(os.path.commonpath(sorted(folders)))
    return common.parent if common.is_file() else common


def relative_names(paths: Sequence[str | Path], root: str | Path) -> list[str]:
    """Image names as the SfM tools expect them: each path relative to the folder `root` (a CSV manifest stands
    for the folder holding it), with `/` separators; a path outside `root` is an error."""
    base = Path(os.path.abspath(root))
    if base.is_file():
        base = base.parent
    names = []
    for path in paths:
        full = Path(os.path.abspath(path))
        if full == base or base not in full.parents:
            raise UsageError(f"{path}: lies outside `root` {root}; give the folder that holds every image")
        names.append(full.relative_to(base).as_posix())
    return names


def write_pairs(out: str | Path, query_names: Sequence[str], db_names: Sequence[str], indices: np.ndarray,
                scores: np.ndarray, fmt: str, *, num_matched: int | None = None, min_score: float | None = None) -> int:
    """Write retrieval pairs (`indices`/`scores`: N x K database rows and similarities per query, best first; -1 =
    none) as `fmt`, leaving out self pairs (same name), pairs below `min_score` and those past `num_matched` per
    query; returns how many pairs it wrote."""
    out = Path(out)
    _check_format(fmt, PAIRS_FORMATS)
    indices, scores = np.asarray(indices), np.asarray(scores)
    if indices.ndim != 2 or scores.shape != indices.shape or len(indices) != len(query_names) or (
            indices.size and not np.issubdtype(indices.dtype, np.integer)):
        raise UsageError(f"`out` {out}: `indices` (integers) and `scores` must both be (queries x K) for {len(query_names)} "
                         f"queries, got {indices.shape} {indices.dtype} and {scores.shape}")
    if num_matched is not None and (isinstance(num_matched, bool) or num_matched < 1):
        raise UsageError(f"`num_matched` {num_matched}: must be at least 1")
    if indices.size and (indices.max() >= len(db_names) or indices.min() < -1):
        raise UsageError(f"`out` {out}: `indices` holds rows outside the {len(db_names)} database names")
    for name in (*query_names, *db_names):
        _check_pair_name(name, fmt, out)
    check_pairs_path(out)
    count = 0
    with tagged_file(out, PAIRS_TAG) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            if fmt == "kapture":
                f.write("\n".join(KAPTURE_HEADER) + "\n")
            for query, rows, values in zip(query_names, indices, scores):
                kept = 0
                for row, score in zip(rows, values):
                    if num_matched is not None and kept >= num_matched:
                        break
                    if row < 0 or db_names[row] == query or (min_score is not None and score < min_score):
                        continue
                    f.write(f"{query}, {db_names[row]}, {float(score)!r}\n" if fmt == "kapture" else f"{query} {db_names[row]}\n")
                    kept += 1
                count += kept
    return count


def check_pairs_path(out: str | Path) -> None:
    """Refuse, before any work, a pairs path that holds something vpr cannot prove it wrote."""
    out = Path(out)
    if out.is_file() and not out.is_symlink() and not is_vpr_pairs(out) and not keeps_tags(out):
        raise OutputError(f"`out` {out}: exists and vpr cannot tell it wrote it (its filesystem keeps no extended "
                          "attributes); choose another `out` or remove it yourself")
    check_replaceable_file(out, is_vpr_pairs, "pairs file", "`out`")


def is_vpr_pairs(path: Path) -> bool:
    """Whether `path` is a pairs file vpr wrote: tagged by vpr and unchanged since, or a kapture pairsfile with
    vpr's comment."""
    if is_tagged_file(path, PAIRS_TAG):
        return True
    try:
        with open(path, encoding="utf-8") as f:
            return tuple(f.readline().rstrip("\n") for _ in KAPTURE_HEADER) == KAPTURE_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def write_global_features(out: str | Path, names: Sequence[str], descriptors, fmt: str, *,
                          feature_type: str = "vpr") -> Path:
    """Write one global descriptor per image name (`descriptors`: N x D rows, an array or a lazy row reader read in
    chunks) as `fmt`; kapture's go under `out`/reconstruction/global_features/`feature_type`. Returns what it wrote."""
    out = Path(out)
    _check_format(fmt, FEATURE_FORMATS)
    shape = tuple(getattr(descriptors, "shape", ()))
    if len(shape) != 2 or shape[0] != len(names):
        raise UsageError(f"`out` {out}: `descriptors` must be (images x D) for {len(names)} names, got {shape}")
    if len(set(names)) != len(names):
        raise UsageError(f"`out` {out}: image names repeat; give each image once")
    for name in names:
        if not name or "\n" in name or "\r" in name or name.startswith("/") or {".", ".."} & set(name.split("/")):
            raise UsageError(f"`out` {out}: image name {name!r} is no relative image path; name images with `relative_names`")
    if fmt == "hloc":
        return _write_hloc_features(out, names, descriptors)
    if fmt == "npy":
        return _write_npz(out, names, descriptors)
    return _write_kapture_features(out, names, descriptors, feature_type)


def _write_hloc_features(out: Path, names: Sequence[str], descriptors) -> Path:
    """hloc's layout (`extract_features`): a group per name (nested at `/`) holding float32 `global_descriptor` (D,)."""
    _check_suffix(out, (".h5", ".hdf5"), "an .h5 file")
    check_replaceable_file(out, is_vpr_features, "global-features file", "`out`")
    with atomic_file(out) as tmp, h5_file(tmp) as f:
        f.attrs["format"] = FEATURES_FORMAT
        for start, rows in _chunks(descriptors, out):
            for name, row in zip(names[start:start + len(rows)], rows):
                try:
                    f.require_group(name).create_dataset("global_descriptor", data=row)
                except (TypeError, ValueError) as exc:
                    raise UsageError(f"`out` {out}: image name {name!r} clashes with another image's group; rename it") from exc
    return out


def _write_npz(out: Path, names: Sequence[str], descriptors) -> Path:
    """One uncompressed `.npz` (`np.load`): `names` (N strings), `descriptors` (N x D float32), `format`."""
    _check_suffix(out, (".npz",), "an .npz file")
    check_replaceable_file(out, is_vpr_features, "global-features file", "`out`")
    with atomic_file(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, value in (("format", np.array(FEATURES_FORMAT)), ("names", np.array(list(names), dtype=str))):
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, value, allow_pickle=False)
        with archive.open("descriptors.npy", "w", force_zip64=True) as member:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False,
                      "shape": tuple(int(n) for n in descriptors.shape)}
            np.lib.format.write_array_header_1_0(member, header)
            for _, rows in _chunks(descriptors, out):
                member.write(rows.astype("<f4", copy=False).tobytes())
    return out


def is_vpr_features(path: Path) -> bool:
    """Whether `path` is a global-features HDF5 or `.npz` file vpr wrote (its `format`)."""
    try:
        if zipfile.is_zipfile(path):
            with np.load(path, allow_pickle=False) as archive:
                return "format" in archive.files and str(archive["format"]) == FEATURES_FORMAT
        import h5py

        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == FEATURES_FORMAT
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return False


def _write_kapture_features(out: Path, names: Sequence[str], descriptors, feature_type: str) -> Path:
    """kapture's own writers: TYPE/global_features.txt (float32, D, L2) and one raw NAME.gfeat per image."""
    if not feature_type or feature_type.startswith(".") or not all(c.isalnum() or c in "_-." for c in feature_type):
        raise UsageError(f"`feature_type` {feature_type!r}: use letters, digits, '_', '-' or '.' (a folder name)")
    kapture = _kapture()
    from kapture.io.csv import get_feature_csv_fullpath, global_features_to_file
    from kapture.io.features import get_global_features_fullpath, image_global_features_to_file

    folder = out / "reconstruction" / "global_features" / feature_type
    if out.exists() and not out.is_dir():
        raise OutputError(f"`out` {out}: names an existing file; give a kapture folder (new, or a kapture dataset)")
    with output_lock(folder), atomic_dir(folder, kind=KAPTURE_KIND, foreign=_foreign_kapture, option="`out`") as tmp:
        root = str(tmp.parent.parent.parent)  # kapture's paths name the temporary as the type; its config says the type
        for start, rows in _chunks(descriptors, out):
            for name, row in zip(names[start:start + len(rows)], rows):
                image_global_features_to_file(get_global_features_fullpath(tmp.name, root, name), row)
        features = kapture.GlobalFeatures(feature_type, np.float32, int(descriptors.shape[1]), "L2", list(names))
        global_features_to_file(get_feature_csv_fullpath(kapture.GlobalFeatures, tmp.name, root), features)  # last:
        # a killed run leaves no folder that kapture would list as a second feature type
    return folder


def _foreign_kapture(folder: Path) -> list[str]:
    """Entries of a global-features folder that are not vpr's (all of them unless its marker says vpr wrote it)."""
    names = os.listdir(folder)
    if marker_kind(folder) != KAPTURE_KIND:
        return sorted(names)
    ours = {MARKER, "global_features.txt"}
    return sorted(n for n in names if n not in ours and not n.endswith(".gfeat") and not (folder / n).is_dir())


def _kapture():
    """The kapture package, imported only when a kapture folder is written."""
    try:
        import kapture
    except ImportError as exc:
        raise DependencyError("kapture is not installed: pip install -e '.[interop]'") from exc
    return kapture


def _chunks(descriptors, out: Path) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, float32 rows) blocks of about CHUNK_BYTES; a row holding NaN or infinity is an error."""
    total, dim = (int(n) for n in descriptors.shape)
    step = max(1, CHUNK_BYTES // max(1, 4 * dim))
    for start in range(0, total, step):
        rows = np.ascontiguousarray(descriptors[start:start + step], dtype=np.float32)
        if not np.isfinite(rows).all():
            raise UsageError(f"`out` {out}: `descriptors` hold NaN or infinite values; nothing was written")
        yield start, rows


def _check_format(fmt: str, formats: tuple[str, ...]) -> None:
    if fmt not in formats:
        raise UsageError(f"`fmt` {fmt!r}: choose one of {', '.join(formats)}")


def _check_suffix(out: Path, suffixes: tuple[str, ...], what: str) -> None:
    if out.suffix.lower() not in suffixes:
        raise UsageError(f"`out` {out}: name {what} ({' or '.join(suffixes)})")


def _check_pair_name(name: str, fmt: str, out: Path) -> None:
    """Refuse a name the tool would misread: hloc and COLMAP split lines at spaces, kapture at commas and trims."""
    bad = (not name or name.startswith("#") or "\n" in name or "\r" in name
           or (any(c.isspace() for c in name) if fmt != "kapture" else ("," in name or name != name.strip())))
    if bad:
        raise UsageError(f"`out` {out}: image name {name!r} cannot go into a {fmt} pairs file "
                         f"({'spaces' if fmt != 'kapture' else 'commas, edge spaces'}, '#' first or line breaks); rename the image")
