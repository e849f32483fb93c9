"""NetVLAD training: cluster initialisation, mining, triplet loss, the trainer, resume and its checkpoints."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli
from vpr.data.datasets import load_split
from vpr.data.geo import format_at_name
from vpr.models.checkpoints import load_checkpoint, load_payload
from vpr.models.heads import NetVLAD
from vpr.models.model import ModelConfig, build_model
from vpr.retrieval.options import ExtractOptions
from vpr.retrieval.build import build_index
from vpr.retrieval.store import load_index
from vpr.training.mining import FeatureCache, Miner, MiningConfig, Triplet, tuple_sets
from vpr.training.loop import TrainResult
from vpr.training.netvlad import train_netvlad
from vpr.training.config import NetVLADConfig
from vpr.training.netvlad_init import assignment_alpha, fit_centroids, init_netvlad, sample_local_features
from vpr.training.triplet import TupleImages, collate_tuples, triplet_loss

SIZE = (48, 64)  # height, width
EAST, NORTH = 550_000.0, 4_180_000.0


def write_split(root: Path, split: str, places: int, seed: int) -> None:
    """`places` street spots 40 m apart: two database images 2 m apart and one query 3 m away each."""
    rng = np.random.default_rng(seed)
    for role in ("database", "queries"):
        (root / "images" / split / role).mkdir(parents=True)
    for i in range(places):
        coarse = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
        place = np.asarray(Image.fromarray(coarse).resize((SIZE[1], SIZE[0]), Image.BICUBIC), dtype=np.float32)
        east = EAST + 40.0 * i
        shots = [("database", east, 0.0), ("database", east + 2.0, 1.0), ("queries", east + 3.0, 2.0)]
        for role, x, tag in shots:
            image = np.clip(place * rng.uniform(0.8, 1.2) + rng.normal(0, 10, place.shape), 0, 255).astype(np.uint8)
            name = format_at_name(x, NORTH + tag, 10, "S", heading=90.0)
            Image.fromarray(image).save(root / "images" / split / role / name, quality=95)


@pytest.fixture(scope="module")
def city(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("netvlad-city")
    write_split(root, "train", 6, seed=1)
    write_split(root, "val", 3, seed=2)
    return root


@pytest.fixture(scope="module")
def clusters_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("clusters") / "clusters.h5"


def tiny_config(city: Path, out: Path, clusters_cache: Path, **changes) -> NetVLADConfig:
    """resnet18 cut after layer3, 4 clusters, epochs of 2 steps of 2 tuples (8 images // (2 + 2 negatives)), the cache
    refreshed every 2 queries.

    Margin 4 (the largest squared distance between unit vectors) makes every negative violate it, so every
    query yields a tuple and the step counts are known.
    """
    cfg = NetVLADConfig(
        dataset=city, out=out, layer=3, num_clusters=4, input_size=SIZE, epochs=1, iterations_per_epoch=2, batch_size=8,
        cache_refresh=2, num_negatives=2, neg_samples=5, margin=4.0, lr=1e-4, init_images=12, init_per_image=4,
        kmeans_iterations=10, clusters_cache=clusters_cache, pca_dim=8, workers=0, extract_batch_size=8,
    )
    return replace(cfg, **changes)


@pytest.fixture(scope="module")
def first_epoch(city, clusters_cache, tmp_path_factory) -> TrainResult:
    """One epoch of training in the main process."""
    return train_netvlad(tiny_config(city, tmp_path_factory.mktemp("runs") / "first", clusters_cache))


# --- initialisation ---------------------------------------------------------------------------------


def test_two_clusters_give_the_hand_computed_alpha_and_a_100_to_1_assignment():
    features = np.array([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5, dtype=np.float32)
    centroids = fit_centroids(features, 2, seed=0, iterations=10)
    assert sorted(map(tuple, centroids.round(6))) == [(0.0, 1.0), (1.0, 0.0)]
    # each feature is at squared distance 0 from its centroid and 2 from the other: alpha = ln(100) / 2
    alpha = assignment_alpha(features, centroids)
    assert alpha == pytest.approx(math.log(100.0) / 2.0)
    head = NetVLAD(in_channels=2, num_clusters=2)
    head.set_centroids(torch.from_numpy(centroids), alpha)
    with torch.no_grad():
        logits = head.conv(torch.tensor([[1.0, 0.0]]).view(1, 2, 1, 1)).flatten()
    weights = torch.softmax(logits, dim=0).sort(descending=True).values
    assert float(weights[1] / weights[0]) == pytest.approx(0.01, rel=1e-5)


def test_alpha_uses_the_mean_gap_between_nearest_and_second_nearest_cluster():
    centroids = np.array([[0.0, 0.0], [4.0, 0.0]], dtype=np.float32)
    features = np.array([[1.0, 0.0], [0.0, 0.0]], dtype=np.float32)  # gaps 9 - 1 = 8 and 16 - 0 = 16
    assert assignment_alpha(features, centroids) == pytest.approx(-math.log(0.01) / 12.0)


def test_local_features_are_unit_vectors_and_clusters_are_cached(city, tmp_path):
    model = build_model(ModelConfig(head="netvlad", num_clusters=4, input_size=SIZE), seed=0)
    database, _ = load_split(city, "train")
    features = sample_local_features(model, database.paths, num_images=5, per_image=3)
    assert features.shape == (15, 512)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
    cache = tmp_path / "clusters.h5"
    first = init_netvlad(model, database.paths, cache=cache, num_images=12, per_image=4, iterations=10)
    fresh = build_model(ModelConfig(head="netvlad", num_clusters=4, input_size=SIZE), seed=0)
    second = init_netvlad(fresh, database.paths, cache=cache, num_images=12, per_image=4, iterations=10)
    assert not first.reused and second.reused
    assert torch.equal(fresh.head.centroids, torch.from_numpy(first.centroids))
    assert torch.equal(fresh.head.conv.weight, model.head.conv.weight)
    other = init_netvlad(fresh, database.paths, cache=cache, num_images=12, per_image=2, iterations=10)
    assert not other.reused  # other sampling settings invalidate the cache


# --- mining -----------------------------------------------------------------------------------------


def random_unit(rng: np.random.Generator, n: int, d: int = 16) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def street(n_db: int = 60, n_q: int = 20, seed: int = 0):
    """Database every 5 m along a street, queries at random points on it, random descriptors."""
    rng = np.random.default_rng(seed)
    db_utm = np.stack([np.arange(n_db) * 5.0, np.zeros(n_db)], axis=1)
    q_utm = np.stack([rng.uniform(0, 5.0 * n_db, n_q), rng.uniform(-3, 3, n_q)], axis=1)
    return db_utm, q_utm, random_unit(rng, n_db), random_unit(rng, n_q)


def test_mining_takes_positives_within_10m_and_negatives_beyond_25m():
    db_utm, q_utm, db_desc, q_desc = street()
    miner = Miner(tuple_sets(db_utm, q_utm), len(db_utm), MiningConfig(margin=4.0, num_negatives=10, neg_samples=1000))
    queries = np.arange(len(q_utm))
    cache = FeatureCache(np.arange(len(db_utm)), db_desc, queries, q_desc)
    triplets = miner.mine(cache, queries, np.random.default_rng(0))
    assert len(triplets) == len(q_utm)
    for t in triplets:
        metres = np.linalg.norm(db_utm - q_utm[t.query], axis=1)
        assert metres[t.positive] <= 10.0
        assert len(t.negatives) == 10 and np.all(metres[t.negatives] > 25.0)
        within = np.flatnonzero(metres <= 10.0)
        feature_d = np.linalg.norm(db_desc - q_desc[t.query], axis=1)
        assert feature_d[t.positive] <= feature_d[within].min() + 1e-6  # the feature-nearest potential positive (tie-aware)
        beyond = np.flatnonzero(metres > 25.0)
        assert np.allclose(feature_d[t.negatives], np.sort(feature_d[beyond])[:10])  # hardest first


def test_queries_without_a_violating_negative_are_skipped():
    db_utm, q_utm, db_desc, q_desc = street()
    q_desc = db_desc[np.argmin(np.abs(db_utm[:, 0][None] - q_utm[:, :1]), axis=1)]  # identical to the nearest db image
    miner = Miner(tuple_sets(db_utm, q_utm), len(db_utm), MiningConfig(margin=0.1))
    cache = FeatureCache(np.arange(len(db_utm)), db_desc, np.arange(len(q_utm)), q_desc)
    # random 16-d unit vectors are ~1.4 apart (d^2 ~ 2), far beyond d^2(q, p*) + 0.1 = 0.1
    assert miner.mine(cache, np.arange(len(q_utm)), np.random.default_rng(0)) == []
    assert np.all(miner.memory >= 0)  # the hardest ones are still remembered for next time


def test_hard_negatives_are_remembered_across_cache_refreshes():
    db_utm, q_utm, db_desc, q_desc = street(seed=3)
    miner = Miner(tuple_sets(db_utm, q_utm), len(db_utm), MiningConfig(margin=4.0, num_negatives=3, neg_samples=4))
    queries = np.arange(len(q_utm))
    cache = FeatureCache(np.arange(len(db_utm)), db_desc, queries, q_desc)
    rng = np.random.default_rng(0)
    hardest = {t.query: t.negatives[0] for t in miner.mine(cache, queries, rng)}
    for _ in range(5):  # with only 4 fresh random negatives per round, the memory is what keeps the hardest
        again = {t.query: t.negatives[0] for t in miner.mine(cache, queries, rng)}
        distance = {q: (np.linalg.norm(db_desc[again[q]] - q_desc[q]), np.linalg.norm(db_desc[hardest[q]] - q_desc[q]))
                    for q in hardest}
        assert all(now <= before + 1e-6 for now, before in distance.values())
        hardest = again


def test_partial_mining_caches_a_subset_with_every_positive_and_remembered_negative():
    db_utm, q_utm, db_desc, q_desc = street(n_db=200)
    miner = Miner(tuple_sets(db_utm, q_utm), len(db_utm), MiningConfig(margin=4.0, num_negatives=3, subset=20))
    queries = np.arange(5)
    miner.memory[0] = [150, 151, 152]
    plan = miner.cache_plan(queries, np.random.default_rng(0))
    assert len(plan) < 60
    assert {150, 151, 152} <= set(plan.tolist())
    assert all(set(miner.sets.positives[q].tolist()) <= set(plan.tolist()) for q in queries)
    cache = FeatureCache(plan, db_desc[plan], queries, q_desc[queries])
    for t in miner.mine(cache, queries, np.random.default_rng(0)):
        assert set(t.negatives.tolist()) <= set(plan.tolist())


# --- loss and tuple batches -------------------------------------------------------------------------


def test_triplet_loss_matches_a_hand_computation():
    q = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.8, 0.6]])  # ||q - p||^2 = 0.04 + 0.36 = 0.4
    negatives = torch.tensor([[0.0, 1.0], [0.6, 0.8]])  # ||q - n||^2 = 2.0 and 0.16 + 0.64 = 0.8
    loss = triplet_loss(q, p, negatives, torch.tensor([0, 0]), margin=0.5)
    # mean(max(0, 0.4 + 0.5 - 2.0), max(0, 0.4 + 0.5 - 0.8)) = mean(0, 0.1)
    assert float(loss) == pytest.approx(0.05, abs=1e-6)


def test_tuple_batches_keep_each_negative_with_its_query(city):
    database, queries = load_split(city, "train")
    triplets = [Triplet(0, 1, np.array([4, 5, 6])), Triplet(2, 4, np.array([0]))]
    batch = collate_tuples([TupleImages(triplets, database.paths, queries.paths, SIZE)[i] for i in range(2)])
    assert batch.images.shape == (2 + 3 + 2 + 1, 3, *SIZE)
    assert batch.query.tolist() == [0, 5] and batch.positive.tolist() == [1, 6]
    assert batch.negatives.tolist() == [2, 3, 4, 7] and batch.owner.tolist() == [0, 0, 0, 1]


# --- the trainer ------------------------------------------------------------------------------------


def test_two_iteration_run_writes_checkpoints_that_build_an_index(first_epoch, city, clusters_cache, tmp_path):
    (record,) = first_epoch.records
    assert record["steps"] == 2 and record["tuples"] == 4 and math.isfinite(record["loss"])
    assert 0 <= record["R@1"] <= record["R@5"] <= 100 and first_epoch.best_recall == {"R@1": record["R@1"], "R@5": record["R@5"]}
    log = (first_epoch.run_dir / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1]
    model, pca = load_checkpoint(first_epoch.best)
    assert pca is not None and pca.whiten and pca.out_dim == 8 and first_epoch.extras["pca_dim"] == 8
    initial = build_model(tiny_config(city, tmp_path, clusters_cache).model_config(), seed=0)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, initial.state_dict()[k])]
    assert any(k.startswith("backbone.") for k in changed) and "head.centroids" in changed
    database, _ = load_split(city, "val")
    build_index(database, tmp_path / "index", model=model, model_pca=pca, options=ExtractOptions(num_workers=0))
    bundle = load_index(tmp_path / "index")
    assert bundle.dim == 8 and len(bundle.database) == len(database)


def test_mining_memory_survives_dataloader_workers(first_epoch, city, clusters_cache, tmp_path):
    with_workers = train_netvlad(tiny_config(city, tmp_path / "workers", clusters_cache, workers=2, pca_dim=0))
    memory = [load_payload(r.last)["extra"]["training"]["mining"]["memory"] for r in (first_epoch, with_workers)]
    assert int((memory[1] >= 0).sum()) == 4 * 2  # 4 queries mined, 2 hard negatives remembered each
    assert torch.equal(memory[0], memory[1])
    weights = [load_payload(r.last)["state_dict"] for r in (first_epoch, with_workers)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_resume_continues_exactly_like_an_uninterrupted_run(first_epoch, city, clusters_cache, tmp_path):
    straight = train_netvlad(tiny_config(city, tmp_path / "straight", clusters_cache, epochs=2, pca_dim=0))
    shutil.copytree(first_epoch.run_dir, tmp_path / "resumed")  # a moved run directory resumes too
    resumed = train_netvlad(tiny_config(city, tmp_path / "resumed", clusters_cache, epochs=2), resume=True)
    assert [r["epoch"] for r in resumed.records] == [2]
    a, b = (load_payload(r.last) for r in (straight, resumed))
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert torch.equal(a["extra"]["training"]["mining"]["memory"], b["extra"]["training"]["mining"]["memory"])
    assert straight.records[1]["loss"] == resumed.records[0]["loss"]
    assert a["extra"]["training"]["best"] == b["extra"]["training"]["best"]


def test_cli_trains_netvlad_and_the_checkpoint_builds_an_index(city, clusters_cache, tmp_path, monkeypatch, capsys):
    run = tmp_path / "runs" / "cli"
    options = [
        "train", "--method", "netvlad", "--dataset", city, "--out", run, "--epochs", 1, "--iterations-per-epoch", 2,
        "--batch-size", 8, "--negatives", 2, "--neg-samples", 5, "--cache-refresh", 2, "--triplet-margin", 4.0,
        "--layer", 3, "--clusters", 4, "--resize", "48x64", "--init-images", 12, "--init-per-image", 4,
        "--clusters-cache", tmp_path / "clusters.h5", "--pca-dim", 8, "--workers", 0, "--device", "cpu", "--json",
    ]
    code, out, err = run_cli(monkeypatch, capsys, *options)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["best"] == str(run / "best.pt") and summary["pca_dim"] == 8
    assert summary["epochs"][0]["steps"] == 2 and summary["epochs"][0]["tuples"] == 4  # 8 images // (2 + 2) per step
    code, _, err = run_cli(monkeypatch, capsys, *options)
    assert code == 2 and "--resume" in err  # an existing run is never overwritten
    index = tmp_path / "index"
    code, out, err = run_cli(monkeypatch, capsys, "build-index", city / "images" / "val" / "database", "--out", index,
                             "--checkpoint", run / "best.pt", "--workers", 0, "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(out)["dim"] == 8
