"""Parsers for the ground-truth files of the standard VPR benchmarks, each in its authors' own format.

Each reader returns the file's own lists and indices (nothing mapped onto vpr's image sets yet): gsv-cities'
`.npy` name lists and positives, the NetVLAD `dbStruct` `.mat` (MATLAB v5 or v7.3), VPR-Bench's
`ground_truth_new.npy`, Patch-NetVLAD's `.npz`, and the raw MSLS per-city CSVs. `docs/benchmark-formats.md`
cites the authors' code for every rule.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vpr.data.datasets import read_csv, row_dict
from vpr.errors import LabelError, UsageError

# What an object array saved by np.save may need to rebuild itself (numpy 1.x and 2.x module names); nothing else
# is ever imported, so a ground-truth .npy cannot run code when it is read.
_NUMPY_PICKLE = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "ndarray"), ("numpy", "dtype"),
}


_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class _NumpyOnly(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays, numpy scalars and plain Python values, and refuses anything else."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _NUMPY_PICKLE:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a numpy array")
        return super().find_class(module, name)


def require_file(path: Path, what: str, parameter: str = "root") -> Path:
    """`path` if it is a file, else a `UsageError` naming the file expected and where (and the parameter to check)."""
    if not path.is_file():
        raise UsageError(f"{path.parent}: no {path.name} ({what}) there; put it there or check `{parameter}`")
    return path


def load_npy(path: Path) -> np.ndarray:
    """A `.npy` array, object arrays included (rebuilt without running any code the file might carry)."""
    try:
        with open(path, "rb") as f:
            header = _NPY_HEADERS.get(np.lib.format.read_magic(f))
            shape, _, dtype = header(f) if header else ((), False, np.dtype(np.float64))
            if not dtype.hasobject:
                f.seek(0)
                return np.load(f, allow_pickle=False)
            array = _NumpyOnly(f, encoding="latin1").load()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it ({exc.strerror}); check the path") from None
    except (ValueError, EOFError, pickle.UnpicklingError, AttributeError, TypeError) as exc:
        raise LabelError(f"{path}: not a readable numpy .npy array ({exc}); write it with np.save") from None
    if not isinstance(array, np.ndarray) or array.shape != shape:
        raise LabelError(f"{path}: its pickled array does not match its header {shape}; write it with np.save")
    return array


def npy_names(path: Path) -> list[str]:
    """An image-name list saved as a 1-D string array (gsv-cities' `*_dbImages.npy`, `*_qImages.npy`)."""
    array = load_npy(path)
    if array.ndim != 1 or not all(isinstance(name, str) for name in array.tolist()):
        raise LabelError(f"{path}: expected a 1-D array of image names, got {array.dtype} {list(array.shape)}")
    return [str(name) for name in array.tolist()]


def index_row(value: object, size: int, where: str, none: int | None = None) -> np.ndarray:
    """One query's positives as sorted unique int64 indices below `size`; `none` marks "no positive" (VPR-Bench's -1)."""
    flat = np.asarray(value, dtype=object).ravel().tolist()
    out = []
    for item in flat:
        numeric = isinstance(item, (int, float, np.integer, np.floating)) and not isinstance(item, bool)
        number = float(item) if numeric else math.nan
        if not number.is_integer():
            raise LabelError(f"{where}: positive {item!r} is not a database index; fix the ground-truth file")
        if none is not None and number == none:
            continue
        if not 0 <= number < size:
            raise LabelError(f"{where}: positive {int(number)} is outside the {size} database images; fix the file")
        out.append(int(number))
    return np.array(sorted(set(out)), dtype=np.int64)


def gsv_positives(path: Path, size: int) -> list[np.ndarray]:
    """gsv-cities positives: an object array of index arrays, or a plain 2-D int array (SPED, ESSEX), one row a query."""
    array = load_npy(path)
    if array.ndim == 0 or (array.dtype != object and array.ndim != 2):
        raise LabelError(f"{path}: expected one row of database indices per query, got {array.dtype} {list(array.shape)}")
    return [index_row(row, size, f"{path} row {i}") for i, row in enumerate(array)]


def vprbench_positives(path: Path, size: int) -> list[np.ndarray]:
    """VPR-Bench positives: row i of a (Q, 2) object array is `[query index, [ref indices]]`; only the row position counts."""
    array = load_npy(path)
    if array.ndim != 2 or array.shape[1] != 2:
        raise LabelError(f"{path}: expected VPR-Bench's (queries, 2) array of [query, [refs]] rows, not {list(array.shape)}")
    return [index_row(row, size, f"{path} row {i}", none=-1) for i, row in enumerate(array[:, 1])]


@dataclass(frozen=True)
class DbStruct:
    """The fields of a NetVLAD `dbStruct` that define a test set: image names, UTM (N x 2) and the positive radius."""

    db_images: list[str]
    utm_db: np.ndarray
    q_images: list[str]
    utm_q: np.ndarray
    pos_dist_thr: float
    which_set: str


_CELLS, _MATRICES = ("dbImageFns", "qImageFns"), ("utmDb", "utmQ", "posDistThr")


def read_dbstruct(path: Path) -> DbStruct:
    """The `dbStruct` of a Pitts/Tokyo `.mat` (Relja's field names, dbBase.m), MATLAB v5 (scipy) or v7.3 (h5py)."""
    import h5py

    fields = _dbstruct_v73(path) if h5py.is_hdf5(path) else _dbstruct_v5(path)
    db, q = fields["dbImageFns"], fields["qImageFns"]
    utm_db, utm_q = (_utm(fields[key], count, f"{path}: {key}") for key, count in (("utmDb", len(db)), ("utmQ", len(q))))
    threshold = np.asarray(fields["posDistThr"], dtype=np.float64).ravel()
    if threshold.size != 1 or not threshold[0] > 0:
        raise LabelError(f"{path}: posDistThr is {threshold.tolist()}, not one positive distance in metres")
    return DbStruct(db, utm_db, q, utm_q, float(threshold[0]), fields.get("whichSet", ""))


def _check_fields(names: list[str], path: Path) -> None:
    """Refuse a dbStruct without the fields a test set needs."""
    missing = [name for name in _CELLS + _MATRICES if name not in names]
    if missing:
        raise LabelError(
            f"{path}: dbStruct has no {', '.join(missing)} (found {', '.join(names)}); give a NetVLAD dbStruct .mat"
        )


def _utm(value: np.ndarray, count: int, where: str) -> np.ndarray:
    """MATLAB's 2 x N UTM matrix as N x 2 (east, north)."""
    array = np.asarray(value, dtype=np.float64)
    if array.shape != (2, count) or not np.isfinite(array).all():
        raise LabelError(f"{where} is {list(array.shape)}, expected 2 x {count} finite UTM coordinates")
    return np.ascontiguousarray(array.T)


def _dbstruct_v5(path: Path) -> dict[str, object]:
    """The dbStruct fields of a MATLAB v5 file (scipy), matrices in MATLAB orientation, cells as lists of strings."""
    from scipy.io import loadmat

    try:
        struct = loadmat(str(path))["dbStruct"][0, 0]
    except (KeyError, IndexError):
        raise LabelError(f"{path}: no dbStruct variable; give a NetVLAD dbStruct .mat (e.g. pitts30k_test.mat)") from None
    except (ValueError, TypeError, NotImplementedError, OSError) as exc:
        raise LabelError(f"{path}: not a readable MATLAB .mat file ({exc})") from None
    _check_fields(list(struct.dtype.names or ()), path)
    fields: dict[str, object] = {
        name: [_mat_string(item, path, name) for item in struct[name].ravel(order="F")] for name in _CELLS
    }
    fields.update({name: struct[name] for name in _MATRICES})
    if "whichSet" in struct.dtype.names and struct["whichSet"].dtype.kind == "U":
        fields["whichSet"] = "".join(struct["whichSet"].ravel().tolist())
    return fields


def _mat_string(item: object, path: Path, field: str) -> str:
    """One cell of a v5 cell array of strings."""
    flat = np.asarray(item).ravel()
    if flat.size != 1 or not isinstance(flat[0], str):
        raise LabelError(f"{path}: {field} holds {flat.tolist()!r}, not an image file name")
    return str(flat[0])


def _dbstruct_v73(path: Path) -> dict[str, object]:
    """The dbStruct fields of a MATLAB v7.3 (HDF5) file; h5py shows matrices transposed, so they are turned back."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            group = f.get("dbStruct")
            if not isinstance(group, h5py.Group):
                raise LabelError(f"{path}: no dbStruct group; give a NetVLAD dbStruct .mat (e.g. pitts30k_test.mat)")
            _check_fields(list(group.keys()), path)
            fields: dict[str, object] = {name: _v73_names(f, group[name], path, name) for name in _CELLS}
            fields.update({name: np.atleast_2d(np.asarray(group[name][()], dtype=np.float64)).T for name in _MATRICES})
            if "whichSet" in group and _matlab_class(group["whichSet"]) == "char":
                fields["whichSet"] = _chars(group["whichSet"][()])
            return fields
    except OSError as exc:
        raise LabelError(f"{path}: not a readable MATLAB v7.3 file ({exc})") from None
    except (TypeError, ValueError) as exc:
        raise LabelError(f"{path}: dbStruct fields are not what NetVLAD writes ({exc}); give a NetVLAD dbStruct .mat") from None


def _matlab_class(dataset) -> str:
    """A v7.3 dataset's MATLAB class (double, char, cell, ...)."""
    kind = dataset.attrs.get("MATLAB_class", b"double")
    return kind.decode() if isinstance(kind, bytes) else str(kind)


def _v73_names(f, dataset, path: Path, name: str) -> list[str]:
    """A v7.3 cell of strings: object references, in MATLAB's column-major order, to char datasets."""
    if _matlab_class(dataset) != "cell":
        raise LabelError(f"{path}: {name} is a {_matlab_class(dataset)} array, not a cell of image file names")
    names = []
    for ref in np.ravel(dataset[()]):
        target = f[ref]
        if _matlab_class(target) != "char":
            raise LabelError(f"{path}: {name} holds a {_matlab_class(target)} cell, not image file names")
        names.append(_chars(target[()]))
    return names


def _chars(codes: np.ndarray) -> str:
    """MATLAB char data (UTF-16 code units) as a string."""
    return np.asarray(codes, dtype="<u2").ravel().tobytes().decode("utf-16-le")


def read_patchnetvlad(path: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """(utmQ, utmDb, posDistThr) of a Patch-NetVLAD ground-truth `.npz`."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in ("utmQ", "utmDb", "posDistThr") if key not in archive.files]
            if missing:
                raise LabelError(f"{path}: no {', '.join(missing)} in it (found {archive.files}); give a Patch-NetVLAD .npz")
            utm_q, utm_db = (np.asarray(archive[key], dtype=np.float64) for key in ("utmQ", "utmDb"))
            threshold = np.asarray(archive["posDistThr"], dtype=np.float64).ravel()
    except (ValueError, OSError) as exc:
        raise LabelError(f"{path}: not a readable .npz archive ({exc})") from None
    for key, array in (("utmQ", utm_q), ("utmDb", utm_db)):
        if array.ndim != 2 or array.shape[1] != 2 or not np.isfinite(array).all():
            raise LabelError(f"{path}: {key} is {list(array.shape)}, expected N x 2 finite coordinates")
    if threshold.size != 1 or not threshold[0] > 0:
        raise LabelError(f"{path}: posDistThr is {threshold.tolist()}, not one positive distance")
    return utm_q, utm_db, float(threshold[0])


def read_image_list(path: Path) -> list[str]:
    """Patch-NetVLAD's image list: one relative path per line."""
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeError) as exc:
        raise LabelError(f"{path}: cannot read the image list ({exc}); check the file") from None


def radius_positives(db_utm: np.ndarray, q_utm: np.ndarray, radius: float, algorithm: str = "auto") -> list[np.ndarray]:
    """Database indices within `radius` (inclusive) of each query, sorted, found as the authors do (scikit-learn
    `radius_neighbors`, with their `algorithm`: MSLS asks for "brute", NetVLAD and Patch-NetVLAD leave it "auto")."""
    if len(db_utm) == 0:
        return [np.zeros(0, dtype=np.int64) for _ in range(len(q_utm))]
    from sklearn.neighbors import NearestNeighbors

    knn = NearestNeighbors(algorithm=algorithm).fit(db_utm)
    found = knn.radius_neighbors(q_utm, radius=radius, return_distance=False) if len(q_utm) else []
    return [np.sort(idx).astype(np.int64) for idx in found]


@dataclass(frozen=True)
class MslsPart:
    """One city's query or database images as mapillary_sls keeps them: keys, UTM (east, north) and lat/lon."""

    keys: list[str]
    utm: np.ndarray
    latlon: np.ndarray


MSLS_FILES = ("postprocessed.csv", "raw.csv", "seq_info.csv", "subtask_index.csv")


def read_msls_part(folder: Path, subtask: str = "all", parameter: str = "root") -> MslsPart:
    """The frames of `folder` (a city's query/ or database/) in `subtask`, panoramas left out (msls.py:98-130, im2im)."""
    tables = {name: _msls_table(require_file(folder / name, "an MSLS metadata CSV", parameter)) for name in MSLS_FILES}
    keys = [row.get("key", "").strip() for _, row in tables["seq_info.csv"]]
    in_subtask = [_msls_bool(row, subtask, folder / "subtask_index.csv", line) for line, row in tables["subtask_index.csv"]]
    pano = [_msls_bool(row, "pano", folder / "raw.csv", line) for line, row in tables["raw.csv"]]
    raw = tables["raw.csv"]
    chosen, utm, latlon, seen = [], [], [], set()
    for line, row in tables["postprocessed.csv"]:
        where = f"{folder / 'postprocessed.csv'}:{line}"
        index = _msls_int(row.get("", ""), where)
        if index in seen:
            raise LabelError(f"{where}: row index {index} appears twice; use MSLS's own postprocessed.csv")
        seen.add(index)
        kept = 0 <= index < min(len(keys), len(in_subtask), len(pano)) and in_subtask[index] and not pano[index]
        if not kept:
            continue
        chosen.append(keys[index])
        utm.append((_msls_float(row, "easting", where), _msls_float(row, "northing", where)))
        raw_row, raw_where = raw[index][1], f"{folder / 'raw.csv'}:{raw[index][0]}"
        latlon.append((_msls_float(raw_row, "lat", raw_where), _msls_float(raw_row, "lon", raw_where)))
    return MslsPart(chosen, _pairs(utm), _pairs(latlon))


def _pairs(rows: list[tuple[float, float]]) -> np.ndarray:
    """Coordinate pairs as an N x 2 float64 array (0 x 2 when there are none)."""
    return np.array(rows, dtype=np.float64).reshape(-1, 2)


def _msls_table(path: Path) -> list[tuple[int, dict[str, str]]]:
    """The rows of an MSLS CSV (pandas' `to_csv` layout, index in the first, unnamed column)."""
    header, rows = read_csv(path)
    header = [""] + header[1:] if header else header
    return [(line, row_dict(header, cells)) for line, cells in rows]


def _msls_bool(row: dict[str, str], column: str, path: Path, line: int) -> bool:
    """A True/False cell as pandas reads it (also 1/0)."""
    text = (row.get(column) or "").strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise LabelError(f"{path}:{line}: column '{column}' is {text!r}, not True/False; use MSLS's own CSV")
    return text in ("true", "1")


def _msls_int(text: str, where: str) -> int:
    """The row index of a postprocessed.csv row."""
    try:
        return int(text.strip())
    except ValueError:
        raise LabelError(f"{where}: row index {text!r} is not an integer; use MSLS's own CSV") from None


def _msls_float(row: dict[str, str], column: str, where: str) -> float:
    """A finite number from column `column`."""
    try:
        value = float((row.get(column) or "").strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise LabelError(f"{where}: column '{column}' is {row.get(column)!r}, not a number; use MSLS's own CSV")
    return value
