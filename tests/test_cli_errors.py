"""The CLI under hostile input (issue 11): literal user text, ASCII terminals, Ctrl-C, out-of-range option
values, directories given as output files, moved database images and an unwritable torch hub cache."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli.app import main
from cli.common import print_json
from conftest import run_cli, write_places
from vpr.fileio import MARKER

VPR = Path(sys.executable).with_name("vpr")
TINY = ["--resize", "48x64", "--dim", "64", "--no-cache", "--workers", "0", "--device", "cpu"]


def _main(*args) -> tuple[int, str]:
    """Run `vpr ARGS` in-process outside a test (module fixtures); return (exit code, stdout)."""
    out, mp = io.StringIO(), pytest.MonkeyPatch()
    mp.setattr(sys, "argv", ["vpr", *map(str, args)])
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
            main()
    finally:
        mp.undo()
    return info.value.code, out.getvalue()


@pytest.fixture(scope="module")
def bracket_index(places, tmp_path_factory):
    """An index of unlabelled database images named `[red]N.jpg`, written to `a[/[red]idx`; and build's stdout."""
    root = tmp_path_factory.mktemp("brackets")
    db = root / "db["
    db.mkdir()
    for i, path in enumerate(sorted((places / "database").iterdir())[:6]):
        shutil.copy(path, db / f"[red]{i}.jpg")
    out = root / "a[" / "[red]idx"
    code, stdout = _main("build-index", db, "--out", out, *TINY)
    assert code == 0
    return out, stdout


# 1. User text is printed literally, never read as rich markup.

def test_bracketed_paths_and_names_are_printed_literally(monkeypatch, capsys, bracket_index, places, tmp_path):
    out, build_stdout = bracket_index
    assert str(out) in build_stdout  # `a[/[red]idx`: was a MarkupError after the index was written
    query = tmp_path / "a[" / "[red]b.png"
    query.parent.mkdir()
    Image.open(sorted((places / "queries").iterdir())[0]).save(query)
    code, stdout, err = run_cli(monkeypatch, capsys, "query", query, "--index", out, "-k", "3", "--device", "cpu")
    assert code == 0, err
    assert str(query) in stdout  # the table title, whole on one line
    assert "[red]" in stdout and sum(f"[red]{i}.jpg" in stdout for i in range(6)) == 3  # the file cells


def test_groups_prints_a_bracketed_source_literally(monkeypatch, capsys, places, tmp_path):
    source = tmp_path / "[bold]city[" / "database"
    shutil.copytree(places / "database", source)
    code, stdout, err = run_cli(monkeypatch, capsys, "groups", source, "--min-images-per-class", "1")
    assert code == 0, err
    assert f"{source}: " in stdout


# 2. An ASCII-only stdout degrades instead of crashing.

@pytest.mark.slow
def test_query_output_degrades_on_an_ascii_terminal(bracket_index, places, tmp_path):
    out, _ = bracket_index
    query = tmp_path / "café.jpg"
    shutil.copy(sorted((places / "queries").iterdir())[1], query)
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(VPR), "query", str(query), "--index", str(out), "-k", "2", "--device", "cpu"],
                            env=env, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode("ascii", "replace")
    assert max(result.stdout) < 128  # ASCII box, escaped name
    assert b"caf\\xe9.jpg" in result.stdout and b"|" in result.stdout


# 3. Ctrl-C prints one line and exits 130.

