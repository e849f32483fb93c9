"""Benchmark ground-truth files in their authors' own formats: tiny files written the way the authors' code
writes them (np.save of object arrays, scipy.io.savemat, a MATLAB v7.3 layout through h5py, pandas-style MSLS
CSVs), read by `read_ground_truth` and `load_benchmark`, with positives checked against values worked out by hand."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from vpr.data.benchmarks import BENCHMARKS, GT_KINDS, ground_truth_kind, load_benchmark, read_ground_truth
from vpr.data.datasets import GeoImageSet
from vpr.errors import LabelError, UsageError

# NetVLAD's synthetic test set: db at 0, 10, 25, 25.0001 m east, 100 m east and 24.9 m north; q at db 0, db 4 and far.
UTM_DB = np.array([[0, 0], [10, 0], [25, 0], [25.0001, 0], [100, 0], [0, 24.9]], float)
UTM_Q = np.array([[0, 0], [100, 0], [500, 500]], float)
DB_NAMES = [f"000/{i:06d}_pitch1_yaw1.jpg" for i in range(6)]
Q_NAMES = [f"000/{i:06d}_pitch2_yaw1.jpg" for i in range(3)]
EXPECTED = [[0, 1, 2, 5], [4], []]  # 25.0 m is in (inclusive), 25.0001 m is out


def image_set(root: Path, names: list[str]) -> GeoImageSet:
    """The images `names` under `root` (empty files: only the names matter here)."""
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()
    return GeoImageSet(paths=[root / name for name in names], source=root)


def as_lists(positives: list[np.ndarray]) -> list[list[int]]:
    return [p.tolist() for p in positives]


def cell(names: list[str]) -> np.ndarray:
    out = np.empty((len(names), 1), dtype=object)
    for i, name in enumerate(names):
        out[i, 0] = name
    return out


def save_object(path: Path, rows: list) -> None:
    """np.save of an object array of per-row values, as gsv-cities and VPR-Bench write them."""
    array = np.empty(len(rows), dtype=object)
    array[:] = [np.array(row, dtype=np.int64) if not isinstance(row, list) else row for row in rows]
    np.save(path, array)


def save_vprbench(path: Path, refs: list[list[int]]) -> None:
    """VPR-Bench's ground_truth_new.npy: a (Q, 2) object array of [query index, [ref indices]] rows."""
    gt = np.empty((len(refs), 2), dtype=object)
    for i, row in enumerate(refs):
        gt[i, 0], gt[i, 1] = i, row
    np.save(path, gt)


def dbstruct(db=DB_NAMES, q=Q_NAMES, utm_db=UTM_DB, utm_q=UTM_Q) -> dict:
    """A Pitts dbStruct with Relja's field names (datasets/dbBase.m), UTM stored 2 x N as MATLAB does."""
    return {"whichSet": "test", "dbImageFns": cell(db), "utmDb": utm_db.T, "qImageFns": cell(q), "utmQ": utm_q.T,
            "numImages": len(db), "numQueries": len(q), "posDistThr": 25.0, "posDistSqThr": 625.0, "nonTrivPosDistSqThr": 100.0}


def save_v73(path: Path, struct: dict) -> None:
    """A MATLAB v7.3 dbStruct: HDF5 with a 512-byte header, a struct group, cells as references into /#refs#."""
    def chars(text: str) -> np.ndarray:
        return np.array([[ord(c)] for c in text], dtype=np.uint16)

    with h5py.File(path, "w", userblock_size=512) as f:
        group, refs = f.create_group("dbStruct"), f.create_group("#refs#")
        for name, value in struct.items():
            if isinstance(value, str):
                data, kind = chars(value), "char"
            elif isinstance(value, np.ndarray) and value.dtype == object:
                targets = []
                for text in value[:, 0]:
                    target = refs.create_dataset(f"r{len(refs)}", data=chars(text))
                    target.attrs["MATLAB_class"] = np.bytes_("char")
                    targets.append(target.ref)
                data, kind = np.array([targets], dtype=h5py.ref_dtype), "cell"
            else:
                data, kind = np.atleast_2d(np.asarray(value, float)).T, "double"
            group.create_dataset(name, data=data).attrs["MATLAB_class"] = np.bytes_(kind)
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116) + bytes(8) + b"\x00\x02IM")


def test_kinds_and_names_are_listed():
    assert GT_KINDS == ("csv", "gsv-cities", "netvlad-mat", "vpr-bench", "patch-netvlad", "msls")
    assert BENCHMARKS == ("pitts30k", "pitts250k", "tokyo247", "msls-val", "nordland", "sped", "vpr-bench")


