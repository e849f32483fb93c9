"""DDP training equals single-process training: 2 CPU ranks (gloo) x half a batch against 1 process x the batch.

The ranks are `torch.multiprocessing` processes given torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT),
so they join through `vpr.distributed.init` exactly as under torchrun; one slow test runs the real
`torchrun --no-python vpr train`. BatchNorm: per-rank batches give per-rank batch statistics (DDP on the CPU
cannot use SyncBatchNorm), so every run here keeps BatchNorm in eval mode; everything else is what training runs.
Tolerances: NetVLAD with SGD (linear in the gradients): max |w_ddp - w_single| <= 1e-5 over every weight and
momentum buffer. CosPlace trains with Adam, whose first steps move each weight by about lr * g / (|g| + 1e-8): float
noise in the near-zero gradients of a 2 x 2 against a 4 image batch becomes steps of up to lr (3e-4), so its weights
agree to COSPLACE_TOLERANCE (measured: 1e-4 after 1 step, 1.2e-3 after 4), while its per-epoch losses agree to 1e-5.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import test_cosplace
import test_netvlad_training
import test_place_batch
from test_cosplace import tiny_config as cosplace_config
from test_cosplace import weights as cosplace_weights
from test_netvlad_training import tiny_config as netvlad_config
from tests.conftest import free_port, join_gloo
from vpr import distributed
from vpr.models.checkpoints import load_payload
from vpr.training.cosplace import train_cosplace
from vpr.training.netvlad import train_netvlad
from vpr.training.place_batch import train_place_batch

TOLERANCE = 1e-5
COSPLACE_TOLERANCE = 2.5e-3


@pytest.fixture(scope="module")
def cosplace_city(tmp_path_factory) -> Path:
    """test_cosplace's tiny city: 6 places alternating between two groups, 3 train images each."""
    root = tmp_path_factory.mktemp("cosplace-city")
    rng = np.random.default_rng(0)
    for i in range(6):
        east, north = test_cosplace.EAST + 100.0 * i + 10.0 * (i % 2) + 3.0, test_cosplace.NORTH + 3.0
        place = test_cosplace.blob(rng)
        for k in range(3):
            test_cosplace.write(root / "images/train/database", test_cosplace.noisy(place, rng), east + k, north + k, 5.0 + 5 * k)
        test_cosplace.write(root / "images/val/database", place, east, north, 10.0)
        test_cosplace.write(root / "images/val/queries", test_cosplace.noisy(place, rng), east + 2.0, north - 1.0, 12.0)
    return root


@pytest.fixture(scope="module")
def netvlad_city(tmp_path_factory) -> Path:
    """test_netvlad_training's tiny city: 6 training places, 3 validation places."""
    root = tmp_path_factory.mktemp("netvlad-city")
    test_netvlad_training.write_split(root, "train", 6, seed=1)
    test_netvlad_training.write_split(root, "val", 3, seed=2)
    return root


def eval_batchnorm() -> None:
    """Keep every BatchNorm in eval mode (running statistics), whatever `.train()` asks."""
    _BatchNorm.train = lambda self, mode=True: nn.Module.train(self, False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # one thread per process: the ranks share the cores


def rank_main(rank: int, world: int, port: int, jobs: list) -> None:
    """One rank: torchrun's environment, join, run each (trainer, config, resume), leave."""
    eval_batchnorm()
    join_gloo(rank, world, port)
    try:
        for trainer, config, resume in jobs:
            trainer(config, resume=resume)
    finally:
        distributed.shutdown()


def run_ranks(jobs: list, world: int = 2) -> None:
    mp.spawn(rank_main, args=(world, free_port(), jobs), nprocs=world, join=True)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def netvlad_weights(path: Path) -> dict[str, torch.Tensor]:
    payload = load_payload(path)
    optimizer = payload["extra"]["training"]["optimizer"]["state"]
    flat = {f"model.{k}": v for k, v in payload["state_dict"].items()}
    flat.update({f"sgd.{i}.{k}": v for i, moments in optimizer.items() for k, v in moments.items()})
    return flat


@pytest.mark.slow
def test_cosplace_two_ranks_equal_one_process_and_resume_with_another_world_size(cosplace_city, tmp_path, monkeypatch):
    """Two epochs (both groups, augmentation on) of 2 steps of 4 images; then 1 epoch on 2 ranks resumed on 1."""
    config = lambda out, epochs=2: cosplace_config(cosplace_city, tmp_path / out, epochs=epochs, iterations_per_epoch=2)  # noqa: E731
    run_ranks([(train_cosplace, config("ddp"), False), (train_cosplace, config("half", epochs=1), False)])
    monkeypatch.setattr(_BatchNorm, "train", lambda self, mode=True: nn.Module.train(self, False))
    single = train_cosplace(config("single"))
    resumed = train_cosplace(config("half"), resume=True)
    reference = cosplace_weights(single.last)
    assert max_difference(cosplace_weights(tmp_path / "ddp" / "last.pt"), reference) <= COSPLACE_TOLERANCE
    assert max_difference(cosplace_weights(resumed.last), reference) <= COSPLACE_TOLERANCE
    ddp_log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in ddp_log] == pytest.approx([r["loss"] for r in single.records], rel=1e-4)
    assert [r["images"] for r in ddp_log] == [8, 8]
    assert {p.name for p in (tmp_path / "ddp").iterdir()} == {p.name for p in single.run_dir.iterdir()}


