"""The standard VPR benchmarks read from their authors' own files: ground truth onto vpr's image sets, or whole benchmarks.

`read_ground_truth` gives each query's positives (database indices) from a file of any supported kind, with the
file's image names matched onto the given sets; `load_benchmark` builds database, queries, positives and the
protocol's rule from a benchmark's folder as its authors lay it out. `docs/benchmark-formats.md` cites their code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from vpr.data import benchmark_files as files
from vpr.data import benchmark_layouts as layouts
from vpr.data.datasets import GeoImageSet
from vpr.data.ground_truth import load_ground_truth
from vpr.errors import LabelError, UsageError

GT_KINDS = ("csv", "gsv-cities", "netvlad-mat", "vpr-bench", "patch-netvlad", "msls")
BENCHMARKS = layouts.BENCHMARKS
NOUNS = {"queries": ("query", "queries"), "database": ("database image", "database images")}  # singular, plural


@dataclass(frozen=True)
class Benchmark:
    """A standard benchmark as its authors define it: database, queries, each query's positives and the rule that made them."""

    name: str
    database: GeoImageSet
    queries: GeoImageSet
    positives: list[np.ndarray]
    protocol: dict


def ground_truth_kind(path: Path) -> str:
    """Which of `GT_KINDS` a ground-truth file (or MSLS folder) is, from its suffix, name and contents."""
    path = Path(path)
    if path.is_dir():
        if (path / "train_val").is_dir() or (path / "query" / "postprocessed.csv").is_file():
            return "msls"
    else:
        suffix = path.suffix.lower()
        if suffix in (".csv", ".mat", ".npz"):
            return {".csv": "csv", ".mat": "netvlad-mat", ".npz": "patch-netvlad"}[suffix]
        if suffix == ".npy":
            if path.name == "ground_truth_new.npy":
                return "vpr-bench"
            if layouts.gsv_prefix(path) is not None:
                return "gsv-cities"
            array = files.load_npy(path)
            if array.dtype == object and array.ndim == 2 and array.shape[1] == 2:
                return "vpr-bench"
    raise LabelError(f"{path}: cannot tell which ground-truth format it is; pass `kind` (one of {', '.join(GT_KINDS)})")


def read_ground_truth(path: Path, queries: GeoImageSet, database: GeoImageSet, kind: str | None = None) -> list[np.ndarray]:
    """Each query's positives (sorted database indices) from a ground-truth file of kind `kind` (None: detected).

    Where the file names its images (npy lists, .mat lists, Patch-NetVLAD's image lists, MSLS keys) they are
    matched onto `queries` and `database` by file name and trailing path; both sets must hold exactly the file's
    images, in any order. VPR-Bench's rows follow its numeric image order.
    """
    path = Path(path)
    if kind is not None and kind not in GT_KINDS:
        raise LabelError(f"{path}: `kind` {kind!r} is not a ground-truth kind; use one of {', '.join(GT_KINDS)}")
    if not path.exists():
        raise UsageError(f"`path` {path}: no such file or folder; give the ground-truth file")
    kind = kind or ground_truth_kind(path)
    if kind == "csv":
        return load_ground_truth(path, queries, database)
    if kind == "vpr-bench":
        q_map, db_map = layouts.vprbench_order(queries, path, "queries"), layouts.vprbench_order(database, path, "database")
        rows = files.vprbench_positives(path, len(database))
        _check_count(len(rows), len(queries), path, "queries")
        return _mapped(rows, q_map, db_map)
    truth = layouts.read_truth(path, kind)
    if kind == "msls":
        q_map = match_keys(truth.q_names, queries, path, "queries")
        db_map = match_keys(truth.db_names, database, path, "database")
    else:
        q_map = match_names(truth.q_names, queries, path, "queries")
        db_map = match_names(truth.db_names, database, path, "database")
    return _mapped(truth.positives, q_map, db_map)


def load_benchmark(name: str, root: Path) -> Benchmark:
    """The benchmark `name` (one of `BENCHMARKS`) from its folder `root`, laid out as its authors distribute it."""
    if name not in BENCHMARKS:
        raise UsageError(f"`name` {name!r} is not a benchmark vpr knows; use one of {', '.join(BENCHMARKS)}")
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"`root` {root}: no such folder; give the folder that holds the {name} dataset")
    database, queries, positives, protocol = layouts.load_layout(name, root)
    return Benchmark(name=name, database=database, queries=queries, positives=positives, protocol=protocol)


def _mapped(rows: list[np.ndarray], q_map: np.ndarray, db_map: np.ndarray) -> list[np.ndarray]:
    """Positives in the file's indices, moved to the given sets' indices."""
    out: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(q_map)
    for j, row in enumerate(rows):
        out[q_map[j]] = np.sort(db_map[row]).astype(np.int64)
    return out


def _check_count(listed: int, given: int, path: Path, role: str) -> None:
    """Refuse a set whose size differs from the number of images the file defines."""
    if listed != given:
        many = NOUNS[role][1]
        raise LabelError(f"{path} defines {listed} {many} but `{role}` has {given}; give exactly the benchmark's {many}")


