"""Where each benchmark's files lie and what they define: the file sets of a ground-truth kind, the folder layouts
`load_benchmark` knows, and the protocol each states (with the authors' file:line, as in docs/benchmark-formats.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vpr.data import benchmark_files as files
from vpr.data.datasets import GeoImageSet
from vpr.data.geo import latlon_to_utm
from vpr.errors import LabelError, UsageError

BENCHMARKS = ("pitts30k", "pitts250k", "tokyo247", "msls-val", "nordland", "sped", "vpr-bench")
MSLS_VAL_CITIES = ("cph", "sf")
MSLS_THRESHOLD = 25.0
GSV_SUFFIXES = ("_gt_25m", "_gt", "_pIdx")
NETVLAD_SOURCE = ("Nanne/pytorch-NetVlad@def998ec pittsburgh.py:73-99 (dbStruct), :129-139 (radius_neighbors within "
                  "posDistThr, inclusive), main.py:198-221 (recall@1,5,10,20); Relja/netvlad@652dbe71 datasets/dbBase.m:6-13")
TOKYO_SOURCE = "Relja/netvlad@652dbe71 datasets/dbTokyo247.m:16-23; QVPR/Patch-NetVLAD@39ab4e45 feature_match.py:127-138"
GSV_SOURCE = ("amaralibey/gsv-cities@77ffffc2 dataloaders/val/PittsburghDataset.py:29-42, MapillaryDataset.py:18-26, "
              "utils/validation.py:7-47, main.py:206")
MSLS_SOURCE = ("mapillary/mapillary_sls@b6c4e43f mapillary_sls/datasets/msls.py:101-165 (subtask, no panoramas, "
               "radius_neighbors brute, queries with a positive), evaluate.py:62-68, utils/eval.py:36-66 (recall, mAP@k)")
VPRBENCH_SOURCE = ("MubarizZaffar/VPR-Bench@77ad30f3 evaluate_vpr_techniques.py:27-30,69 (numeric image order), "
                   "performance_comparison.py:82-103,252-264 (rows by position, RecallRate@N, matches)")


@dataclass(frozen=True)
class Truth:
    """A ground-truth file's own image names (database, queries) and positives as indices into its database list."""

    db_names: list[str]
    q_names: list[str]
    positives: list[np.ndarray]


def gsv_prefix(path: Path) -> Path | None:
    """`datasets/Pittsburgh/pitts30k_test` for `.../pitts30k_test_gt.npy` (also `_gt_25m`, `_pIdx`), else None."""
    stem = Path(path).stem
    suffix = next((s for s in GSV_SUFFIXES if stem.endswith(s) and len(stem) > len(s)), None)
    return None if suffix is None else Path(path).with_name(stem[: -len(suffix)])


def read_gsv(path: Path, parameter: str = "path") -> Truth:
    """gsv-cities/OpenVPRLab ground truth with its `_dbImages.npy`/`_qImages.npy` (and, beside `_pIdx`, `_qIdx.npy`)."""
    prefix = gsv_prefix(path)
    if prefix is None:
        raise LabelError(f"{path}: gsv-cities names its ground truth NAME_gt.npy (or _gt_25m, _pIdx); rename it or pass `kind`")

    def beside(suffix: str, what: str) -> Path:
        return files.require_file(prefix.with_name(prefix.name + suffix), what, parameter)

    db = files.npy_names(beside("_dbImages.npy", "gsv-cities' database names"))
    q = files.npy_names(beside("_qImages.npy", "gsv-cities' query names"))
    if path.stem.endswith("_pIdx"):
        idx_path = beside("_qIdx.npy", "gsv-cities' query subset")
        q = [q[int(i)] for i in files.index_row(files.load_npy(idx_path), len(q), str(idx_path))]
    positives = files.gsv_positives(path, len(db))
    if len(positives) != len(q):
        raise LabelError(f"{path}: {len(positives)} rows but {len(q)} query names; use the name lists written with it")
    return Truth(db, q, positives)


