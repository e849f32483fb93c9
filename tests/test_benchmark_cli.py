"""`vpr build-index` and `vpr eval` on a benchmark in its authors' layout (`--benchmark NAME --root DIR`) and on
their ground-truth files (`--gt FILE`): the same recall as the same images with coordinates, the protocol in --json."""

import json
import shutil

import numpy as np

from conftest import run_cli, write_places

MODEL = ("--model", "pixels", "--head", "patchnorm", "--device", "cpu")


def vpr_bench_folder(tmp_path):
    """Six @-named places, and the same images as a VPR-Bench folder: ref/N.jpg, query/N.jpg, ground_truth_new.npy."""
    db, queries = write_places(tmp_path / "located", 6, seed=3)
    root = tmp_path / "bench"
    (root / "ref").mkdir(parents=True)
    (root / "query").mkdir()
    for i, (d, q) in enumerate(zip(db, queries)):
        shutil.copy(d, root / "ref" / f"{i}.jpg")
        shutil.copy(q, root / "query" / f"{i}.jpg")
    gt = np.empty((6, 2), dtype=object)
    for i in range(6):
        gt[i, 0], gt[i, 1] = i, [i]
    np.save(root / "ground_truth_new.npy", gt)
    return tmp_path / "located", root


def test_benchmark_and_its_file_give_the_recall_of_the_coordinates(tmp_path, monkeypatch, capsys):
    located, root = vpr_bench_folder(tmp_path)
    for args, out in (((located / "database",), tmp_path / "by-name"), (("--benchmark", "vpr-bench", "--root", root), tmp_path / "by-bench")):
        code, _, err = run_cli(monkeypatch, capsys, "build-index", *args, "--out", out, *MODEL)
        assert code == 0, err
    runs = {
        "coordinates": ("eval", located / "queries", "--index", tmp_path / "by-name"),
        "benchmark": ("eval", "--benchmark", "vpr-bench", "--root", root, "--index", tmp_path / "by-bench"),
        "gt file": ("eval", root / "query", "--gt", root / "ground_truth_new.npy", "--index", tmp_path / "by-bench"),
    }
    summaries = {}
    for name, args in runs.items():
        code, stdout, err = run_cli(monkeypatch, capsys, *args, "--device", "cpu", "--json")
        assert code == 0, (name, err)
        summaries[name] = json.loads(stdout)
    assert summaries["coordinates"]["recall"] == summaries["benchmark"]["recall"] == summaries["gt file"]["recall"]
    assert summaries["coordinates"]["queries_with_positives"] == summaries["benchmark"]["queries_with_positives"] == 6
    assert summaries["benchmark"]["protocol"]["benchmark"] == "VPR-Bench bench" and "ground_truth_new.npy" in summaries["benchmark"]["protocol"]["positives"]
    assert summaries["gt file"]["protocol"]["kind"] == "vpr-bench" and summaries["coordinates"]["protocol"]["threshold_m"] == 25.0


def test_benchmark_refusals_name_the_fix(tmp_path, monkeypatch, capsys):
    located, root = vpr_bench_folder(tmp_path)
    code, _, err = run_cli(monkeypatch, capsys, "build-index", located / "database", "--out", tmp_path / "idx", *MODEL)
    assert code == 0, err
    cases = [
        (("eval", "--benchmark", "vpr-bench", "--root", root, "--index", tmp_path / "idx"), "was not built on the vpr-bench database"),
        (("eval", "--benchmark", "pitts", "--root", root, "--index", tmp_path / "idx"), "--benchmark pitts: not a benchmark"),
        (("eval", "--benchmark", "sped", "--index", tmp_path / "idx"), "needs --root DIR"),
        (("eval", located / "queries", "--benchmark", "sped", "--root", root), "drop"),
        (("eval", "--index", tmp_path / "idx"), "missing QUERIES"),
        (("eval", located / "queries", "--gt-kind", "msls", "--index", tmp_path / "idx"), "add --gt FILE"),
        (("eval", root / "query", "--gt", root / "ground_truth_new.npy", "--gt-kind", "mat", "--index", tmp_path / "idx"), "--gt-kind mat"),
        (("build-index", "--root", root, "--out", tmp_path / "other"), "add --benchmark NAME"),
    ]
    for args, expected in cases:
        code, stdout, err = run_cli(monkeypatch, capsys, *args)
        assert code != 0 and expected in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "other").exists()
