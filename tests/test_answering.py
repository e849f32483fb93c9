"""Beyond one nearest neighbour: the position estimate and its confidence, localisation error, query
expansion and database-side augmentation, per-query predictions, and the weightless thumbnail model."""

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tests.conftest import run_cli
from vpr.data.datasets import GeoImageSet, load_image_set, load_manifest
from vpr.evaluation.localization import error_summary, localization_errors, precision_at_recall
from vpr.models.model import ModelConfig, build_model
from vpr.retrieval.expansion import augment_database, expand_queries
from vpr.retrieval.options import Expansion, ExtractOptions
from vpr.retrieval.localize import estimate_positions
from vpr.retrieval.build import build_index
from vpr.retrieval.store import load_index

OPTIONS = ExtractOptions(num_workers=0)


def test_the_estimate_is_the_weighted_centre_of_the_densest_cluster():
    database = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [500.0, 500.0], [900.0, 0.0]])
    # the single best match is an outlier; three slightly weaker ones agree on one place
    sims = np.array([[0.90, 0.89, 0.89, 0.89, 0.50]])
    ids = np.array([[3, 0, 1, 2, 4]])
    est = estimate_positions(sims, ids, database, top_k=5, radius=25.0, tau=0.02)
    w = np.exp((0.89 - 0.90) / 0.02)
    np.testing.assert_allclose(est.utm[0], [10 / 3, 10 / 3], atol=1e-9)
    assert est.support[0] == 3
    total = 1 + 3 * w + np.exp((0.50 - 0.90) / 0.02)
    assert est.confidence[0] == pytest.approx(3 * w / total)


def test_confidence_is_one_when_the_shortlist_agrees_and_lower_when_it_splits():
    database = np.array([[0.0, 0.0], [5.0, 0.0], [300.0, 0.0], [305.0, 0.0]])
    agree = estimate_positions(np.array([[0.9, 0.9]]), np.array([[0, 1]]), database)
    split = estimate_positions(np.array([[0.9, 0.9, 0.9, 0.9]]), np.array([[0, 2, 1, 3]]), database)
    assert agree.confidence[0] == pytest.approx(1.0)
    assert split.confidence[0] == pytest.approx(0.5)
    np.testing.assert_allclose(split.utm[0], [2.5, 0.0])  # equal clusters: the best-ranked one wins


def test_no_position_without_coordinates_or_matches():
    est = estimate_positions(np.array([[0.9, -np.inf]]), np.array([[0, -1]]), None)
    assert np.isnan(est.utm).all() and est.confidence[0] == 0
    est = estimate_positions(np.array([[-np.inf]]), np.array([[-1]]), np.zeros((1, 2)))
    assert np.isnan(est.utm[0]).all()


def test_localisation_error_summary():
    errors = localization_errors(np.array([[3.0, 4.0], [np.nan, np.nan], [0.0, 30.0], [0.0, 0.0]]), np.zeros((4, 2)))
    assert errors.tolist() == [5.0, np.inf, 30.0, 0.0]
    summary = error_summary(errors)
    assert summary["within"] == {"5m": 50.0, "10m": 50.0, "25m": 50.0, "50m": 75.0}
    assert summary["median_m"] == 5.0 and summary["p90_m"] is None  # the 90th percentile query has no estimate
    assert error_summary(np.arange(1.0, 11.0))["p90_m"] == 9.0  # 90% of the queries lie within 9 m


def test_precision_at_recall_follows_the_confidence_ranking():
    confidence = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    correct = np.array([True, True, False, True, False])
    # keeping 2 of 3 correct answers needs the top 2 (precision 100%); all 3 needs the top 4 (75%)
    assert precision_at_recall(confidence, correct, (50, 80, 100)) == {"P@R50": 100.0, "P@R80": 75.0, "P@R100": 75.0}
    tied = precision_at_recall(np.array([0.5, 0.5, 0.5, 0.5]), np.array([True, False, False, False]), (100,))
    assert tied == {"P@R100": 25.0}  # equal confidences are accepted together