def match_names(names: list[str], images: GeoImageSet, path: Path, role: str) -> np.ndarray:
    """For each image name of a file (a relative path), the index of the one image of `images` it names.

    A name matches images with its file name (a Tokyo 24/7 `.jpg` also its `.png`, as the images are shipped);
    several are told apart by the longest common trailing path. Every image must be named exactly once."""
    _check_count(len(names), len(images), path, role)
    by_name: dict[str, list[int]] = {}
    for i, image in enumerate(images.paths):
        by_name.setdefault(image.name, []).append(i)
    found = np.empty(len(names), dtype=np.int64)
    for j, name in enumerate(names):
        parts = tuple(part for part in PurePosixPath(name.replace("\\", "/")).parts if part not in (".", "/"))
        if not parts:
            raise LabelError(f"{path}: {NOUNS[role][0]} {j} has an empty name; fix the file")
        candidates = by_name.get(parts[-1], [])
        if not candidates and parts[-1].lower().endswith(".jpg"):
            parts = parts[:-1] + (parts[-1][:-4] + ".png",)
            candidates = by_name.get(parts[-1], [])
        if len(candidates) > 1:
            scores = [_common_tail(parts, images.paths[i].parts) for i in candidates]
            candidates = [i for i, score in zip(candidates, scores) if score == max(scores)]
        found[j] = _one(candidates, name, images, path, role)
    return _bijective(found, names, images, path, role)


def match_keys(keys: list[str], images: GeoImageSet, path: Path, role: str) -> np.ndarray:
    """For each MSLS key, the index of the image named `<key>.jpg` (or an `@` name with the key as its pano id)."""
    _check_count(len(keys), len(images), path, role)
    by_key: dict[str, list[int]] = {}
    for i, image in enumerate(images.paths):
        fields = image.name.split("@")
        key = fields[7] if image.name.startswith("@") and len(fields) > 8 else image.stem
        by_key.setdefault(key, []).append(i)
    found = np.array([_one(by_key.get(key, []), key, images, path, role) for key in keys], dtype=np.int64)
    return _bijective(found, keys, images, path, role)


def _common_tail(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    """How many trailing path components `a` and `b` share."""
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def _one(candidates: list[int], name: str, images: GeoImageSet, path: Path, role: str) -> int:
    """The one image a name matched, or a `LabelError` for none or several."""
    if len(candidates) == 1:
        return candidates[0]
    one, many = NOUNS[role]
    if candidates:
        shown = ", ".join(str(images.paths[i]) for i in candidates[:3])
        raise LabelError(
            f"{path}: {one} {name!r} is ambiguous: {len(candidates)} images in `{role}` match it ({shown}); "
            "give each image once"
        )
    where = f" ({images.source})" if images.source is not None else ""
    raise LabelError(f"{path}: {one} {name!r} is not in `{role}`{where}; give the benchmark's own {many}")


def _bijective(found: np.ndarray, names: list[str], images: GeoImageSet, path: Path, role: str) -> np.ndarray:
    """`found` if no two names matched the same image (the counts are equal, so every image was then matched)."""
    first: dict[int, int] = {}
    for j, i in enumerate(found.tolist()):
        if i in first:
            raise LabelError(
                f"{path}: {NOUNS[role][1]} {names[first[i]]!r} and {names[j]!r} both match {images.paths[i]} in `{role}`; "
                f"give the benchmark's own {NOUNS[role][1]}"
            )
        first[i] = j
    return found


KIND_RULES = {
    "csv": "the database images the CSV's positives column names for the query",
    "gsv-cities": "the database images the *_gt.npy row lists for the query (gsv-cities made them within 25 m, or "
                  "by frame for Nordland and SPED)",
    "netvlad-mat": "database images within the dbStruct's posDistThr metres (UTM) of the query, distance <= posDistThr",
    "vpr-bench": "the ref images row i of ground_truth_new.npy lists, for the i-th query in numeric name order",
    "patch-netvlad": "database images within the .npz's posDistThr metres of the query (its utmQ and utmDb)",
    "msls": "database images within 25 m (UTM easting/northing) of the query; the official val subset",
}


def ground_truth_protocol(path: Path, kind: str | None) -> dict:
    """The rule a ground-truth file of kind `kind` (None: detected) states, as `vpr eval --json` reports it."""
    kind = kind or ground_truth_kind(Path(path))
    return {"ground_truth": str(path), "kind": kind, "positives": KIND_RULES[kind]}


def positives_onto(benchmark: Benchmark, database: GeoImageSet) -> list[np.ndarray]:
    """The benchmark's positives as rows of `database`, which must hold exactly the benchmark's database images."""
    rows = {path.resolve(): i for i, path in enumerate(database.paths)}
    found = [rows.get(path.resolve()) for path in benchmark.database.paths]
    if len(rows) != len(found) or None in found:
        missing = next((p for p, i in zip(benchmark.database.paths, found) if i is None), None)
        detail = f"{missing} is not in it" if missing is not None else f"it holds {len(rows)} images, not {len(found)}"
        raise LabelError(
            f"{database.source}: the index was not built on the {benchmark.name} database ({detail}); build it with "
            f"build_index on load_benchmark({benchmark.name!r}, root).database"
        )
    db_map = np.array(found, dtype=np.int64)
    return [np.sort(db_map[row]).astype(np.int64) for row in benchmark.positives]