def test_ctrl_c_in_a_command_prints_interrupted_and_exits_130(monkeypatch, capsys, places, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("vpr.api.build_index", interrupted)
    code, _, err = run_cli(monkeypatch, capsys, "build-index", places / "database", "--out", tmp_path / "idx", *TINY)
    assert code == 130 and err == "interrupted\n"


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals")
def test_sigint_during_build_index_exits_130_with_one_line(tmp_path):
    write_places(tmp_path, 200, seed=3)  # many seconds of work at batch 1: the signal lands mid-extraction
    out = tmp_path / "idx"
    command = [str(VPR), "build-index", str(tmp_path / "database"), "--out", str(out), "--resize", "240x320",
               "--dim", "64", "--workers", "0", "--batch-size", "1", "--device", "cpu"]
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,  # Ctrl-C's default action, even when pytest
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # runs as a background job
    cache = tmp_path / "idx.cache"
    deadline = time.monotonic() + 240
    while not (cache / MARKER).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # polling for the descriptor cache it opens just before extracting: the command runs
    assert process.poll() is None, "build-index ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, (stdout, stderr)
    assert stderr == "interrupted\n" and stdout == ""
    assert not out.exists()


# 4. Out-of-range option values are usage errors naming the option.

TRAIN = ["train", "--method", "cosplace", "--dataset", "/nonexistent/ds", "--out", "/nonexistent/run"]
BUILD = ["build-index", "/nonexistent/db"]
QUERY = ["query", "/nonexistent/q.jpg", "--index", "/nonexistent/idx"]
EVAL = ["eval", "/nonexistent/q", "--index", "/nonexistent/idx"]
GROUPS = ["groups", "/nonexistent/ds"]
HUGE = "100000000000"
BAD_VALUES = [
    (BUILD, "--dim", "0"), (BUILD, "--dim", "-5"), (BUILD, "--dim", HUGE), (BUILD, "--clusters", "0"),
    (BUILD, "--layer", "5"), (BUILD, "--pca-dim", "0"), (BUILD, "--batch-size", "0"), (BUILD, "--workers", "-1"),
    (QUERY, "-k", HUGE), (QUERY, "--nprobe", HUGE), (QUERY, "--nprobe", "0"), (QUERY, "--ef-search", HUGE),
    (EVAL, "--threshold", "nan"), (EVAL, "--threshold", "inf"), (EVAL, "--threshold", "0"), (EVAL, "--workers", "-1"),
    (EVAL, "--nprobe", HUGE), (EVAL, "--ef-search", HUGE),
    (TRAIN, "--epochs", "0"), (TRAIN, "--iterations-per-epoch", "0"), (TRAIN, "--batch-size", "0"),
    (TRAIN, "--lr", "nan"), (TRAIN, "--lr", "0"), (TRAIN, "--seed", "-1"), (TRAIN, "--layer", "2"), (TRAIN, "--dim", "0"),
    (TRAIN, "--workers", "-1"), (TRAIN, "--classifier-lr", "-1"), (TRAIN, "--groups-num", "0"), (TRAIN, "--M", "nan"),
    (TRAIN, "--alpha", "0"), (TRAIN, "--alpha", "400"), (TRAIN, "--N", "0"), (TRAIN, "--L", "0"),
    (TRAIN, "--min-images-per-class", "0"), (TRAIN, "--scale", "0"), (TRAIN, "--margin", "1"),
    (TRAIN, "--brightness", "-0.1"), (TRAIN, "--contrast", "nan"), (TRAIN, "--saturation", "-1"), (TRAIN, "--hue", "0.6"),
    (TRAIN, "--crop-scale", "0"), (TRAIN, "--clusters", "1"), (TRAIN, "--triplet-margin", "0"), (TRAIN, "--negatives", "0"),
    (TRAIN, "--neg-samples", "0"), (TRAIN, "--cache-refresh", "0"), (TRAIN, "--mining-subset", "0"),
    (TRAIN, "--pos-radius", "-1"), (TRAIN, "--neg-radius", "inf"), (TRAIN, "--weight-decay", "-1"), (TRAIN, "--lr-step", "0"),
    (TRAIN, "--lr-gamma", "0"), (TRAIN, "--init-images", "0"), (TRAIN, "--init-per-image", "0"), (TRAIN, "--pca-dim", "-1"),
    (GROUPS, "--M", "0"), (GROUPS, "--alpha", "nan"), (GROUPS, "--N", "0"), (GROUPS, "--L", "0"),
    (GROUPS, "--min-images-per-class", "0"), (GROUPS, "--map-size", "0"),
    (["synth", "/nonexistent/city"], "--seed", "-1"),
    (["bench"], "--images", "0"), (["bench"], "--batch-size", "0"), (["bench"], "--workers", "-1"), (["bench"], "--threads", "0"),
]


@pytest.mark.parametrize("args,option,value", BAD_VALUES, ids=[f"{a[0]} {o} {v}" for a, o, v in BAD_VALUES])
def test_out_of_range_option_values_are_usage_errors(monkeypatch, capsys, args, option, value):
    code, stdout, err = run_cli(monkeypatch, capsys, *args, option, value)
    assert code == 2 and f"'{option}'" in err and stdout == ""
    assert "unexpected" not in err and "Traceback" not in err


def test_json_output_is_strict_json(capsys):
    print_json({"recall": {"R@1": float("nan")}, "rates": (float("inf"), -float("inf"), 1.5), "n": 3})
    text = capsys.readouterr().out

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    assert json.loads(text, parse_constant=refuse) == {"recall": {"R@1": None}, "rates": [None, None, 1.5], "n": 3}


# 5. An existing directory (or a path under a file) is not an output PNG.

def test_viz_and_map_naming_a_directory_are_refused_before_any_work(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "query", "/nonexistent/q.jpg", "--index", "/nonexistent/idx", "--viz", tmp_path)
    assert code == 2 and err == f"error: --viz {tmp_path}: is a directory; give a .png file path\n"
    code, _, err = run_cli(monkeypatch, capsys, "groups", "/nonexistent/ds", "--map", tmp_path)
    assert code == 2 and err == f"error: --map {tmp_path}: is a directory; give a .png file path\n"
    (tmp_path / "file.txt").write_text("x")
    code, _, err = run_cli(monkeypatch, capsys, "groups", "/nonexistent/ds", "--map", tmp_path / "file.txt" / "m.png")
    assert code == 2 and "file.txt is not a directory" in err and len(err.splitlines()) == 1


# 6. A moved database image becomes a grey `missing` tile; the results are still printed.

def test_viz_draws_missing_database_images_as_placeholders(monkeypatch, capsys, places, tmp_path):
    db = tmp_path / "db"
    db.mkdir()
    for path in sorted((places / "database").iterdir())[:3]:
        shutil.copy(path, db / path.name)
    out = tmp_path / "idx"
    code, _, err = run_cli(monkeypatch, capsys, "build-index", db, "--out", out, *TINY)
    assert code == 0, err
    gone = sorted(db.iterdir())[0]
    gone.unlink()
    query = sorted((places / "queries").iterdir())[0]
    viz = tmp_path / "v.png"
    code, stdout, err = run_cli(monkeypatch, capsys, "query", query, "--index", out, "-k", "3", "--viz", viz, "--json", "--device", "cpu")
    assert code == 0, err
    assert str(gone) in [match["path"] for match in json.loads(stdout)[0]["matches"]]  # the results are still printed
    assert f"note: 1 database image unreadable, drawn as grey 'missing' tiles in {viz}; first: {gone}" in err
    sheet = np.asarray(Image.open(viz).convert("RGB"))
    assert sheet.shape[1] > 4 * 64
    assert (sheet == (150, 150, 150)).all(axis=2).sum() > 1000  # the placeholder's grey


# 7. An unwritable torch hub cache is not reported as being offline.

@pytest.mark.parametrize("failure,expected,not_expected", [
    ("permission", "is not writable", "offline"),
    ("network", "probably offline", "not writable"),
])
def test_imagenet_download_failures_name_their_cause(monkeypatch, capsys, places, tmp_path, failure, expected, not_expected):
    import urllib.error

    import torch

    def download(url, *args, **kwargs):
        if failure == "permission":
            raise PermissionError(13, "Permission denied", str(tmp_path / "hub" / "hub" / "checkpoints"))
        raise urllib.error.URLError(OSError(101, "Network is unreachable"))

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", download)
    code, _, err = run_cli(monkeypatch, capsys, "build-index", places / "database", "--out", tmp_path / "idx",
                           "--pretrained", "IMAGENET1K_V1", *TINY)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert expected in err and not_expected not in err
    if failure == "permission":
        assert "TORCH_HOME=" in err and "--pretrained FILE" in err and str(tmp_path / "hub") in err
