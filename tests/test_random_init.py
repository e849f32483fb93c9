"""A model nobody trained says so: indexing, querying, evaluating or serving with random weights warns in one
line (and `--json` says `random_init`), while trained, published, ImageNet and weightless models do not."""

import json

import pytest
import torch
from fastapi.testclient import TestClient

from conftest import run_cli
from helpers_published import RefCosPlaceNet, random_net
from vpr import api
from vpr.serve import ServeConfig, create_app

TINY = ["--resize", "48x64", "--dim", "64", "--no-cache", "--device", "cpu", "--workers", "0"]
WARNING = "has random weights (no --checkpoint or --pretrained)"


def test_which_models_are_random(tmp_path):
    fresh, _ = api.new_model("resnet18", descriptor_dim=64)
    assert fresh.random_init and not api.new_model("pixels", head="patchnorm")[0].random_init  # no weights to train
    api.save_model(fresh, tmp_path / "fresh.pt")
    assert api.load_model(tmp_path / "fresh.pt")[0].random_init  # the mark travels with the checkpoint
    torch.save(random_net(RefCosPlaceNet, "resnet18", 64, seed=1).state_dict(), tmp_path / "resnet18_64_cosplace.pth")
    assert not api.load_model(tmp_path / "resnet18_64_cosplace.pth")[0].random_init  # published weights


def test_every_command_on_a_random_model_warns_in_one_line(places, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "build-index", places / "database", "--out", tmp_path / "idx", "--json", *TINY)
    assert code == 0 and json.loads(out)["random_init"] is True
    assert [line for line in err.splitlines() if WARNING in line] == [line for line in err.splitlines() if line.strip()]
    query = sorted((places / "queries").iterdir())[0]
    code, out, err = run_cli(monkeypatch, capsys, "query", query, "--index", tmp_path / "idx", "--json", "--device", "cpu")
    assert code == 0 and WARNING in err and isinstance(json.loads(out), list)  # the results keep their shape
    code, out, err = run_cli(monkeypatch, capsys, "eval", places / "queries", "--index", tmp_path / "idx", "--json",
                             "--device", "cpu", "--workers", 0)
    assert code == 0 and json.loads(out)["random_init"] is True and WARNING in err
    config = ServeConfig(index=tmp_path / "idx", device="cpu", allowed_hosts=("testserver",))
    with TestClient(create_app(config, api.Index.load(tmp_path / "idx", device="cpu"))) as client:
        assert client.get("/info").json()["random_init"] is True


def test_a_published_checkpoint_indexes_without_the_warning(places, tmp_path, monkeypatch, capsys):
    torch.save(random_net(RefCosPlaceNet, "resnet18", 64, seed=1).state_dict(), tmp_path / "resnet18_64_cosplace.pth")
    code, out, err = run_cli(monkeypatch, capsys, "build-index", places / "database", "--out", tmp_path / "idx", "--json",
                             "--checkpoint", tmp_path / "resnet18_64_cosplace.pth", "--resize", "48x64", "--no-cache",
                             "--device", "cpu", "--workers", "0")
    assert code == 0 and json.loads(out)["random_init"] is False and WARNING not in err
    assert api.check_index(tmp_path / "idx")["random_init"] is False


@pytest.mark.parametrize("value", ["yes", 1])
def test_a_malformed_random_init_field_is_refused(places_index, tmp_path, value):
    import shutil

    copy = tmp_path / "idx"
    shutil.copytree(places_index, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["random_init"] = value
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="field 'random_init' missing or malformed"):
        api.check_index(copy)
