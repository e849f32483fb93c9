"""Interruptions lose nothing: a SIGKILLed build-index leaves a loadable index and resumes to the same result."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import write_places
from vpr.retrieval.store import load_index

ARGS = ["--resize", "160x224", "--dim", "64", "--workers", "0", "--batch-size", "2", "--device", "cpu", "--json"]


def build(database, out, *, wait=True):
    command = [sys.executable, "-c", "from cli.app import main; main()", "build-index", str(database), "--out", str(out), *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if wait:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cached_count(cache):
    """Descriptors already saved in the build's cache directory (complete part files only)."""
    total = 0
    for part in cache.glob("*.h5"):
        try:
            with h5py.File(part, "r", locking=False) as f:
                total += f["keys"].shape[0]
        except OSError:  # merged and removed meanwhile
            continue
    return total


def descriptors(index_dir):
    with h5py.File(index_dir / "database.h5") as f:
        return f["paths"][:].astype(str), f["descriptors"][:]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL semantics tested on Linux")
def test_killed_build_leaves_the_old_index_and_resumes_to_the_same_index(tmp_path):
    write_places(tmp_path / "small", 4, seed=1)
    write_places(tmp_path / "big", 40, seed=2)
    out = tmp_path / "idx"
    assert build(tmp_path / "small" / "database", out).returncode == 0
    old_paths, _ = descriptors(out)

    rng = np.random.default_rng(0)
    for delay in rng.uniform(2.0, 7.0, size=3):
        process = build(tmp_path / "big" / "database", out, wait=False)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        bundle = load_index(out)  # never half-written: the old index or the complete new one
        assert bundle.manifest["count"] in (4, 40)
    process = build(tmp_path / "big" / "database", out, wait=False)  # one kill surely inside extraction
    while cached_count(tmp_path / "idx.cache") < 4 + 2 and process.poll() is None:  # 4 from the small build
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert load_index(out).manifest["count"] in (4, 40)

    result = build(tmp_path / "big" / "database", out)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["reused_from_cache"] > 0
    assert not list(tmp_path.glob("idx.tmp-*")) and not list(tmp_path.glob("idx.old-*"))
    reference = tmp_path / "reference"
    assert build(tmp_path / "big" / "database", reference).returncode == 0
    paths, resumed = descriptors(out)
    ref_paths, fresh = descriptors(reference)
    assert list(paths) == list(ref_paths) and len(paths) == 40 and list(old_paths) != list(paths)
    np.testing.assert_allclose(resumed, fresh, atol=1e-5)