@pytest.mark.slow
def test_netvlad_two_ranks_equal_one_process(netvlad_city, tmp_path, monkeypatch):
    """SGD, 3 steps of 2 tuples, the cache refreshed every 3 queries: steps of 2, 1 (rank 1 idle, weight 0) and 2 tuples."""
    clusters = tmp_path / "clusters.h5"
    config = lambda out: netvlad_config(netvlad_city, tmp_path / out, clusters, iterations_per_epoch=3, cache_refresh=3,  # noqa: E731
                                        pca_dim=0, optimizer="sgd", lr=1e-2)
    monkeypatch.setattr(_BatchNorm, "train", lambda self, mode=True: nn.Module.train(self, False))
    single = train_netvlad(config("single"))
    run_ranks([(train_netvlad, config("ddp"), False)])
    assert max_difference(netvlad_weights(tmp_path / "ddp" / "last.pt"), netvlad_weights(single.last)) <= TOLERANCE
    ddp, one = (load_payload(path)["extra"]["training"] for path in (tmp_path / "ddp" / "last.pt", single.last))
    assert torch.equal(ddp["mining"]["memory"], one["mining"]["memory"])
    log = json.loads((tmp_path / "ddp" / "log.jsonl").read_text())
    assert (log["steps"], log["tuples"], log["images"]) == tuple(single.records[0][k] for k in ("steps", "tuples", "images"))
    assert log["loss"] == pytest.approx(single.records[0]["loss"], abs=1e-5)
    recalls = {key: value for key, value in single.records[0].items() if key.startswith("R@")}
    assert recalls and {key: log[key] for key in recalls} == recalls  # validation shared by the ranks


@pytest.mark.slow
def test_place_batch_two_ranks_mine_the_global_batch_as_one_process(tmp_path, monkeypatch):
    """Conv-AP place batches (4 places x 2 images, RandAugment on, SGD): each rank describes half of every batch, the
    descriptors are gathered before the miner, so 2 ranks train what 1 process trains, step for step."""
    photos = test_place_batch.write_photos(tmp_path / "photos")
    config = lambda out: test_place_batch.tiny(photos, tmp_path / out, optimizer="sgd", lr=1e-2, epochs=1)  # noqa: E731
    monkeypatch.setattr(_BatchNorm, "train", lambda self, mode=True: nn.Module.train(self, False))
    single = train_place_batch(config("single"))
    run_ranks([(train_place_batch, config("ddp"), False)])
    assert max_difference(load_payload(tmp_path / "ddp" / "last.pt")["state_dict"],
                          load_payload(single.last)["state_dict"]) <= TOLERANCE
    log = json.loads((tmp_path / "ddp" / "log.jsonl").read_text())
    assert log["loss"] == pytest.approx(single.records[0]["loss"], abs=1e-5)
    assert log["mined_share"] == single.records[0]["mined_share"] and log["steps"] == 3


@pytest.mark.slow
def test_torchrun_cli_trains_on_two_ranks_and_only_rank_0_prints(cosplace_city, tmp_path):
    vpr = shutil.which("vpr", path=str(Path(sys.executable).parent))
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    out = tmp_path / "run"
    args = [torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "--no-python", vpr, "train",
            "--method", "cosplace", "--dataset", str(cosplace_city), "--out", str(out), "--device", "cpu", "--epochs", "1",
            "--iterations-per-epoch", "2", "--batch-size", "4", "--layer", "3", "--dim", "32", "--resize", "48x64",
            "--min-images-per-class", "2", "--workers", "0", "--json"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)  # one JSON document: rank 1 printed nothing
    assert summary["epochs_run"] == 1 and Path(summary["last"]).is_file()
