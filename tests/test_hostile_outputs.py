"""Outputs under attack: a rebuild deletes only its own temporaries, never a user's backup, folder or file
named like one, and a planted lock link is refused."""

from __future__ import annotations

import os
import shlex
import subprocess

import h5py
import numpy as np
import pytest

from conftest import run_cli, write_places
from test_output_safety import TINY, snapshot, user_folder
from vpr.retrieval.store import is_vpr_index


@pytest.fixture()
def data(tmp_path):
    write_places(tmp_path / "city", 3, seed=5)
    return tmp_path / "city"


def build(monkeypatch, capsys, db, out, *extra):
    return run_cli(monkeypatch, capsys, "build-index", db, "--out", out, *TINY, *extra)


@pytest.mark.parametrize("name", ["city-idx.old-2023", "city-idx.tmp-test", "city-idx.old-abcd1234", "city-idx.tmp-abcd1234"])
def test_a_rebuild_keeps_the_users_own_indexes_named_like_leftovers(monkeypatch, capsys, data, tmp_path, name):
    """A complete index (and its cache) whose name looks like a temporary of another index is the user's backup."""
    backup = tmp_path / name
    assert build(monkeypatch, capsys, data / "database", backup)[0] == 0
    assert build(monkeypatch, capsys, data / "database", tmp_path / "city-idx")[0] == 0
    before = snapshot(tmp_path)
    code, _, err = build(monkeypatch, capsys, data / "database", tmp_path / "city-idx")  # the rebuild
    assert code == 0, err
    assert is_vpr_index(backup) and (tmp_path / f"{name}.cache" / "main.h5").is_file()
    after = snapshot(tmp_path)
    assert {k: after.get(k) for k in before if k.startswith(name)} == {k: v for k, v in before.items() if k.startswith(name)}


def test_a_user_folder_at_the_cache_path_holding_main_h5_is_refused_never_emptied(monkeypatch, capsys, data, tmp_path):
    mine = tmp_path / "idx.cache"
    mine.mkdir()
    with h5py.File(mine / "main.h5", "w") as f:  # the user's own HDF5 file, named like a cache file of old vpr versions
        f["measurements"] = np.arange(10)
    before = snapshot(tmp_path)
    code, _, err = build(monkeypatch, capsys, data / "database", tmp_path / "idx")
    assert code == 1 and "not a vpr descriptor cache" in err and "--no-cache" in err and len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before and not (tmp_path / "idx").exists()


@pytest.mark.parametrize("name", ["skipped.txt", "pca.h5", "index.faiss", "local_features.h5"])
def test_a_real_folder_named_like_an_index_file_is_the_users_and_stops_the_rebuild(monkeypatch, capsys, data, tmp_path, name):
    out = tmp_path / "idx"
    assert build(monkeypatch, capsys, data / "database", out, "--no-cache")[0] == 0
    user_folder(out / name)
    before = snapshot(out)
    code, _, err = build(monkeypatch, capsys, data / "database", out, "--no-cache")
    assert code == 1 and "files vpr did not write" in err and name in err
    assert snapshot(out) == before


def test_a_link_named_like_an_index_file_is_not_vpr_s_either(monkeypatch, capsys, data, tmp_path):
    out = tmp_path / "idx"
    assert build(monkeypatch, capsys, data / "database", out, "--no-cache")[0] == 0
    (tmp_path / "precious.txt").write_text("mine")
    os.symlink(tmp_path / "precious.txt", out / "skipped.txt")
    code, _, err = build(monkeypatch, capsys, data / "database", out, "--no-cache")
    assert code == 1 and "skipped.txt" in err and (tmp_path / "precious.txt").read_text() == "mine"


def test_a_dangling_lock_link_is_refused_and_creates_nothing_at_its_target(monkeypatch, capsys, data, tmp_path):
    target = tmp_path / "elsewhere" / "planted"
    target.parent.mkdir()
    os.symlink(target, tmp_path / ".idx.lock")
    code, _, err = build(monkeypatch, capsys, data / "database", tmp_path / "idx")
    assert code == 1 and ".idx.lock" in err and "symbolic link" in err and len(err.strip().splitlines()) == 1
    assert not target.exists() and not (tmp_path / "idx").exists()


def test_the_pasted_fix_for_a_pickled_checkpoint_runs_no_shell_code(monkeypatch, capsys, data, tmp_path):
    """The 'keep only its weights' command in the error takes the file name as data: pasted into a shell it
    runs no code hidden in the name, and it writes the weights file the message promises."""
    import argparse
    import sys

    import torch

    name = tmp_path / "$(touch PWNED).ckpt"
    state = {"backbone.0.weight": torch.ones(1)}
    torch.save({"state_dict": state, "hyper_parameters": argparse.Namespace(lr=0.1)}, name)  # as Lightning pickles them
    code, _, err = build(monkeypatch, capsys, data / "database", tmp_path / "idx", "--checkpoint", name)
    assert code == 1 and "keep only its weights" in err and len(err.strip().splitlines()) == 1
    command = err.strip().split("then give the file it writes: ", 1)[1]
    args = shlex.split(command)
    assert args[0] == "python"
    shell = subprocess.run(["bash", "-c", shlex.join([sys.executable, *args[1:]])], cwd=tmp_path, capture_output=True, text=True)
    assert shell.returncode == 0, shell.stderr
    assert not (tmp_path / "PWNED").exists()
    saved = torch.load(name.with_suffix(".pth"), weights_only=True)
    assert torch.equal(saved["backbone.0.weight"], state["backbone.0.weight"])
