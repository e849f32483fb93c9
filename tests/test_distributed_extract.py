"""Sharded extraction under torchrun (2 CPU ranks, gloo) against the one-process commands: same index,
same recall, a failing rank stops the job with one clear line, and the cache is reused from any world size."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import run_cli
from vpr.data.datasets import load_image_set
from vpr.retrieval.store import load_index

pytestmark = pytest.mark.slow  # each torchrun job starts three Python processes (about 25 s on 2 cores)
BIN = Path(sys.executable).parent
TINY = ("--resize", "48x64", "--dim", "64", "--workers", "0", "--device", "cpu")


def torchrun(*args: object, timeout: float = 150) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 --no-python vpr ARGS`, the documented form."""
    command = [BIN / "torchrun", "--standalone", "--nproc-per-node", "2", "--no-python", BIN / "vpr", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VPR_DIST_TIMEOUT": "60"}
    return subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=timeout, env=env)


def test_two_ranks_build_the_one_process_index_and_a_one_rank_rerun_reuses_every_descriptor(
        places, tmp_path, monkeypatch, capsys):
    two, one = tmp_path / "two", tmp_path / "one"
    done = torchrun("build-index", places / "database", "--out", two, *TINY, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["indexed"] == 12  # rank 0 alone prints
    code, _, err = run_cli(monkeypatch, capsys, "build-index", places / "database", "--out", one, *TINY, "--no-cache")
    assert code == 0, err
    with h5py.File(two / "database.h5") as a, h5py.File(one / "database.h5") as b:
        assert list(a["paths"].asstr()[:]) == list(b["paths"].asstr()[:])
        np.testing.assert_allclose(a["descriptors"][:], b["descriptors"][:], atol=1e-5)
        probes = b["descriptors"][:]  # any descriptors in the index space will do: the database's own
    np.testing.assert_array_equal(load_index(two).search(probes, 5)[1], load_index(one).search(probes, 5)[1])

    code, out, err = run_cli(monkeypatch, capsys, "build-index", places / "database", "--out", two, *TINY, "--json")
    assert code == 0, err
    assert json.loads(out)["reused_from_cache"] == 12  # both ranks' parts, read by a world of one


def test_eval_under_torchrun_prints_the_one_process_recall(places, tmp_path, monkeypatch, capsys):
    index = tmp_path / "index"
    code, _, err = run_cli(monkeypatch, capsys, "build-index", places / "database", "--out", index, *TINY, "--no-cache")
    assert code == 0, err
    eval_args = ("eval", places / "queries", "--index", index, "--workers", "0", "--device", "cpu", "--json")
    code, out, err = run_cli(monkeypatch, capsys, *eval_args)
    assert code == 0, err
    done = torchrun(*eval_args)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["recall"] == json.loads(out)["recall"]


def test_a_failing_rank_stops_the_job_with_one_line_and_no_index(places, tmp_path):
    database = tmp_path / "database"
    shutil.copytree(places / "database", database)
    bad = load_image_set(database).paths[-1]  # the last block: rank 1's share
    bad.write_bytes(b"not an image")
    out = tmp_path / "index"
    start = time.monotonic()
    done = torchrun("build-index", database, "--out", out, *TINY)
    assert done.returncode != 0
    assert time.monotonic() - start < 120
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: rank 1 of 2: ") and bad.name in errors[0], done.stderr
    assert not out.exists() and not any(path.name.startswith("index.tmp") for path in tmp_path.iterdir())


FAILING_RANK = """
import os, signal, sys, time
import vpr.retrieval.extract as extract
from cli.app import main

real = extract._extract

def failing(model, paths, *args, **kwargs):  # rank 1 dies (as by the OOM killer) or hangs when its share starts
    if os.environ["RANK"] == "1":
        if os.environ["HOW"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(3600)
    return real(model, paths, *args, **kwargs)

extract._extract = failing
sys.argv = ["vpr", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize(("how", "message"), [("kill", "SIGKILL"), ("hang", "another rank of the 2 died or timed out")])
def test_a_killed_or_hung_rank_stops_the_job_without_a_hang_and_leaves_no_index(places, tmp_path, how, message):
    """A rank that dies without a word (SIGKILL) ends the job, torchrun naming it; one that hangs ends it
    after the collective timeout, rank 0 saying so. Nothing is written either way."""
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK)
    out = tmp_path / "index"
    command = [BIN / "torchrun", "--standalone", "--nproc-per-node", "2", "--no-python", sys.executable, script,
               "build-index", places / "database", "--out", out, *TINY]
    start = time.monotonic()
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=150,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "VPR_DIST_TIMEOUT": "15", "HOW": how})
    assert done.returncode != 0 and time.monotonic() - start < 120
    assert message in done.stderr, done.stderr[-2000:]
    assert not out.exists() and not any(path.name.startswith("index.tmp") for path in tmp_path.iterdir())