@pytest.mark.parametrize("version", ["v5", "v7.3"])
def test_netvlad_mat_positives_within_posdistthr(tmp_path, version):
    mat = tmp_path / "pitts30k_test.mat"
    scipy.io.savemat(mat, {"dbStruct": dbstruct()}) if version == "v5" else save_v73(mat, dbstruct())
    database = image_set(tmp_path / "db", DB_NAMES[::-1])  # reversed: file index i is database index 5 - i
    queries = image_set(tmp_path / "queries_real", Q_NAMES)
    assert ground_truth_kind(mat) == "netvlad-mat"
    assert as_lists(read_ground_truth(mat, queries, database)) == [[0, 3, 4, 5], [1], []]


def test_gsv_cities_object_and_plain_arrays(tmp_path):
    np.save(tmp_path / "Tiny_dbImages.npy", np.array(["ref/0.jpg", "ref/1.jpg", "ref/2.jpg"]))
    np.save(tmp_path / "Tiny_qImages.npy", np.array(["query/0.jpg", "query/1.jpg"]))
    save_object(tmp_path / "Tiny_gt.npy", [[2, 0], np.array([1])])
    database, queries = image_set(tmp_path, ["ref/0.jpg", "ref/1.jpg", "ref/2.jpg"]), image_set(tmp_path, ["query/1.jpg", "query/0.jpg"])
    assert ground_truth_kind(tmp_path / "Tiny_gt.npy") == "gsv-cities"
    assert as_lists(read_ground_truth(tmp_path / "Tiny_gt.npy", queries, database)) == [[1], [0, 2]]
    np.save(tmp_path / "Tiny_gt.npy", np.array([[1], [2]]))  # SPED/ESSEX: a plain (N, 1) int array
    assert as_lists(read_ground_truth(tmp_path / "Tiny_gt.npy", queries, database)) == [[2], [1]]


def test_gsv_cities_msls_subset_by_qidx(tmp_path):
    np.save(tmp_path / "msls_val_dbImages.npy", np.array(["train_val/cph/database/images/d0.jpg", "train_val/cph/database/images/d1.jpg"]))
    np.save(tmp_path / "msls_val_qImages.npy", np.array([f"train_val/cph/query/images/q{i}.jpg" for i in range(3)]))
    np.save(tmp_path / "msls_val_qIdx.npy", np.array([0, 2]))  # q1 has no positive: not in the subset
    save_object(tmp_path / "msls_val_pIdx.npy", [np.array([1]), np.array([0, 1])])
    database = image_set(tmp_path, ["train_val/cph/database/images/d0.jpg", "train_val/cph/database/images/d1.jpg"])
    queries = image_set(tmp_path, ["train_val/cph/query/images/q2.jpg", "train_val/cph/query/images/q0.jpg"])
    assert as_lists(read_ground_truth(tmp_path / "msls_val_pIdx.npy", queries, database)) == [[0, 1], [1]]


def test_vpr_bench_rows_follow_numeric_order(tmp_path):
    names = [f"{i}.jpg" for i in range(12)]  # 10.jpg sorts before 2.jpg as text, after it as VPR-Bench numbers them
    save_vprbench(tmp_path / "ground_truth_new.npy", [[i] for i in range(11)] + [[-1]])  # -1: no true match (GardensPoint_TN)
    queries, database = image_set(tmp_path / "query", sorted(names)), image_set(tmp_path / "ref", sorted(names))
    positives = read_ground_truth(tmp_path / "ground_truth_new.npy", queries, database)
    for q, path in enumerate(queries.paths):
        number = int(path.stem)
        assert [database.paths[i].stem for i in positives[q]] == ([] if number == 11 else [str(number)])


def test_patch_netvlad_npz_with_image_lists(tmp_path):
    gt_dir, lists = tmp_path / "dataset_gt_files", tmp_path / "dataset_imagenames"
    gt_dir.mkdir(), lists.mkdir()
    np.savez(gt_dir / "pitts30k_test.npz", utmQ=UTM_Q, utmDb=UTM_DB, posDistThr=np.array(25))
    (lists / "pitts30k_imageNames_query.txt").write_text("".join(f"./Pittsburgh250k/queries_real/{n}\n" for n in Q_NAMES))
    (lists / "pitts30k_imageNames_index.txt").write_text("".join(f"./Pittsburgh250k/{n}\n" for n in DB_NAMES))
    database, queries = image_set(tmp_path / "P", DB_NAMES), image_set(tmp_path / "P" / "queries_real", Q_NAMES[::-1])
    assert ground_truth_kind(gt_dir / "pitts30k_test.npz") == "patch-netvlad"
    assert as_lists(read_ground_truth(gt_dir / "pitts30k_test.npz", queries, database)) == [[], [4], [0, 1, 2, 5]]


