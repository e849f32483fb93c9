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


# ---------------------------------------------------------------- a full disk: one line, exit 1, the old output whole

def test_a_write_that_fills_the_disk_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from vpr.fileio import DiskFull, atomic_file

    target = tmp_path / "model.pt"
    target.write_text("the previous checkpoint")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100, 100, 0))
    with pytest.raises(DiskFull, match="model.pt: no space left on the device") as info:
        with atomic_file(target):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 14080 vs 13974")  # torch.save's words
    assert "\n" not in str(info.value) and target.read_text() == "the previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_an_hdf5_file_on_a_full_disk_fails_cleanly(tmp_path, monkeypatch):
    """HDF5's own writer leaves objects that crash the interpreter when a write fails; vpr's does not."""
    import errno

    from vpr.fileio import DiskFull, atomic_file, h5_file

    written = []

    class FullDisk:
        def __init__(self, real):
            self.real = real

        def write(self, data):
            if sum(written) > 2000:
                raise OSError(errno.ENOSPC, "No space left on device")
            written.append(len(data))
            return self.real.write(data)

        def __getattr__(self, name):
            return getattr(self.real, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.real.close()

    import vpr.fileio.files as fileio

    real_open = open
    def opener(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        return FullDisk(handle) if "+" in mode else handle

    monkeypatch.setattr(fileio, "open", opener, raising=False)
    with pytest.raises(DiskFull, match="cache.h5: no space left"):
        with atomic_file(tmp_path / "cache.h5") as tmp, h5_file(tmp) as f:
            f["descriptors"] = np.zeros((1000, 64), dtype=np.float32)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture()
def small_disk(tmp_path):
    """A real 120 MB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=120m", "tmpfs", str(mount)], capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not allowed here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(disk, leave_kb: int) -> None:
    (disk / "filler").unlink(missing_ok=True)
    free_kb = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize // 1024
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free_kb - leave_kb) * 1024)


def cli(*args):
    import sys

    return subprocess.run([sys.executable, "-c", "from cli.app import main; main()", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_full_disk_at_any_point_of_a_rebuild_is_one_line_and_the_old_index_stays(data, small_disk):
    import sys  # noqa: F401

    from vpr.retrieval.store import load_index

    small = ["--resize", "48x64", "--dim", "32", "--layer", "3", "--workers", "0", "--device", "cpu"]
    out = small_disk / "idx"
    assert cli("build-index", data / "database", "--out", out, *small).returncode == 0
    before = snapshot(out)
    for leave_kb in (4, 8, 24, 60, 2000):  # the cache part, its merge, model.pt, database.h5 ...
        fill(small_disk, leave_kb)
        result = cli("build-index", data / "database", "--out", out, *small[:2], "--dim", "16", *small[4:])
        assert result.returncode == 1, (leave_kb, result.stderr[-500:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert "Traceback" not in result.stderr and len(errors) == 1, (leave_kb, result.stderr[-800:])
        assert "no space left on the device" in errors[0] and "unexpected" not in errors[0], (leave_kb, errors)
        assert snapshot(out) == before and load_index(out).manifest["dim"] == 32


@pytest.mark.slow
def test_a_full_disk_while_training_is_one_line_and_last_pt_stays(small_disk):
    from test_cosplace import blob, noisy, write

    city = small_disk.parent / "city"
    rng = np.random.default_rng(0)
    for i in range(4):
        place = blob(rng)
        for k in range(3):
            write(city / "images/train/database", noisy(place, rng), 550000.0 + 100 * i + k, 4180000.0, 5.0 * k)
        write(city / "images/val/database", place, 550000.0 + 100 * i, 4180000.0, 10.0)
        write(city / "images/val/queries", noisy(place, rng), 550002.0 + 100 * i, 4180000.0, 12.0)
    run = small_disk / "run"
    args = ["train", "--method", "cosplace", "--dataset", city, "--out", run, "--resize", "48x64", "--dim", "32",
            "--layer", "3", "--iterations-per-epoch", "1", "--batch-size", "4", "--min-images-per-class", "2",
            "--groups-num", "1", "--workers", "0", "--device", "cpu"]
    assert cli(*args, "--epochs", "1").returncode == 0
    before = snapshot(run)
    for leave_kb in (8, 300):
        fill(small_disk, leave_kb)
        result = cli(*args, "--epochs", "2", "--resume")
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 1 and "Traceback" not in result.stderr and len(errors) == 1, (leave_kb, result.stderr[-800:])
        assert "no space left on the device" in errors[0], errors
        after = snapshot(run)
        assert after["last.pt"] == before["last.pt"] and after["best.pt"] == before["best.pt"]