def read_netvlad(path: Path) -> Truth:
    """A dbStruct's names, positives within posDistThr of the UTM coordinates."""
    struct = files.read_dbstruct(path)
    return Truth(struct.db_images, struct.q_images, files.radius_positives(struct.utm_db, struct.utm_q, struct.pos_dist_thr))


def read_patchnetvlad(path: Path) -> Truth:
    """A Patch-NetVLAD `.npz` and its image lists `<name>_imageNames_{query,index}.txt` (beside it or in ../dataset_imagenames)."""
    utm_q, utm_db, threshold = files.read_patchnetvlad(path)
    keys = list(dict.fromkeys((path.stem, path.stem.rsplit("_", 1)[0])))
    for folder in (path.parent, path.parent.parent / "dataset_imagenames"):
        for key in keys:
            q_list, db_list = (folder / f"{key}_imageNames_{part}.txt" for part in ("query", "index"))
            if q_list.is_file() and db_list.is_file():
                q, db = files.read_image_list(q_list), files.read_image_list(db_list)
                for names, utm, lst in ((q, utm_q, q_list), (db, utm_db, db_list)):
                    if len(names) != len(utm):
                        raise LabelError(
                            f"{lst}: {len(names)} images but {path.name} has {len(utm)} coordinates; use the lists of that file"
                        )
                return Truth(db, q, files.radius_positives(utm_db, utm_q, threshold))
    raise UsageError(
        f"{path.parent}: no {keys[-1]}_imageNames_query.txt and _index.txt beside {path.name} or in ../dataset_imagenames; "
        "put Patch-NetVLAD's image lists there"
    )


@dataclass(frozen=True)
class MslsVal:
    """The official MSLS val benchmark: database and query keys, image paths and UTM, positives, and what was left out."""

    db_keys: list[str]
    db_paths: list[Path]
    db_utm: np.ndarray
    q_keys: list[str]
    q_paths: list[Path]
    q_utm: np.ndarray
    positives: list[np.ndarray]
    zone: tuple[int, str] | None
    without_positive: int
    cities: tuple[str, ...]


def read_msls(path: Path, parameter: str = "path") -> MslsVal:
    """MSLS val as mapillary_sls builds it (mode val, im2im, subtask all, posDistThr 25) from a root with
    train_val/{cph,sf}/, or from one city's folder (with query/ and database/)."""
    if (path / "query").is_dir():
        cities = [path]
    elif (path / "train_val").is_dir():
        cities = [path / "train_val" / city for city in MSLS_VAL_CITIES]
    else:
        raise UsageError(f"`{parameter}` {path}: no train_val/ (an MSLS root) nor query/ (one city); give the MSLS folder")
    db_keys, db_paths, q_keys, q_paths, positives, zones, left_out = [], [], [], [], [], set(), 0
    db_utm, q_utm = [], []
    for city in cities:
        if not city.is_dir():
            raise UsageError(f"{city.parent}: no {city.name}/ (an MSLS val city); get MSLS train_val or check `{parameter}`")
        q, db = (files.read_msls_part(city / part, parameter=parameter) for part in ("query", "database"))
        if not q.keys or not db.keys:
            continue
        found = files.radius_positives(db.utm, q.utm, MSLS_THRESHOLD, algorithm="brute")
        keep = [i for i, p in enumerate(found) if len(p)]
        left_out += len(found) - len(keep)
        positives += [found[i] + len(db_keys) for i in keep]
        q_keys += [q.keys[i] for i in keep]
        q_paths += [city / "query" / "images" / f"{q.keys[i]}.jpg" for i in keep]
        q_utm.append(q.utm[keep])
        db_keys += db.keys
        db_paths += [city / "database" / "images" / f"{key}.jpg" for key in db.keys]
        db_utm.append(db.utm)
        zones.add(latlon_to_utm(*db.latlon[0])[2:])
    if not q_keys:
        raise LabelError(f"{path}: no MSLS val query has a database image within {MSLS_THRESHOLD:g} m; check the CSVs")
    return MslsVal(
        db_keys, db_paths, np.concatenate(db_utm), q_keys, q_paths, np.concatenate(q_utm), positives,
        zones.pop() if len(zones) == 1 else None, left_out, tuple(city.name for city in cities),
    )