def write_msls_part(folder: Path, rows: list[tuple], lat: float, lon: float) -> list[str]:
    """One MSLS city part as pandas' to_csv writes it (unnamed index column); rows are (key, east, north, pano, in 'all')."""
    folder.mkdir(parents=True)
    (folder / "images").mkdir()
    lines = {"postprocessed.csv": [",key,easting,northing,night,view_direction"], "raw.csv": [",key,lon,lat,ca,captured_at,pano"],
             "seq_info.csv": [",key,sequence_key,frame_number"], "subtask_index.csv": [",all,s2w,w2s,o2n,n2o,d2n,n2d"]}
    for i, (key, east, north, pano, chosen) in enumerate(rows):
        lines["postprocessed.csv"].append(f"{i},{key},{east},{north},False,Forward")
        lines["raw.csv"].append(f"{i},{key},{lon},{lat},0.0,2017-01-01,{pano}")
        lines["seq_info.csv"].append(f"{i},{key},seq,{i}")
        lines["subtask_index.csv"].append(f"{i},{chosen},False,False,False,False,False,False")
        (folder / "images" / f"{key}.jpg").touch()
    for name, text in lines.items():
        (folder / name).write_text("\n".join(text) + "\n")
    return [row[0] for row in rows]


def write_msls(root: Path) -> None:
    """cph: a panorama and an image outside the subtask are left out, q_far has no positive; sf: one query."""
    cph, sf = root / "train_val" / "cph", root / "train_val" / "sf"
    write_msls_part(cph / "database", [("dA", 0, 0, False, True), ("dB", 20, 0, False, True), ("dPano", 1, 0, True, True),
                                       ("dOut", 2, 0, False, False), ("dC", 25, 0, False, True)], 55.68, 12.57)
    write_msls_part(cph / "query", [("q1", 0, 0, False, True), ("q2", 30, 0, False, True), ("qFar", 500, 0, False, True),
                                    ("qPano", 0, 0, True, True)], 55.68, 12.57)
    write_msls_part(sf / "database", [("sA", 1000, 1000, False, True), ("sB", 1000, 1010, False, True)], 37.77, -122.42)
    write_msls_part(sf / "query", [("sQ", 1000, 1005, False, True)], 37.77, -122.42)


def test_msls_official_val_subset(tmp_path):
    write_msls(tmp_path)
    bench = load_benchmark("msls-val", tmp_path)
    assert [p.stem for p in bench.queries.paths] == ["q1", "q2", "sQ"]
    assert [p.stem for p in bench.database.paths] == ["dA", "dB", "dC", "sA", "sB"]
    assert as_lists(bench.positives) == [[0, 1, 2], [1, 2], [3, 4]]  # dC at exactly 25 m is in; no heading rule
    assert bench.database.utm[2].tolist() == [25.0, 0.0] and bench.database.zone is None  # cph 33U, sf 10S
    assert bench.protocol["threshold_m"] == 25 and "(3)" in bench.protocol["queries"] and "1 without one" in bench.protocol["queries"]
    assert ground_truth_kind(tmp_path) == "msls"
    shuffled = GeoImageSet(paths=bench.database.paths[::-1])
    assert as_lists(read_ground_truth(tmp_path, bench.queries, shuffled)) == [[2, 3, 4], [2, 3], [0, 1]]


def test_msls_one_city_and_at_names(tmp_path):
    write_msls(tmp_path)
    city = tmp_path / "train_val" / "cph"
    database = GeoImageSet(paths=[tmp_path / f"@0@0@33@U@55.68@12.57@{key}@@0@@@@2017@day_forward_cph@.jpg" for key in ("dC", "dB", "dA")])
    queries = image_set(city / "query" / "images", ["q2.jpg", "q1.jpg"])
    assert as_lists(read_ground_truth(city, queries, database, kind="msls")) == [[0, 1], [0, 1, 2]]
    with pytest.raises(LabelError, match="defines 2 queries but queries has 3"):
        read_ground_truth(city, image_set(city / "query" / "images", ["q2.jpg", "q1.jpg", "qFar.jpg"]), database, kind="msls")


