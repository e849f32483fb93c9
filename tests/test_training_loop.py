"""The shared training loop and what every method relies on: dataset layouts, configs, best-model rule, CLI."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli.train_cmds import epoch_line
from conftest import run_cli
from vpr.data.datasets import find_split, load_split, load_split_images, split_folder
from vpr.data.geo import format_at_name
from vpr.errors import UsageError
from vpr.models.checkpoints import save_checkpoint
from vpr.models.model import ModelConfig, build_model
from vpr.training.config import CosPlaceConfig
from vpr.training.loop import Precision, is_better, trainable
from vpr.training.run import RunDir, saved_best
from vpr.training.config import NetVLADConfig
from vpr.training.netvlad_init import sample_local_features

EAST, NORTH = 550_000.0, 4_180_000.0


def write_images(folder: Path, count: int, size: tuple[int, int] = (32, 32)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(count):
        pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / format_at_name(EAST + 50.0 * i, NORTH, 10, "S", heading=90.0))


# --- one dataset-layout resolver --------------------------------------------------------------------


def test_both_split_layouts_and_a_flat_train_folder_resolve_the_same_way(tmp_path):
    downloader, cosplace = tmp_path / "vg", tmp_path / "cp"
    for root, base in ((downloader, downloader / "images"), (cosplace, cosplace)):
        write_images(base / "val" / "database", 3)
        write_images(base / "val" / "queries", 2)
        write_images(base / "train", 4)  # a flat train folder (CosPlace's processed layout)
    assert split_folder(downloader, "val") == downloader / "images" / "val"
    assert split_folder(cosplace, "val") == cosplace / "val"
    for root in (downloader, cosplace):
        database, queries = load_split(root, "val")
        assert (len(database), len(queries)) == (3, 2) and database.labelled
        assert len(load_split_images(root, "train")) == 4 and len(load_split_images(root, "val")) == 5
    assert find_split(downloader, "test") is None
    with pytest.raises(UsageError, match=r"no images/test/ \(or test/\) folder"):
        split_folder(downloader, "test")
    with pytest.raises(UsageError, match="needs database/ and queries/ subfolders"):
        load_split(downloader, "train")
    with pytest.raises(UsageError, match="split folder name"):
        split_folder(downloader, "../vg")


def test_groups_reads_the_train_split_of_either_layout(monkeypatch, capsys, tmp_path):
    write_images(tmp_path / "cp" / "train", 4)
    code, out, err = run_cli(monkeypatch, capsys, "groups", tmp_path / "cp", "--min-images-per-class", 1, "--L", 1, "--json")
    assert code == 0, err
    assert '"source": "' + str(tmp_path / "cp" / "train") + '"' in out


# --- configs, best-model rule, resume state ---------------------------------------------------------


def test_both_configs_resolve_their_defaults_the_same_way():
    cosplace = CosPlaceConfig(dataset="d", out="o").resolved()
    assert (cosplace.lr, cosplace.freeze_early) == (3e-4, False)
    pretrained = CosPlaceConfig(dataset="d", out="o", pretrained="w.pth").resolved()
    assert (pretrained.lr, pretrained.freeze_early) == (1e-5, True)
    netvlad = NetVLADConfig(dataset="d", out="o").resolved()
    assert (netvlad.lr, netvlad.freeze_early, netvlad.weight_decay) == (1e-4, False, 0.0)
    assert netvlad.tuples_per_step == 32 // 12
    assert NetVLADConfig(dataset="d", out="o", optimizer="sgd").resolved().weight_decay == 1e-3
    assert NetVLADConfig(dataset="d", out="o", weight_decay=0.01).resolved().weight_decay == 0.01
    assert NetVLADConfig(dataset="d", out="o", batch_size=4).tuples_per_step == 1
    for config in (cosplace, netvlad):
        saved = config.to_dict()
        assert "out" not in saved and saved["method"] == config.method and Path(saved["dataset"]).is_absolute()
        assert saved == config.resolved().to_dict()  # resolving twice changes nothing
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.lr = 1.0
    with pytest.raises(UsageError, match="clusters 1"):
        NetVLADConfig(dataset="d", out="o", num_clusters=1).resolved()
    with pytest.raises(UsageError, match="epochs 0"):
        CosPlaceConfig(dataset="d", out="o", epochs=0).resolved()


def test_best_model_rule_is_r1_then_r5():
    best = {"epoch": 1, "recalls": {"R@1": 40.0, "R@5": 60.0}}
    assert is_better({"R@1": 41.0, "R@5": 50.0}, best)
    assert is_better({"R@1": 40.0, "R@5": 61.0}, best)
    assert not is_better({"R@1": 40.0, "R@5": 60.0}, best)
    assert not is_better({"R@1": 39.0, "R@5": 90.0}, best)
    assert is_better({"R@1": 0.0, "R@5": 0.0}, None)


def test_resume_reads_the_best_epoch_of_runs_written_before_the_shared_loop(tmp_path):
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    current = {"epoch": 2, "recalls": {"R@1": 30.0, "R@5": 50.0}}
    assert saved_best({"best": current}, run) == current
    old_netvlad = {"best": {"epoch": 2, "score": 50.0, "recall": {"R@1": 30.0, "R@5": 50.0}}}
    assert saved_best(old_netvlad, run) == current
    model = build_model(ModelConfig(layer=3, descriptor_dim=8, input_size=(32, 32)), seed=0)
    save_checkpoint(model, run.best, extra={"epoch": 2, "recalls": {"R@1": 30.0, "R@5": 50.0}})
    assert saved_best({"epoch": 3, "best_r1": 30.0}, run) == current  # old CosPlace: best.pt says which epoch


def test_freeze_early_leaves_conv1_to_layer2_out_of_the_optimiser():
    model = build_model(ModelConfig(head="netvlad", layer=3, num_clusters=4, input_size=(32, 32)), seed=0)
    params = trainable(model, NetVLADConfig(dataset="d", out="o", freeze_early=True))
    children = list(model.backbone.children())
    assert not any(p.requires_grad for child in children[:6] for p in child.parameters())
    assert all(p.requires_grad for child in children[6:] for p in child.parameters())
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert model.training


def test_mixed_precision_is_off_on_the_cpu():
    precision = Precision(NetVLADConfig(dataset="d", out="o", device="cpu"))
    assert precision.dtype is None and not precision.scaler.is_enabled()


def test_init_per_image_beyond_the_feature_map_warns(tmp_path, caplog):
    write_images(tmp_path / "db", 2)
    model = build_model(ModelConfig(head="netvlad", layer=3, num_clusters=4, input_size=(32, 32)), seed=0)
    with caplog.at_level(logging.WARNING):
        features = sample_local_features(model, sorted((tmp_path / "db").iterdir()), num_images=2, per_image=10)
    assert features.shape == (2 * 4, 256)  # a 32x32 input gives 2 x 2 positions after layer3
    assert "init_per_image 10" in caplog.text and "only 4 feature-map positions" in caplog.text


# --- CLI --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "option", "owner"), [
    ("netvlad", ["--crop-scale", "0.5"], "cosplace"), ("netvlad", ["--dim", "64"], "cosplace"),
    ("cosplace", ["--clusters", "8"], "netvlad"), ("cosplace", ["--weight-decay", "0"], "netvlad / place-batch"),
])
def test_cli_refuses_an_option_of_the_other_method(monkeypatch, capsys, tmp_path, method, option, owner):
    out = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, "train", "--method", method, "--dataset", tmp_path, "--out", out,
                           "--device", "cpu", *option)
    assert code == 2 and f"{option[0]} is a {owner} option; --method {method} does not use it" in err
    assert not out.exists()


def test_one_epoch_line_for_every_method():
    core = {"epoch": 2, "loss": 0.5, "images": 64, "train_seconds": 2.0, "R@1": 40.0, "R@5": 60.0, "best": True,
            "seconds": 3.0, "images_per_second": 32.0}
    assert epoch_line({**core, "group": 1, "classes": 12}) == (
        "epoch 2: loss 0.5000 R@1 40.00 R@5 60.00 32.0 img/s (best); group 1, classes 12")
    assert epoch_line({**core, "best": False, "tuples": 4, "lr": 1e-4}).endswith("32.0 img/s; tuples 4, lr 0.0001")