def test_alpha_query_expansion_restated():
    rng = np.random.default_rng(0)
    database = rng.normal(size=(20, 8)).astype(np.float32)
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    query = database[:1] + 0.1

    def search(q, n):
        sims = q @ database.T
        order = np.argsort(-sims, axis=1)[:, :n]
        return np.take_along_axis(sims, order, axis=1), order

    out = expand_queries(query, database, search, Expansion(3, alpha=2.0))
    sims, ids = search(query, 3)
    expected = query[0] + sum(max(s, 0) ** 2 * database[i] for s, i in zip(sims[0], ids[0]))
    np.testing.assert_allclose(out[0], expected / np.linalg.norm(expected), atol=1e-6)
    assert expand_queries(query, database, search, Expansion(0)) is query


def test_dba_averages_each_database_row_with_its_neighbours_not_itself():
    database = np.eye(4, dtype=np.float32)[[0, 0, 1, 1]] + np.float32(0.01) * np.arange(16, dtype=np.float32).reshape(4, 4)
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    out = augment_database(database, Expansion(1, alpha=0.0))
    for i, partner in ((0, 1), (1, 0), (2, 3), (3, 2)):  # rows come in near-identical pairs
        expected = database[i] + database[partner]
        np.testing.assert_allclose(out[i], expected / np.linalg.norm(expected), atol=1e-6)


def test_an_index_built_with_dba_records_it_and_reloads_identically(places, tmp_path, tiny_model):
    out = tmp_path / "dba"
    database = load_image_set(places / "database")
    build_index(database, out, model=tiny_model, options=OPTIONS, dba=Expansion(2, alpha=3.0))
    bundle = load_index(out)
    assert bundle.manifest["dba"] == {"n": 2, "alpha": 3.0}
    plain = tmp_path / "plain"
    build_index(database, plain, model=tiny_model, options=OPTIONS)
    np.testing.assert_allclose(bundle.descriptors, augment_database(load_index(plain).descriptors, Expansion(2, 3.0)), atol=1e-6)


def test_frame_order_compares_numbers_as_numbers_and_prefers_a_time_column(tmp_path):
    names = ["f10.jpg", "f9.jpg", "f100.jpg", "f1.jpg"]
    images = GeoImageSet(paths=[tmp_path / n for n in names])
    assert [names[i] for i in images.frame_order()] == ["f1.jpg", "f9.jpg", "f10.jpg", "f100.jpg"]
    from PIL import Image

    for name in names:
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "m.csv").write_text("path,lat,lon,frame\n" + "".join(
        f"{n},37.77,-122.41,{t}\n" for n, t in zip(names, (3, 1, 0, 2))))
    manifest = load_manifest(tmp_path / "m.csv")
    assert [manifest.paths[i].name for i in manifest.frame_order()] == ["f100.jpg", "f9.jpg", "f1.jpg", "f10.jpg"]


def test_patchnorm_thumbnail_restated():
    config = ModelConfig(backbone="pixels", head="patchnorm", input_size=(8, 12), patch_size=4)
    model = build_model(config)
    assert config.descriptor_dim == 96 and config.mean == (0.0, 0.0, 0.0) and sum(p.numel() for p in model.parameters()) == 0
    torch.manual_seed(0)
    images = torch.rand(2, 3, 8, 12)
    grey = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    expected = torch.empty_like(grey)
    for r in range(0, 8, 4):
        for c in range(0, 12, 4):
            patch = grey[:, r:r + 4, c:c + 4]
            mean = patch.mean(dim=(1, 2), keepdim=True)
            std = patch.std(dim=(1, 2), unbiased=False, keepdim=True)
            expected[:, r:r + 4, c:c + 4] = (patch - mean) / std
    expected = torch.nn.functional.normalize(expected.flatten(1), dim=1)
    out = model(images)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    brighter = model(images * 0.5 + 0.2)  # a patch-wise affine light change leaves the descriptor unchanged
    torch.testing.assert_close(brighter, out, atol=1e-4, rtol=1e-4)


def test_the_pixels_backbone_needs_the_patchnorm_head(monkeypatch, capsys, places, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "build-index", places / "database", "--out", tmp_path / "x",
                           "--model", "pixels")
    assert code == 2 and "--model pixels --head patchnorm" in err


@pytest.fixture(scope="module")
def place_index(places_index):
    return places_index


