"""`vpr pairs` and `vpr export-features` from the command line: the pairs hloc's pairs_from_retrieval would make
from vpr's exported descriptors, names relative to the folder holding queries and database."""

import json

import h5py
import numpy as np

from conftest import run_cli


def hloc_style_pairs(query_h5, db_h5, k: int) -> dict[str, list[str]]:
    """What hloc's pairs_from_retrieval does with global features: every query's top-k database names by inner product."""
    def read(path):
        names = []
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: names.append(name.rsplit("/", 1)[0]) if name.endswith("global_descriptor") else None)
            return names, np.stack([f[name]["global_descriptor"][()] for name in names])
    q_names, q = read(query_h5)
    db_names, db = read(db_h5)
    top = np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :k]
    return {name: [db_names[j] for j in row] for name, row in zip(q_names, top)}


def test_pairs_equal_retrieval_on_the_exported_features(places, places_index, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pairs.txt"
    code, stdout, err = run_cli(monkeypatch, capsys, "pairs", places / "queries", "--index", places_index, "-k", 3,
                                "--out", out, "--device", "cpu", "--json")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["pairs"] == 36 and summary["root"] == str(places)
    lines = [line.split() for line in out.read_text().splitlines()]
    assert all(q.startswith("queries/") and db.startswith("database/") for q, db in lines)
    for source, h5 in ((places_index, tmp_path / "db.h5"), (places / "queries", tmp_path / "q.h5")):
        extra = ["--index", places_index] if source != places_index else []
        code, _, err = run_cli(monkeypatch, capsys, "export-features", source, "--out", h5, "--root", places, *extra,
                               "--device", "cpu")
        assert code == 0, err
    expected = hloc_style_pairs(tmp_path / "q.h5", tmp_path / "db.h5", 3)
    got: dict[str, list[str]] = {}
    for q, db in lines:
        got.setdefault(q, []).append(db)
    assert got == expected


def test_kapture_pairs_and_features_and_reruns(places, places_index, tmp_path, monkeypatch, capsys):
    out = tmp_path / "pairs.kapture.txt"
    for _ in range(2):  # a rerun replaces vpr's own file
        code, _, err = run_cli(monkeypatch, capsys, "pairs", places / "queries", "--index", places_index, "-k", 2,
                               "--format", "kapture", "--out", out, "--device", "cpu")
        assert code == 0, err
    rows = [line for line in out.read_text().splitlines() if not line.startswith("#")]
    assert len(rows) == 24 and all(len(row.split(", ")) == 3 for row in rows)
    code, _, err = run_cli(monkeypatch, capsys, "export-features", places_index, "--format", "kapture", "--out",
                           tmp_path / "kapture", "--device", "cpu")
    assert code == 0, err
    assert (tmp_path / "kapture" / "reconstruction" / "global_features" / "vpr").is_dir()


def test_bad_requests_name_the_flag_and_write_nothing(places, places_index, tmp_path, monkeypatch, capsys):
    mine = tmp_path / "mine.txt"
    mine.write_text("my notes\n")
    code, _, err = run_cli(monkeypatch, capsys, "pairs", places / "queries", "--index", places_index, "--out", mine,
                           "--device", "cpu")
    assert code == 1 and "--out" in err and mine.read_text() == "my notes\n"
    code, _, err = run_cli(monkeypatch, capsys, "pairs", places / "queries", "--index", places_index, "--out",
                           tmp_path / "p.txt", "--root", places / "queries", "--device", "cpu")
    assert code == 2 and "--root" in err and not (tmp_path / "p.txt").exists()
    code, _, err = run_cli(monkeypatch, capsys, "export-features", places / "queries", "--out", tmp_path / "q.h5")
    assert code == 2 and "--index" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(monkeypatch, capsys, "pairs", places / "queries", "--index", places_index, "--out",
                           tmp_path / "p.txt", "--format", "xml", "--device", "cpu")
    assert code == 2 and "--format" in err and "hloc" in err
