"""CosPlace: class groups (paper properties, cache), CosFace loss, batch augmentation, trainer, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from cli.app import app
from vpr.data.datasets import GeoImageSet, load_folder
from vpr.data.geo import format_at_name
from vpr.errors import LabelError, OutputError, UsageError
from vpr.models.checkpoints import load_checkpoint, load_payload
from vpr.models.model import build_model
from vpr.training import cosplace_groups
from vpr.training.augment import augment_batch, hsv_to_rgb, rgb_to_hsv
from vpr.training.config import AugmentParams
from vpr.training.cosface import CosFaceClassifier, cosface_logits, cosface_loss
from vpr.training.cosplace import train_cosplace
from vpr.training.config import CosPlaceConfig
from vpr.training.cosplace_groups import build_groups, compute_groups
from vpr.training.config import GroupParams

SIZE = (48, 64)
EAST, NORTH = 550_000.0, 4_180_000.0


def geo_set(utm: np.ndarray, heading: np.ndarray | None) -> GeoImageSet:
    return GeoImageSet(paths=[Path(f"{i}.jpg") for i in range(len(utm))], utm=np.asarray(utm, float),
                       heading=None if heading is None else np.asarray(heading, float), source=Path("mem"))


# ---------------------------------------------------------------- groups

VALID_ALPHA_L = [(a, l) for a in (30.0, 45.0, 60.0, 90.0, 120.0) for l in (1, 2, 3) if (360.0 / (a * l)).is_integer()]


@st.composite
def grouping_cases(draw):
    alpha, L = draw(st.sampled_from(VALID_ALPHA_L))
    params = GroupParams(
        M=draw(st.sampled_from([1.0, 2.5, 10.0, 12.5])), alpha=alpha, N=draw(st.integers(1, 5)), L=L,
        min_images_per_class=draw(st.integers(1, 3)),
    )
    n = draw(st.integers(1, 60))
    cells = st.floats(-3.0 * params.N, 3.0 * params.N, allow_nan=False)
    units = np.array(draw(st.lists(st.tuples(cells, cells), min_size=n, max_size=n)))
    heading = np.array(draw(st.lists(st.floats(0.0, 359.9), min_size=n, max_size=n)))
    return params, units * params.M + np.array([EAST, NORTH]), heading


def circular_sectors(a: np.ndarray, b: np.ndarray, sectors: int) -> np.ndarray:
    d = np.abs(a - b) % sectors
    return np.minimum(d, sectors - d)


@settings(max_examples=80, deadline=None)
@given(grouping_cases())
def test_grouping_has_the_papers_properties(case):
    params, utm, heading = case
    groups = compute_groups(geo_set(utm, heading), params)
    kept = np.flatnonzero(groups.image_class >= 0)
    cells = cosplace_groups.class_cells(utm, heading, params)
    # small classes are dropped, the rest kept
    _, inverse, counts = np.unique(cells, axis=0, return_inverse=True, return_counts=True)
    assert np.array_equal(groups.image_class >= 0, counts[inverse.reshape(-1)] >= params.min_images_per_class)
    # (1) each class belongs to exactly one group, the one its cell gives
    assert len(groups.class_group) == groups.num_classes
    assert len(np.unique(groups.group_ids, axis=0)) == groups.num_groups
    assert np.array_equal(groups.group_ids[groups.class_group], cosplace_groups.group_of_cells(groups.class_cells, params))
    assert np.array_equal(groups.class_cells[groups.image_class[kept]], cells[kept])
    # (3) at most N*N*L groups
    assert groups.num_groups <= params.N * params.N * params.L
    # (2) images of different classes in one group are >= M(N-1) m or >= alpha(L-1) degrees apart
    group_of_image = groups.class_group[groups.image_class[kept]]
    for a in range(len(kept)):
        for b in range(a + 1, len(kept)):
            i, j = kept[a], kept[b]
            if group_of_image[a] != group_of_image[b] or groups.image_class[i] == groups.image_class[j]:
                continue
            metres = np.max(np.abs(utm[i] - utm[j]))
            turn = abs(heading[i] - heading[j]) % 360.0
            degrees = min(turn, 360.0 - turn)
            assert metres >= params.M * (params.N - 1) - 1e-6 or degrees >= params.alpha * (params.L - 1) - 1e-6
    # (4) adjacent classes (one cell or one sector apart) never share a group
    if params.N > 1 and params.L > 1:
        sectors = round(360.0 / params.alpha)
        c = groups.class_cells
        for a in range(len(c)):
            near = (np.abs(c[:, 0] - c[a, 0]) <= 1) & (np.abs(c[:, 1] - c[a, 1]) <= 1) & (circular_sectors(c[:, 2], c[a, 2], sectors) <= 1)
            near[a] = False
            assert not np.any(groups.class_group[near] == groups.class_group[a])


def test_class_and_group_of_a_known_image():
    params = GroupParams(min_images_per_class=1)  # M 10, alpha 30, N 5, L 2
    groups = compute_groups(geo_set(np.array([[123.0, 47.5]]), np.array([100.0])), params)
    # class origin (120, 40, 90 deg); group ((120 mod 50)/10, (40 mod 50)/10, (90 mod 60)/30)
    assert groups.class_cells.tolist() == [[12, 4, 3]]
    assert groups.group_ids.tolist() == [[2, 4, 1]]


def test_groups_are_ordered_largest_first_and_drop_small_classes():
    # cells 0 and 5 share group (0, 0, 0); cell 1 is group (1, 0, 0); cell 2 has one image only
    utm = np.array([[0.0, 0.0]] * 2 + [[50.0, 0.0]] * 2 + [[15.0, 0.0]] * 3 + [[25.0, 0.0]])
    groups = compute_groups(geo_set(utm, np.zeros(len(utm))), GroupParams(min_images_per_class=2, L=1))
    summary = groups.summary()
    assert summary["dropped_images"] == 1 and summary["classes"] == 3
    assert summary["group_ids"] == [[0, 0, 0], [1, 0, 0]]
    assert summary["classes_per_group"] == [2, 1] and summary["images_per_group"] == [4, 3]


def test_missing_heading_is_an_error_when_grouping_by_heading():
    utm = np.zeros((4, 2))
    heading = np.array([0.0, np.nan, 10.0, 20.0])
    with pytest.raises(LabelError, match="no heading.*--L 1"):
        compute_groups(geo_set(utm, heading), GroupParams(L=2, min_images_per_class=1))
    groups = compute_groups(geo_set(utm, heading), GroupParams(L=1, min_images_per_class=1))
    assert not groups.uses_heading and groups.num_classes == 1


@pytest.mark.parametrize("kwargs", [{"alpha": 50.0, "L": 2}, {"M": 0.0}, {"N": 0}, {"min_images_per_class": 0}])
def test_bad_group_parameters_are_usage_errors(kwargs):
    with pytest.raises(UsageError):
        GroupParams(**kwargs)


def test_group_cache_is_reused_and_rebuilt_when_data_or_params_change(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images = geo_set(rng.uniform(0, 200, (300, 2)), rng.uniform(0, 360, 300))
    params = GroupParams(min_images_per_class=1)
    cache = tmp_path / "groups.h5"
    first = build_groups(images, params, cache=cache)
    assert cache.is_file()

    calls = []
    real = cosplace_groups.compute_groups
    monkeypatch.setattr(cosplace_groups, "compute_groups", lambda *a: calls.append(1) or real(*a))
    again = build_groups(images, params, cache=cache)
    assert calls == [] and np.array_equal(again.image_class, first.image_class)
    assert np.array_equal(again.group_ids, first.group_ids)

    other = build_groups(images, GroupParams(M=20.0, min_images_per_class=1), cache=cache)
    assert calls == [1] and other.num_classes < first.num_classes
    moved = geo_set(images.utm + 5.0, images.heading)
    build_groups(moved, GroupParams(M=20.0, min_images_per_class=1), cache=cache)
    assert calls == [1, 1]
    cache.write_bytes(b"a file of the user's")  # not a vpr group cache: refused, never overwritten
    with pytest.raises(OutputError, match="not a class-group cache written by vpr"):
        build_groups(images, params, cache=cache)
    assert cache.read_bytes() == b"a file of the user's" and calls == [1, 1]


# ---------------------------------------------------------------- CosFace and augmentation

def test_cosface_loss_matches_a_hand_computed_case():
    cosine = torch.tensor([[0.5, 0.1], [0.2, 0.9]])
    labels = torch.tensor([0, 1])
    logits = cosface_logits(cosine, labels, s=30.0, m=0.4)
    assert torch.allclose(logits, torch.tensor([[3.0, 3.0], [6.0, 15.0]]))
    expected = (math.log(2.0) + math.log(1.0 + math.exp(-9.0))) / 2.0
    assert cosface_loss(cosine, labels, s=30.0, m=0.4).item() == pytest.approx(expected, rel=1e-6)


def test_cosface_classifier_gives_cosines():
    classifier = CosFaceClassifier(2, 2)
    with torch.no_grad():
        classifier.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    assert torch.allclose(classifier(torch.tensor([[3.0, 4.0]])), torch.tensor([[0.6, 0.8]]))


def test_augmentation_is_per_image_seeded_and_in_range():
    images = torch.rand(4, 3, 24, 32, generator=torch.Generator().manual_seed(0))
    a = augment_batch(images, AugmentParams(), torch.Generator().manual_seed(1))
    b = augment_batch(images, AugmentParams(), torch.Generator().manual_seed(1))
    assert a.shape == images.shape and torch.equal(a, b)
    assert a.min() >= 0.0 and a.max() <= 1.0
    same = augment_batch(images[:1].repeat(2, 1, 1, 1), AugmentParams(), torch.Generator().manual_seed(2))
    assert not torch.allclose(same[0], same[1])
    off = AugmentParams(brightness=0, contrast=0, saturation=0, hue=0, crop_scale=1.0)
    assert torch.equal(augment_batch(images, off, torch.Generator()), images)


def test_hue_shift_matches_torchvision():
    from torchvision.transforms.functional import adjust_hue

    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    hsv = rgb_to_hsv(images)
    hsv[:, 0] = torch.remainder(hsv[:, 0] + 0.3, 1.0)
    expected = torch.stack([adjust_hue(img, 0.3) for img in images])
    assert torch.allclose(hsv_to_rgb(hsv), expected, atol=1e-5)


# ---------------------------------------------------------------- training

def blob(rng: np.random.Generator) -> np.ndarray:
    coarse = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((SIZE[1], SIZE[0]), Image.BICUBIC))


def noisy(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(image.astype(np.float32) * rng.uniform(0.9, 1.1) + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)


def write(folder: Path, image: np.ndarray, east: float, north: float, heading: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / format_at_name(east, north, 10, "S", heading=heading), quality=95)


@pytest.fixture(scope="module")
def city(tmp_path_factory) -> Path:
    """6 places 100 m apart, alternating between two CosPlace groups; 3 train images each, val db + queries."""
    root = tmp_path_factory.mktemp("cosplace-city")
    rng = np.random.default_rng(0)
    for i in range(6):
        east, north = EAST + 100.0 * i + 10.0 * (i % 2) + 3.0, NORTH + 3.0
        place = blob(rng)
        for k in range(3):
            write(root / "images/train/database", noisy(place, rng), east + k, north + k, 5.0 + 5 * k)
        write(root / "images/val/database", place, east, north, 10.0)
        write(root / "images/val/queries", noisy(place, rng), east + 2.0, north - 1.0, 12.0)
    return root


def tiny_config(city: Path, out: Path, **overrides) -> CosPlaceConfig:
    values = dict(
        dataset=str(city), out=str(out), layer=3, dim=32, input_size=SIZE, epochs=1, iterations_per_epoch=2, batch_size=4,
        groups=GroupParams(min_images_per_class=2), workers=0, seed=3,
    )
    values.update(overrides)
    return CosPlaceConfig(**values)


@pytest.fixture(scope="module")
def first_run(city, tmp_path_factory) -> tuple[Path, object, list]:
    """One epoch of two iterations on the tiny city: (run dir, result, progress calls)."""
    out = tmp_path_factory.mktemp("first") / "run"
    phases = []
    result = train_cosplace(tiny_config(city, out), progress=lambda phase, done, total: phases.append((phase, done, total)))
    return out, result, phases


def test_two_iteration_run_writes_a_usable_run_directory(city, first_run):
    out, result, phases = first_run
    assert result.extras == {"groups": 2, "groups_trained": 1}  # two groups in the rotation, one epoch trains one
    assert ("epoch 1/1 group 0", 2, 2) in phases
    assert {p.name for p in out.iterdir()} >= {"config.json", "last.pt", "best.pt", "log.jsonl", "groups.h5"}
    record = json.loads((out / "log.jsonl").read_text())
    assert record["epoch"] == 1 and record["loss"] > 0 and 0 <= record["R@1"] <= 100
    trained, _ = load_checkpoint(out / "best.pt")
    config = tiny_config(city, out).resolved()
    initial = build_model(config.model_config(), seed=config.seed)
    assert not torch.equal(trained.state_dict()["head.fc.weight"], initial.state_dict()["head.fc.weight"])
    assert initial.random_init and not trained.random_init  # a trained checkpoint is not marked as random weights
    training = load_payload(out / "last.pt")["extra"]["training"]
    assert training["epoch"] == 1 and len(training["classifiers"]) == 2


def weights(path: Path) -> dict[str, torch.Tensor]:
    payload = load_payload(path)
    training = payload["extra"]["training"]
    flat = {f"model.{k}": v for k, v in payload["state_dict"].items()}
    for g, state in enumerate(training["classifiers"]):
        flat.update({f"classifier{g}.{k}": v for k, v in state.items()})
    for g, state in enumerate(training["classifier_optimizers"]):
        flat.update({f"adam{g}.{s}.{k}": v for s, moments in state["state"].items() for k, v in moments.items()})
    return flat


def test_resume_continues_exactly(city, tmp_path):
    """3 epochs in one go == 2 then resume 1 (group 0 again, its Adam state restored) == killed in epoch 2 then resumed."""
    full = train_cosplace(tiny_config(city, tmp_path / "full", epochs=3, iterations_per_epoch=1))

    train_cosplace(tiny_config(city, tmp_path / "split", epochs=2, iterations_per_epoch=1))
    train_cosplace(tiny_config(city, tmp_path / "split", epochs=3, iterations_per_epoch=1), resume=True)

    def crash(phase: str, done: int, total: int) -> None:
        if phase.startswith("epoch 2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_cosplace(tiny_config(city, tmp_path / "killed", epochs=3, iterations_per_epoch=1), progress=crash)
    assert len((tmp_path / "killed" / "log.jsonl").read_text().splitlines()) == 1
    train_cosplace(tiny_config(city, tmp_path / "killed", epochs=3, iterations_per_epoch=1), resume=True)

    reference = weights(full.last)
    for run in ("split", "killed"):
        resumed = weights(tmp_path / run / "last.pt")
        assert resumed.keys() == reference.keys()
        assert all(torch.equal(resumed[k], reference[k]) for k in reference), run
        log = [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in log] == [1, 2, 3]
        assert [r["loss"] for r in log] == [r["loss"] for r in full.records]
        assert load_payload(tmp_path / run / "last.pt")["extra"]["training"]["best"] == load_payload(full.last)["extra"]["training"]["best"]


def test_runs_refuse_overwrite_and_changed_settings(city, first_run, tmp_path):
    out = first_run[0]
    with pytest.raises(UsageError, match="resume"):
        train_cosplace(tiny_config(city, out))
    with pytest.raises(UsageError, match="batch_size"):
        train_cosplace(tiny_config(city, out, batch_size=2), resume=True)
    with pytest.raises(UsageError, match="nothing to resume"):
        train_cosplace(tiny_config(city, tmp_path / "new"), resume=True)


# ---------------------------------------------------------------- CLI

def test_cli_train_then_build_index_with_the_checkpoint(city, tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    args = ["train", "--method", "cosplace", "--dataset", str(city), "--out", str(out), "--epochs", "1",
            "--iterations-per-epoch", "1", "--batch-size", "4", "--resize", "48x64", "--layer", "3", "--dim", "32",
            "--min-images-per-class", "2", "--workers", "0", "--device", "cpu", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["epochs_run"] == 1 and Path(summary["best"]).is_file()
    assert summary["groups"] == 2 and summary["groups_trained"] == 1  # the groups actually trained, not --groups-num
    assert summary["best_recall"] == {k: summary["epochs"][0][k] for k in ("R@1", "R@5")}
    index = tmp_path / "index"
    result = runner.invoke(app, ["build-index", str(city / "images/val/database"), "--checkpoint", summary["best"],
                                 "--out", str(index), "--workers", "0", "--device", "cpu", "--no-cache", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dim"] == 32


def test_cli_groups_prints_counts_and_draws_a_map(city, tmp_path):
    png = tmp_path / "map.png"
    result = CliRunner().invoke(app, ["groups", str(city), "--min-images-per-class", "3", "--map", str(png), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["classes"] == 6 and summary["classes_per_group"] == [3, 3] and summary["dropped_images"] == 0
    with Image.open(png) as img:
        assert img.width >= 320


def test_groups_of_a_folder_matches_the_library(city):
    images = load_folder(city / "images/train")
    groups = compute_groups(images, GroupParams(min_images_per_class=4))
    assert groups.num_classes == 0 and groups.dropped_images == 18