def test_eval_reports_localisation_and_saves_per_query_results(monkeypatch, capsys, places, place_index, tmp_path):
    csv_path, json_path, h5_path, png = (tmp_path / n for n in ("p.csv", "p.json", "q.h5", "map.png"))
    code, out, err = run_cli(monkeypatch, capsys, "eval", places / "queries", "--index", place_index, "--workers", "0",
                             "--save-predictions", json_path, "--save-descriptors", h5_path, "--viz", png, "--json")
    assert code == 0, err
    summary = json.loads(out)
    loc = summary["localization"]
    assert summary["recall"]["R@1"] == 100.0
    assert loc["within"]["10m"] == 100.0 and loc["median_m"] == pytest.approx(np.hypot(3, 2), abs=0.5)
    assert summary["confidence_precision"]["P@R100"] == 100.0
    saved = json.loads(json_path.read_text())
    assert saved["format"] == "vpr-predictions" and len(saved["queries"]) == 12
    first = saved["queries"][0]
    assert first["matches"][0]["positive"] and first["matches"][0]["metres"] == pytest.approx(np.hypot(3, 2))
    assert first["error_m"] == pytest.approx(np.hypot(3, 2), abs=0.5)
    with h5py.File(h5_path) as f:
        assert f["descriptors"].shape == (12, 64) and len(f["paths"]) == 12
    code, _, err = run_cli(monkeypatch, capsys, "eval", places / "queries", "--index", place_index, "--workers", "0",
                           "--save-predictions", csv_path, "--json")
    assert code == 0, err
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 12 * 20 or len(rows) == 12 * 12  # top-20 asked, 12 in the database
    assert rows[0]["rank"] == "1" and rows[0]["positive"] == "1"
    from PIL import Image

    assert Image.open(png).size[0] > 100


def test_predictions_never_replace_a_file_vpr_did_not_write(monkeypatch, capsys, places, place_index, tmp_path):
    mine = tmp_path / "notes.csv"
    mine.write_text("my,own\n1,2\n")
    code, _, err = run_cli(monkeypatch, capsys, "eval", places / "queries", "--index", place_index,
                           "--save-predictions", mine)
    assert code == 1 and "not a predictions file written by vpr" in err
    assert mine.read_text() == "my,own\n1,2\n"
    code, _, err = run_cli(monkeypatch, capsys, "eval", places / "queries", "--index", place_index,
                           "--save-predictions", tmp_path / "p.txt")
    assert code == 2 and "name a .csv or .json file" in err


def test_query_prints_the_estimated_position(monkeypatch, capsys, places, place_index):
    query = sorted((places / "queries").iterdir())[4]
    code, out, err = run_cli(monkeypatch, capsys, "query", query, "--index", place_index, "--json")
    assert code == 0, err
    result = json.loads(out)[0]
    true_east = float(query.name.split("@")[1])
    assert result["position"]["utm_east"] == pytest.approx(true_east - 3.0, abs=1.0)
    assert 0 < result["position"]["confidence"] <= 1 and result["position"]["lat"] is not None


def test_qe_and_dba_options_work_from_the_command_line(monkeypatch, capsys, places, tmp_path, place_index):
    out = tmp_path / "dba-idx"
    code, _, err = run_cli(monkeypatch, capsys, "build-index", places / "database", "--out", out, "--resize", "48x64",
                           "--dim", "64", "--workers", "0", "--dba", "1", "--json")
    assert code == 0, err
    code, text, err = run_cli(monkeypatch, capsys, "eval", places / "queries", "--index", out, "--workers", "0",
                              "--qe", "1", "--json")
    assert code == 0, err
    assert json.loads(text)["answering"]["qe"] == {"n": 1, "alpha": 3.0}
    code, _, err = run_cli(monkeypatch, capsys, "eval", places / "queries", "--index", place_index, "--causal")
    assert code == 2 and "add --sequence L" in err


@pytest.fixture(scope="module")
def textured_places(tmp_path_factory):
    """Five textured scenes 100 m apart; each query is its scene seen through a homography, 4 m away."""
    cv2 = pytest.importorskip("cv2")
    from tests.test_rerank import KNOWN_H, textured
    from vpr.data.geo import format_at_name

    root = tmp_path_factory.mktemp("textured")
    (root / "database").mkdir()
    (root / "queries").mkdir()
    for i in range(5):
        scene = textured(20 + i, size=(240, 320))
        east, north = 550000.0 + 100 * i, 4180000.0
        cv2.imwrite(str(root / "database" / format_at_name(east, north, 10, "S").replace(".jpg", ".png")), scene)
        warped = cv2.warpPerspective(scene, KNOWN_H * [[1, 1, 0.5], [1, 1, 0.5], [2, 2, 1]], (320, 240))
        cv2.imwrite(str(root / "queries" / format_at_name(east + 4, north, 10, "S").replace(".jpg", ".png")), warped)
    return root