def read_truth(path: Path, kind: str) -> Truth:
    """The names and positives of a ground-truth file of a kind that names its images."""
    if kind == "msls":
        val = read_msls(path)
        return Truth(val.db_keys, val.q_keys, val.positives)
    return {"gsv-cities": read_gsv, "netvlad-mat": read_netvlad, "patch-netvlad": read_patchnetvlad}[kind](path)


def vprbench_order(images: GeoImageSet | list[Path], path: Path, role: str) -> np.ndarray:
    """Indices of the images in VPR-Bench's order, by the number their name starts with (`int(name.split('.')[0])`)."""
    numbers = []
    for image in getattr(images, "paths", images):
        head = image.name.split(".")[0]
        if not (head.isascii() and head.isdigit()):
            raise LabelError(f"{path}: VPR-Bench numbers its images but {role} image {image} is not named by a number")
        numbers.append(int(head))
    order = np.argsort(np.array(numbers, dtype=np.int64), kind="stable")
    repeated = [numbers[a] for a, b in zip(order[:-1], order[1:]) if numbers[a] == numbers[b]]
    if repeated:
        raise LabelError(f"{path}: two {role} images are both number {repeated[0]}; keep one image per number")
    return order


def load_layout(name: str, root: Path) -> tuple[GeoImageSet, GeoImageSet, list[np.ndarray], dict]:
    """(database, queries, positives, protocol) of benchmark `name` from its folder `root`."""
    if name in ("pitts30k", "pitts250k"):
        return _pittsburgh(root, f"{name}_test", f"Pittsburgh {name[5:]} test")
    if name == "tokyo247":
        mat = _first(root / "datasets" / "tokyo247.mat", root / "tokyo247.mat")
        if mat is None:
            raise UsageError(f"`root` {root}: no tokyo247.mat in {root / 'datasets'} or {root}; put the NetVLAD dbStruct there")
        return _from_mat(mat, root, "Tokyo 24/7", (root / "images", root),
                         (root / "query", root / "247query_subset_v2", root / "queries"), (54, "S"))
    if name == "msls-val":
        if (root / "train_val").is_dir():
            return _from_msls(root)
        gt = _first(root / "msls_val_pIdx.npy", root / "msls_val_gt_25m.npy")
        if gt is None:
            raise UsageError(
                f"`root` {root}: no train_val/ (raw MSLS) nor msls_val_pIdx.npy or msls_val_gt_25m.npy "
                "(gsv-cities, OpenVPRLab); give the MSLS folder"
            )
        return _from_gsv(gt, root, "MSLS val", MSLS_THRESHOLD)
    if name in ("nordland", "sped"):
        title, gt = ("Nordland", root / "Nordland_gt.npy") if name == "nordland" else ("SPED", root / "SPED_gt.npy")
        if gt.is_file():
            return _from_gsv(gt, root, title, None)
        if not (root / "ground_truth_new.npy").is_file():
            raise UsageError(
                f"`root` {root}: no {gt.name} (gsv-cities) nor ground_truth_new.npy (VPR-Bench); give the {title} folder"
            )
        return _from_vprbench(root, f"{title} (VPR-Bench)")
    return _from_vprbench(root, f"VPR-Bench {root.name}")


def _first(*candidates: Path) -> Path | None:
    """The first of `candidates` that is a file, or None."""
    return next((path for path in candidates if path.is_file()), None)


