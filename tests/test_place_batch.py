"""Place-batch training: the GSV-Cities sampler's semantics, the places it reads, the multi-similarity loss on a
fixed batch against its formula, frozen blocks, resume, fine-tuning a file, and the CLI from photos to an index."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import perturb, place_image, run_cli, write_places
from vpr.data.geo import format_at_name
from vpr.errors import LabelError, UsageError
from vpr.models.checkpoints import load_payload, save_checkpoint
from vpr.models.model import ModelConfig, build_model
from vpr.training.place_batch import freeze_blocks, multi_similarity, train_place_batch
from vpr.training.place_data import CITY_OFFSET, PlaceSet, epoch_batches, gsv_image_name, load_places
from vpr.training.recipes import RECIPES, PlaceBatchConfig, Schedule

pytest.importorskip("pytorch_metric_learning")
SIZE = (32, 32)
HEAD = {"out_channels": 16, "s1": 1, "s2": 1}


def test_an_epoch_visits_every_place_once_with_k_of_its_own_images_shuffled_within_cities():
    labels = np.repeat(np.arange(10), 5)  # 10 places of 5 images; places 0-5 in city 0, 6-9 in city 1
    cities = (labels >= 6).astype(int)
    places = PlaceSet([Path(f"{i}.jpg") for i in range(50)], labels, cities, Path("x"))
    generator = torch.Generator().manual_seed(0)
    batches = epoch_batches(places, 4, 3, generator)
    assert [len(b) for b in batches] == [12, 12, 6]  # P x K, the last batch smaller (drop_last=False)
    drawn = np.concatenate(batches)
    order = labels[drawn[::3]]
    assert sorted(order.tolist()) == list(range(10))  # every place once
    assert set(order[:6]) == set(range(6)) and set(order[6:]) == set(range(6, 10))  # cities in order
    for place_images in drawn.reshape(-1, 3):
        assert len(set(place_images)) == 3 and len(set(labels[place_images])) == 1  # K distinct images, one place
    again = np.concatenate(epoch_batches(places, 4, 3, generator))
    assert not np.array_equal(again, drawn)  # the next epoch reshuffles


def write_gsv(root: Path, cities: dict[str, list[int]], rng: np.random.Generator) -> None:
    """A GSV-Cities root: per city a dataframe with `counts[i]` images of place i, named as the reference does."""
    (root / "Dataframes").mkdir(parents=True)
    for city, counts in cities.items():
        rows = []
        for place, count in enumerate(counts):
            image = place_image(rng, SIZE)
            for k in range(count):
                rows.append({"place_id": place, "year": 2010 + k, "month": 3, "northdeg": 90, "city_id": city,
                             "lat": 37.7 + place * 1e-3, "lon": -122.4, "panoid": f"pano{place}x{k}"})
                name = gsv_image_name({key: str(v) for key, v in rows[-1].items()}, place)
                (root / "Images" / city).mkdir(parents=True, exist_ok=True)
                Image.fromarray(perturb(image, rng)).save(root / "Images" / city / name)
        with open(root / "Dataframes" / f"{city}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def test_a_gsv_cities_root_reads_as_the_reference_loader_does(tmp_path):
    write_gsv(tmp_path, {"Boston": [4, 2, 5], "Chicago": [4, 4]}, np.random.default_rng(0))
    places = load_places(tmp_path, min_images=4)
    assert sorted(set(places.labels.tolist())) == [0, 2, CITY_OFFSET, CITY_OFFSET + 1]  # second city offset by 10^5
    assert places.left_out == {"in a place of fewer than 4 images": 2}
    assert all(p.parent.name == ("Boston" if c == 0 else "Chicago") for p, c in zip(places.paths, places.cities))
    with pytest.raises(UsageError, match="no place has 6 images; lower images_per_place"):
        load_places(tmp_path, min_images=6)
    (tmp_path / "Images" / "Chicago" / places.paths[-1].name).unlink()
    with pytest.raises(LabelError, match=r"Chicago.csv:9: image .* not found") as caught:
        load_places(tmp_path, min_images=4)
    assert "\n" not in str(caught.value)


def restated_loss(x: np.ndarray, labels: np.ndarray, eps=0.1, alpha=1.0, beta=50.0, base=0.0) -> float:
    """The multi-similarity miner and loss written out (Wang et al. 2019, as pytorch-metric-learning reduces it)."""
    sim, n, terms = x @ x.T, len(x), []
    for i in range(n):
        pos = [j for j in range(n) if j != i and labels[j] == labels[i]]
        neg = [k for k in range(n) if labels[k] != labels[i]]
        kept_pos = [j for j in pos if sim[i, j] - eps < max(sim[i, neg])]
        kept_neg = [k for k in neg if sim[i, k] + eps > min(sim[i, pos])]
        if not kept_pos and not kept_neg:
            continue
        terms.append(np.log1p(np.exp(-alpha * (sim[i, kept_pos] - base)).sum()) / alpha
                     + np.log1p(np.exp(beta * (sim[i, kept_neg] - base)).sum()) / beta)
    return float(np.mean(terms))


def test_the_loss_on_a_fixed_batch_is_the_restated_formula():
    generator = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(12, 8, generator=generator, dtype=torch.float64), dim=1)
    labels = torch.arange(4).repeat_interleave(3)
    loss_fn, miner = multi_similarity()
    loss = loss_fn(x, labels, miner(x, labels))
    assert float(loss) == pytest.approx(restated_loss(x.numpy(), labels.numpy()), rel=1e-9)


def test_frozen_blocks_do_not_change_and_get_no_gradient():
    model = build_model(ModelConfig.for_backbone("resnet18", head="convap", layer=3, input_size=SIZE, head_options=HEAD))
    assert freeze_blocks(model, 1) == 6  # conv1, bn1, relu, maxpool, layer1, layer2 frozen; layer3 trains
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss_fn, miner = multi_similarity()
    x = model(torch.randn(8, 3, *SIZE))
    labels = torch.arange(4).repeat_interleave(2)
    loss_fn(x, labels, miner(x, labels)).backward()
    optimizer.step()
    after = model.state_dict()
    frozen = [k for k in before if k.startswith(("backbone.0.", "backbone.4.", "backbone.5.")) and "running" not in k
              and "num_batches" not in k]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(p.grad is None for p in model.backbone[5].parameters())
    assert not torch.equal(before["backbone.6.0.conv1.weight"], after["backbone.6.0.conv1.weight"])
    with pytest.raises(UsageError, match="train_blocks 4: resnet18 has 3 blocks"):
        freeze_blocks(model, 4)


def test_schedules_follow_the_references_and_size_themselves_to_small_runs():
    linear = Schedule(warmup=2, decay_steps=10, end_factor=0.2)
    assert [round(linear.factor(s), 3) for s in (0, 1, 5, 10, 50)] == [0.5, 0.92, 0.6, 0.2, 0.2]
    steps = Schedule(warmup=0, milestones=(3, 6), gamma=0.3)
    assert [round(steps.factor(s), 3) for s in (0, 3, 6)] == [1.0, 0.3, 0.09]
    config = PlaceBatchConfig(dataset=".", out="o", recipe="convap", epochs=30)
    assert config.schedule(2).warmup == 6 and config.schedule(2).milestones == ()  # 60 steps: warm-up 6, no epoch steps
    reference = PlaceBatchConfig(dataset=".", out="o", recipe="convap", reference=True).resolved()
    assert reference.schedule(600) == Schedule(600, (3000, 6000, 9000, 15000), 0.3)  # gsv-cities' main.py
    assert RECIPES["salad"].train_size == (224, 224) and PlaceBatchConfig(dataset=".", out="o", recipe="salad").resolved().input_size == (322, 322)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_photos(tmp_path_factory.mktemp("photos"))


def write_photos(root: Path) -> Path:
    """A photo folder: 10 places 100 m apart, 4 images each (within 3 m), and a val split with one query per place."""
    rng = np.random.default_rng(0)
    for i in range(10):
        image = place_image(rng, SIZE)
        for k in range(4):
            name = format_at_name(550000.0 + 100.0 * i + k, 4180000.0, 10, "S", heading=0.0)
            (root / "images/train/database").mkdir(parents=True, exist_ok=True)
            Image.fromarray(perturb(image, rng)).save(root / "images/train/database" / name, quality=95)
    write_places(root / "images/val", 10, seed=0)
    return root


def tiny(dataset: Path, out: Path, **overrides) -> PlaceBatchConfig:
    values = dict(dataset=str(dataset), out=str(out), recipe="convap", backbone="resnet18", layer=3, input_size=SIZE,
                  places_per_batch=4, images_per_place=2, epochs=2, warmup=1, head_options=HEAD, workers=0, seed=2)
    return PlaceBatchConfig(**{**values, **overrides})


def test_resume_continues_exactly(photos, tmp_path):
    full = train_place_batch(tiny(photos, tmp_path / "full", epochs=2))
    train_place_batch(tiny(photos, tmp_path / "split", epochs=1))
    train_place_batch(tiny(photos, tmp_path / "split", epochs=2), resume=True)
    a, b = load_payload(full.last)["state_dict"], load_payload(tmp_path / "split" / "last.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full.extras["places"] == 10 and full.extras["steps_per_epoch"] == 3


def test_init_fine_tunes_a_file_keeping_its_preprocessing(photos, tmp_path):
    config = ModelConfig.for_backbone("resnet18", head="convap", layer=3, input_size=(40, 40), head_options=HEAD)
    start = save_checkpoint(build_model(config, seed=5), tmp_path / "start.pt")
    result = train_place_batch(tiny(photos, tmp_path / "run", init=str(start), epochs=1, input_size=None))
    trained = load_payload(result.best)
    assert trained["config"]["input_size"] == [40, 40]
    with pytest.raises(UsageError, match="a convap model; fine-tune it with the convap recipe, not mixvpr"):
        train_place_batch(tiny(photos, tmp_path / "other", init=str(start), recipe="mixvpr", head_options={}))


def test_photos_to_places_to_a_trained_index_through_the_cli(photos, tmp_path, monkeypatch, capsys):
    places = tmp_path / "places.csv"
    code, _, err = run_cli(monkeypatch, capsys, "places", photos / "images/train/database", "--out", places,
                           "--min-images", 4)
    assert code == 0, err
    code, out, err = run_cli(monkeypatch, capsys, "train", "--method", "convap", "--dataset", places, "--out", tmp_path / "run",
                             "--backbone", "resnet18", "--layer", 3, "--resize", "32x32", "--places-per-batch", 4,
                             "--images-per-place", 4, "--epochs", 1, "--val", photos / "images/val", "--workers", 0, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["places"] == 10 and report["epochs"][0]["steps"] == 3 and 0 < report["epochs"][0]["mined_share"] <= 1
    code, _, err = run_cli(monkeypatch, capsys, "build-index", photos / "images/val/database", "--checkpoint",
                           tmp_path / "run/best.pt", "--out", tmp_path / "index")
    assert code == 0, err
    code, out, err = run_cli(monkeypatch, capsys, "eval", photos / "images/val/queries", "--index", tmp_path / "index", "--json")
    assert code == 0, err
    assert json.loads(out)["recall"]["R@1"] == pytest.approx(report["best_recall"]["R@1"])  # the index answers as validation did


def test_bad_training_data_are_one_line_errors(photos, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "train", "--method", "mixvpr", "--dataset", tmp_path / "none.csv",
                           "--out", tmp_path / "r", "--val", photos / "images/val")
    assert code != 0 and "places CSV not found; write it with vpr places" in err
    code, _, err = run_cli(monkeypatch, capsys, "train", "--method", "convap", "--dataset", photos, "--out", tmp_path / "r",
                           "--images-per-place", 5, "--val", photos / "images/val")
    assert code != 0 and "no place has 5 images" in err and len(err.strip().splitlines()) == 1
    unlocated = tmp_path / "plain/images/train/database"
    unlocated.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(place_image(np.random.default_rng(i), SIZE)).save(unlocated / f"IMG_{i}.jpg")
    code, _, err = run_cli(monkeypatch, capsys, "train", "--method", "gem", "--dataset", tmp_path / "plain", "--out",
                           tmp_path / "r", "--val", photos / "images/val")
    assert code != 0 and "making places" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
    code, _, err = run_cli(monkeypatch, capsys, "train", "--method", "cosplace", "--dataset", photos, "--out", tmp_path / "r",
                           "--places-per-batch", 8)
    assert code == 2 and "--places-per-batch is a place-batch option" in err


def test_init_from_a_published_salad_file_validates_first_as_its_own_index(photos, tmp_path, monkeypatch, capsys):
    """A SALAD-layout file (ViT-S/14, random weights that make every layer matter) fine-tuned with a vanishing lr:
    the run's first validation is exactly the recall of the file's own index on the same split."""
    from test_published_salad import dinov2_state, salad_state

    gen = torch.Generator().manual_seed(0)
    state = {f"backbone.model.{k}": v for k, v in dinov2_state(gen).items()} | salad_state(gen, 384, 4, 8, 5, 16)
    published = tmp_path / "dino_salad.ckpt"
    torch.save(state, published)
    val, rng = tmp_path / "val", np.random.default_rng(3)
    for i in range(30):  # 30 places, each query a heavily noised view of its place
        image = place_image(rng, (42, 56))
        for kind, picture in (("database", image), ("queries", perturb(image, rng, noise=110.0))):
            (val / kind).mkdir(parents=True, exist_ok=True)
            Image.fromarray(picture).save(val / kind / format_at_name(550000.0 + 100.0 * i, 4180000.0, 10, "S"))
    config = tiny(photos, tmp_path / "run", recipe="salad", init=str(published), train_blocks=1, train_size=(56, 56),
                  input_size=None, head_options=None, lr=1e-30, epochs=1, warmup=0, val=str(val))
    result = train_place_batch(config)
    assert result.extras["frozen_blocks"] == 12  # the patch embedding and 11 of 12 blocks
    code, _, err = run_cli(monkeypatch, capsys, "build-index", val / "database", "--checkpoint", published,
                           "--out", tmp_path / "index")
    assert code == 0, err
    code, out, err = run_cli(monkeypatch, capsys, "eval", val / "queries", "--index", tmp_path / "index", "--json")
    assert code == 0, err
    recall = json.loads(out)["recall"]
    first = result.records[0]
    assert (first["R@1"], first["R@5"]) == pytest.approx((recall["R@1"], recall["R@5"]), abs=0.005)  # eval prints 2 decimals
    assert 0 < recall["R@1"] < 100  # a split that tells models apart


def test_a_budget_of_steps_ends_in_the_middle_of_an_epoch(photos, tmp_path):
    result = train_place_batch(tiny(photos, tmp_path / "run", epochs=None, steps=4))  # 3 batches per epoch
    assert [r["steps"] for r in result.records] == [3, 1] and load_payload(result.last)["extra"]["training"]["step"] == 4
    with pytest.raises(UsageError, match="give one budget, not both"):
        tiny(photos, tmp_path / "other", epochs=2, steps=4).resolved()


def test_mixvpr_trains_at_input_sizes_that_are_not_multiples_of_its_stride():
    model = build_model(ModelConfig.for_backbone("resnet18", head="mixvpr", layer=3, input_size=(40, 56)))  # 2.5 x 3.5 cells
    assert model(torch.randn(2, 3, 40, 56)).shape == (2, model.config.descriptor_dim)