def test_rerank_local_verifies_the_shortlist_from_the_command_line(monkeypatch, capsys, textured_places, tmp_path):
    out = tmp_path / "idx"
    code, _, err = run_cli(monkeypatch, capsys, "build-index", textured_places / "database", "--out", out,
                           "--resize", "48x64", "--dim", "64", "--workers", "0", "--local-features")
    assert code == 0, err
    assert load_index(out).manifest["local_features"]["method"] == "sift"
    queries = sorted((textured_places / "queries").iterdir())
    viz = tmp_path / "m.png"
    code, text, err = run_cli(monkeypatch, capsys, "query", queries[3], "--index", out, "--rerank", "local",
                              "--json", "--viz", viz)
    assert code == 0, err
    result = json.loads(text)[0]
    top = result["matches"][0]
    assert top["utm_east"] == 550300.0 and top["inliers"] >= 12
    assert all(m["inliers"] < 12 for m in result["matches"][1:])
    assert result["position"]["utm_east"] == pytest.approx(550300.0)
    from vpr.fileio import is_vpr_png

    assert is_vpr_png(viz) and is_vpr_png(tmp_path / "m-inliers-1.png")
    code, text, err = run_cli(monkeypatch, capsys, "eval", textured_places / "queries", "--index", out,
                              "--rerank", "local", "--workers", "0", "--json")
    assert code == 0, err
    assert json.loads(text)["recall"]["R@1"] == 100.0


def test_rerank_needs_an_index_with_local_features(monkeypatch, capsys, places, place_index):
    query = sorted((places / "queries").iterdir())[0]
    code, _, err = run_cli(monkeypatch, capsys, "query", query, "--index", place_index, "--rerank", "local")
    assert code == 2 and "--local-features" in err


@pytest.fixture(scope="module")
def aliased_route(tmp_path_factory):
    """A 40-frame route past 5 look-alike scenes in a random order, travelled twice (queries perturbed):
    single frames cannot tell repeats of a scene apart, sequences of frames can."""
    from PIL import Image

    from tests.conftest import perturb, place_image

    rng = np.random.default_rng(3)
    scenes = [place_image(rng) for _ in range(5)]
    order = rng.integers(0, 5, size=40)
    root = tmp_path_factory.mktemp("route")
    for folder in ("db", "q"):
        (root / folder).mkdir()
    for i, s in enumerate(order):
        Image.fromarray(perturb(scenes[s], rng, noise=4.0)).save(root / "db" / f"f{i}.png")
        Image.fromarray(perturb(scenes[s], rng, noise=4.0)).save(root / "q" / f"f{i}.png")
    (root / "gt.csv").write_text("query,positives\n" + "".join(f"f{i}.png,f{i}.png\n" for i in range(40)))
    return root


def test_sequences_tell_apart_what_single_frames_cannot(monkeypatch, capsys, aliased_route, tmp_path):
    out = tmp_path / "idx"
    code, _, err = run_cli(monkeypatch, capsys, "build-index", aliased_route / "db", "--out", out,
                           "--resize", "48x64", "--dim", "64", "--workers", "0")
    assert code == 0, err
    recall = {}
    for length in (1, 9):
        code, text, err = run_cli(monkeypatch, capsys, "eval", aliased_route / "q", "--index", out, "--gt",
                                  aliased_route / "gt.csv", "--workers", "0", "--sequence", length, "--json")
        assert code == 0, err
        recall[length] = json.loads(text)["recall"]["R@1"]
    assert recall[1] < 50 and recall[9] == 100.0  # file-name order f0, f1, ... f10 (not f1, f10, f11)
    code, text, err = run_cli(monkeypatch, capsys, "query", aliased_route / "q", "--index", out, "--sequence", 9,
                              "--causal", "--json")
    assert code == 0, err
    results = json.loads(text)
    assert [Path(r["query"]).name for r in results[:3]] == ["f0.png", "f1.png", "f2.png"]
    tops = [Path(r["matches"][0]["path"]).name for r in results]
    assert tops[8:] == [f"f{i}.png" for i in range(8, 40)]  # once 9 frames have been seen