def _pittsburgh(root: Path, split: str, title: str):
    """Pitts30k/250k test from NetVLAD's .mat (root/datasets/ or root/), else gsv-cities' or OpenVPRLab's .npy in root."""
    mat = _first(root / "datasets" / f"{split}.mat", root / f"{split}.mat")
    if mat is not None:
        return _from_mat(mat, root, title, (root / "images", root), (root / "queries_real", root / "queries"), (17, "T"))
    gt = _first(root / f"{split}_gt.npy", root / f"{split}_gt_25m.npy")
    if gt is None:
        raise UsageError(
            f"`root` {root}: no {split}.mat (in {root / 'datasets'} or {root}) nor {split}_gt.npy with its name lists; "
            "put NetVLAD's .mat or gsv-cities' .npy files there"
        )
    return _from_gsv(gt, root, title, 25.0)


def _place(names: list[str], bases: tuple[Path, ...], root: Path, title: str, role: str) -> list[Path]:
    """The image files `names` point to, under the first of `bases` holding the first one (a Tokyo `.jpg` may be a `.png`)."""
    if not names:
        raise LabelError(f"`root` {root}: the {title} ground truth lists no {role} images; check the file")
    for base in bases:
        paths = [_existing(base / name) for name in names]
        if paths[0].is_file():
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise UsageError(
                    f"{base}: {len(missing)} of the {len(paths)} {title} {role} images are missing (first {missing[0]}); "
                    "complete the download"
                )
            return paths
    raise UsageError(
        f"`root` {root}: {role} image {names[0]} is in none of {', '.join(map(str, bases))}; "
        f"give the folder that holds the {title} images"
    )


def _existing(path: Path) -> Path:
    """`path`, or its `.png` twin when only that exists (Tokyo 24/7's names say .jpg, its files are .png)."""
    if not path.is_file() and path.suffix.lower() == ".jpg" and path.with_suffix(".png").is_file():
        return path.with_suffix(".png")
    return path


def _from_mat(mat: Path, root: Path, title: str, db_bases: tuple[Path, ...], q_bases: tuple[Path, ...], zone: tuple[int, str]):
    """A benchmark from a dbStruct: images under the first base that holds them, UTM from the file, positives by radius."""
    struct = files.read_dbstruct(mat)
    db_paths = _place(struct.db_images, db_bases, root, title, "database")
    q_paths = _place(struct.q_images, q_bases, root, title, "query")
    positives = files.radius_positives(struct.utm_db, struct.utm_q, struct.pos_dist_thr)
    protocol = {
        "benchmark": title, "ground_truth": str(mat),
        "positives": f"database images within {struct.pos_dist_thr:g} m (UTM) of the query, distance <= posDistThr",
        "threshold_m": struct.pos_dist_thr, "queries": f"all {len(q_paths)} queries of {mat.stem}",
        "database": f"{len(db_paths)} images", "metrics": ["R@N"], "recall_ns": [1, 5, 10, 20], "source": NETVLAD_SOURCE,
    }
    if title.startswith("Tokyo"):
        protocol["evaluation"] = ("each cutout is its own database image, as gsv-cities and VPR-methods-evaluation count "
                                  "them; NetVLAD's first-cutout-per-panorama filter (dbTokyo247.m) is not applied")
        protocol["source"] = f"{NETVLAD_SOURCE}; {TOKYO_SOURCE}"
    return (GeoImageSet(db_paths, utm=struct.utm_db, zone=zone, source=root),
            GeoImageSet(q_paths, utm=struct.utm_q, zone=zone, source=root), positives, protocol)