def test_load_benchmark_pittsburgh_from_mat(tmp_path):
    (tmp_path / "datasets").mkdir()
    scipy.io.savemat(tmp_path / "datasets" / "pitts30k_test.mat", {"dbStruct": dbstruct()})
    image_set(tmp_path, DB_NAMES), image_set(tmp_path / "queries_real", Q_NAMES)
    bench = load_benchmark("pitts30k", tmp_path)
    assert bench.name == "pitts30k" and as_lists(bench.positives) == EXPECTED
    assert bench.queries.paths[0] == tmp_path / "queries_real" / Q_NAMES[0] and bench.database.zone == (17, "T")
    assert np.array_equal(bench.database.utm, UTM_DB) and bench.protocol["threshold_m"] == 25.0
    assert bench.protocol["metrics"] == ["R@N"] and "pittsburgh.py" in bench.protocol["source"]


def test_load_benchmark_tokyo_png_cutouts(tmp_path):
    db = ["03814/03814_abc_012_000.jpg", "03814/03814_abc_012_030.jpg", "05000/05000_def_012_000.jpg"]
    scipy.io.savemat(tmp_path / "tokyo247.mat", {"dbStruct": dbstruct(db, ["00001.jpg"], UTM_DB[[0, 2, 4]], UTM_Q[:1])})
    image_set(tmp_path / "images", [name[:-4] + ".png" for name in db]), image_set(tmp_path / "query", ["00001.jpg"])
    bench = load_benchmark("tokyo247", tmp_path)
    assert bench.database.paths[1].name == "03814_abc_012_030.png" and as_lists(bench.positives) == [[0, 1]]
    assert bench.database.zone == (54, "S") and "first-cutout-per-panorama" in bench.protocol["evaluation"]


def test_load_benchmark_npy_layouts(tmp_path):
    pitts = tmp_path / "pitts"
    pitts.mkdir()
    np.save(pitts / "pitts250k_test_dbImages.npy", np.array(DB_NAMES))
    np.save(pitts / "pitts250k_test_qImages.npy", np.array(["queries_real/" + n for n in Q_NAMES]))
    save_object(pitts / "pitts250k_test_gt.npy", [np.array(p, dtype=np.int64) for p in EXPECTED])
    image_set(pitts, DB_NAMES + ["queries_real/" + n for n in Q_NAMES])
    bench = load_benchmark("pitts250k", pitts)
    assert as_lists(bench.positives) == EXPECTED and bench.database.utm is None and bench.protocol["threshold_m"] == 25.0
    nordland = tmp_path / "nordland"
    nordland.mkdir()
    np.save(nordland / "Nordland_dbImages.npy", np.array([f"ref/{i:07d}.jpg" for i in range(21)]))
    np.save(nordland / "Nordland_qImages.npy", np.array([f"query/{i:07d}.jpg" for i in range(3)]))
    save_object(nordland / "Nordland_gt.npy", [[0, 1], [9, 10, 11], [19, 20]])
    image_set(nordland, [f"ref/{i:07d}.jpg" for i in range(21)] + [f"query/{i:07d}.jpg" for i in range(3)])
    bench = load_benchmark("nordland", nordland)
    assert as_lists(bench.positives) == [[0, 1], [9, 10, 11], [19, 20]] and bench.protocol["threshold_m"] is None


@pytest.mark.parametrize("name", ["sped", "vpr-bench"])
def test_load_benchmark_vpr_bench_folder(tmp_path, name):
    save_vprbench(tmp_path / "ground_truth_new.npy", [[0], [2, 1], [-1]])
    image_set(tmp_path / "ref", ["2.jpg", "10.jpg", "1.jpg", "notes.txt"]), image_set(tmp_path / "query", ["1.jpg", "0.jpg", "2.jpg"])
    bench = load_benchmark(name, tmp_path)
    assert [p.name for p in bench.database.paths] == ["1.jpg", "2.jpg", "10.jpg"]
    assert [p.name for p in bench.queries.paths] == ["0.jpg", "1.jpg", "2.jpg"] and as_lists(bench.positives) == [[0], [1, 2], []]
    assert "RecallRate@N" in bench.protocol["metrics"]