def _from_gsv(gt: Path, root: Path, title: str, threshold: float | None):
    """A benchmark from gsv-cities' .npy files in `root`, images at `root / name` (no coordinates)."""
    truth = read_gsv(gt, parameter="root")
    db_paths = _place(truth.db_names, (root,), root, title, "database")
    q_paths = _place(truth.q_names, (root,), root, title, "query")
    rule = f"within {threshold:g} m of the query" if threshold else "frame correspondence, no coordinates"
    protocol = {
        "benchmark": title, "ground_truth": str(gt),
        "positives": f"the database images {gt.name} lists for the query ({rule})",
        "threshold_m": threshold, "queries": f"the {len(q_paths)} queries {gt.name} lists",
        "database": f"{len(db_paths)} images", "metrics": ["R@N"], "recall_ns": [1, 5, 10, 15, 20, 25], "source": GSV_SOURCE,
    }
    return GeoImageSet(db_paths, source=root), GeoImageSet(q_paths, source=root), truth.positives, protocol


def _from_msls(root: Path):
    """MSLS val from the raw layout: the official subset, UTM easting/northing from postprocessed.csv."""
    val = read_msls(root, parameter="root")
    for paths, role in ((val.db_paths, "database"), (val.q_paths, "query")):
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise UsageError(
                f"{root}: {len(missing)} of the {len(paths)} MSLS val {role} images are missing (first {missing[0]}); "
                "complete the download"
            )
    protocol = {
        "benchmark": "MSLS val", "ground_truth": str(root / "train_val"),
        "positives": f"database images within {MSLS_THRESHOLD:g} m (UTM easting/northing) of the query; no heading condition",
        "threshold_m": MSLS_THRESHOLD,
        "queries": f"official MSLS val subset ({len(val.q_keys)}): cities {','.join(val.cities)}, subtask 'all', "
                   f"no panoramas, at least one positive ({val.without_positive} without one left out)",
        "database": f"{len(val.db_keys)} images: subtask 'all', no panoramas",
        "metrics": ["R@N", "mAP@k"], "recall_ns": [1, 5, 10, 20], "source": MSLS_SOURCE,
    }
    return (GeoImageSet(val.db_paths, utm=val.db_utm, zone=val.zone, source=root),
            GeoImageSet(val.q_paths, utm=val.q_utm, zone=val.zone, source=root), val.positives, protocol)


def _vprbench_images(folder: Path, gt: Path, role: str) -> list[Path]:
    """A VPR-Bench folder's `*.jpg` images in its numeric order."""
    if not folder.is_dir():
        raise UsageError(
            f"{folder.parent}: no {folder.name}/ folder beside {gt.name}; "
            "give a VPR-Bench dataset folder (query/, ref/, ground_truth_new.npy)"
        )
    paths = [p for p in folder.glob("*.jpg") if p.is_file()]
    if not paths:
        raise UsageError(f"{folder}: no .jpg images; VPR-Bench reads query/*.jpg and ref/*.jpg")
    return [paths[i] for i in vprbench_order(paths, gt, role)]


def _from_vprbench(root: Path, title: str):
    """A benchmark from a VPR-Bench folder: ref/*.jpg and query/*.jpg by number, rows of ground_truth_new.npy by position."""
    gt = files.require_file(root / "ground_truth_new.npy", "VPR-Bench's ground truth")
    refs, queries = _vprbench_images(root / "ref", gt, "database"), _vprbench_images(root / "query", gt, "queries")
    positives = files.vprbench_positives(gt, len(refs))
    if len(positives) != len(queries):
        raise LabelError(
            f"{gt}: {len(positives)} rows but {root / 'query'} has {len(queries)} .jpg images; use the dataset's own files"
        )
    protocol = {
        "benchmark": title, "ground_truth": str(gt),
        "positives": "the ref images row i of ground_truth_new.npy lists, for the i-th query in numeric name order (-1: none)",
        "threshold_m": None, "queries": f"{len(queries)} images in query/ (*.jpg)",
        "database": f"{len(refs)} images in ref/ (*.jpg)",
        "metrics": ["AUC-PR", "EP", "RecallRate@N", "accuracy"], "recall_ns": list(range(1, 20)), "source": VPRBENCH_SOURCE,
    }
    return GeoImageSet(refs, source=root / "ref"), GeoImageSet(queries, source=root / "query"), positives, protocol