def test_refusals_counts_names_kinds(tmp_path):
    mat = tmp_path / "pitts30k_test.mat"
    scipy.io.savemat(mat, {"dbStruct": dbstruct()})
    database, queries = image_set(tmp_path / "db", DB_NAMES), image_set(tmp_path / "q", Q_NAMES)
    with pytest.raises(LabelError, match="defines 6 database images but database has 5; give exactly"):
        read_ground_truth(mat, queries, database.subset(range(5)))
    renamed = GeoImageSet(paths=database.paths[:5] + [tmp_path / "db" / "other.jpg"])
    with pytest.raises(LabelError, match="database image '000/000005_pitch1_yaw1.jpg' is not in database"):
        read_ground_truth(mat, queries, renamed)
    twins = GeoImageSet(paths=database.paths[:5] + [tmp_path / "elsewhere" / "000" / DB_NAMES[0].split("/")[1]])
    with pytest.raises(LabelError, match="ambiguous"):
        read_ground_truth(mat, queries, twins)
    with pytest.raises(LabelError, match="kind 'kapture' is not a ground-truth kind"):
        read_ground_truth(mat, queries, database, kind="kapture")
    (tmp_path / "gt.txt").write_text("0 1\n")
    with pytest.raises(LabelError, match="cannot tell which ground-truth format"):
        read_ground_truth(tmp_path / "gt.txt", queries, database)
    with pytest.raises(UsageError, match="no such file"):
        read_ground_truth(tmp_path / "missing.npy", queries, database)


def test_refusals_in_file_contents(tmp_path):
    np.save(tmp_path / "T_dbImages.npy", np.array(["a.jpg", "b.jpg"]))
    np.save(tmp_path / "T_qImages.npy", np.array(["q.jpg"]))
    database, queries = image_set(tmp_path, ["a.jpg", "b.jpg"]), image_set(tmp_path, ["q.jpg"])
    save_object(tmp_path / "T_gt.npy", [np.array([2])])
    with pytest.raises(LabelError, match="positive 2 is outside the 2 database images"):
        read_ground_truth(tmp_path / "T_gt.npy", queries, database)
    save_object(tmp_path / "T_gt.npy", [np.array([0]), np.array([1])])
    with pytest.raises(LabelError, match="2 rows but 1 query names"):
        read_ground_truth(tmp_path / "T_gt.npy", queries, database)
    with open(tmp_path / "T_gt.npy", "wb") as f:  # an object array whose pickle would run code
        np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": (1,)})
        pickle.dump(Evil(tmp_path / "pwned"), f)
    with pytest.raises(LabelError, match="not a readable numpy"):
        read_ground_truth(tmp_path / "T_gt.npy", queries, database)
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "T_qImages.npy").unlink()
    with pytest.raises(UsageError, match=r"no T_qImages.npy .*check path$"):
        read_ground_truth(tmp_path / "T_gt.npy", queries, database)
    np.savez(tmp_path / "x.npz", utmQ=UTM_Q, utmDb=UTM_DB, posDistThr=np.array(25))
    with pytest.raises(UsageError, match="x_imageNames_query.txt"):
        read_ground_truth(tmp_path / "x.npz", queries, database)
    scipy.io.savemat(tmp_path / "bad.mat", {"dbStruct": {"utmDb": UTM_DB.T}})
    with pytest.raises(LabelError, match="dbStruct has no dbImageFns"):
        read_ground_truth(tmp_path / "bad.mat", queries, database)


class Evil:
    """A pickle that creates a file when it is loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_load_benchmark_missing_files(tmp_path):
    with pytest.raises(UsageError, match="name 'oxford' is not a benchmark"):
        load_benchmark("oxford", tmp_path)
    with pytest.raises(UsageError, match="no such folder"):
        load_benchmark("pitts30k", tmp_path / "nowhere")
    with pytest.raises(UsageError, match=r"no pitts30k_test.mat .* nor pitts30k_test_gt.npy"):
        load_benchmark("pitts30k", tmp_path)
    with pytest.raises(UsageError, match="no tokyo247.mat"):
        load_benchmark("tokyo247", tmp_path)
    with pytest.raises(UsageError, match="no train_val/"):
        load_benchmark("msls-val", tmp_path)
    with pytest.raises(UsageError, match="no Nordland_gt.npy .* nor ground_truth_new.npy"):
        load_benchmark("nordland", tmp_path)
    with pytest.raises(UsageError, match="no ground_truth_new.npy"):
        load_benchmark("vpr-bench", tmp_path)
    (tmp_path / "datasets").mkdir()
    scipy.io.savemat(tmp_path / "datasets" / "pitts30k_test.mat", {"dbStruct": dbstruct()})
    image_set(tmp_path, DB_NAMES[:4])
    with pytest.raises(UsageError, match="database image 000/000000_pitch1_yaw1.jpg is in none of|2 of the 6"):
        load_benchmark("pitts30k", tmp_path)
    write_msls(tmp_path / "msls")
    (tmp_path / "msls" / "train_val" / "sf" / "query" / "raw.csv").unlink()
    with pytest.raises(UsageError, match=r"query: no raw.csv"):
        load_benchmark("msls-val", tmp_path / "msls")
