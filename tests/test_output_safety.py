"""Your files are safe: vpr replaces or deletes only what it can prove it wrote, and one writer owns an output."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_cli, write_places
from vpr.data.datasets import load_image_set
from vpr.data.geo import format_at_name
from vpr.errors import CheckpointError, IndexFormatError, OutputError, VPRError
from vpr.fileio import is_vpr_png, save_png, write_marker
from vpr.models.checkpoints import save_checkpoint
from vpr.models.model import build_model
from vpr.retrieval import store as store_module
from vpr.retrieval.options import ExtractOptions
from vpr.retrieval.build import build_index, cache_dir_for
from vpr.retrieval.store import is_vpr_index, load_index

TINY = ["--resize", "48x64", "--dim", "64", "--workers", "0", "--device", "cpu"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (links not followed) with the hash of its content."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def user_folder(path: Path) -> Path:
    """A folder of the user's own files, with a sub-folder."""
    (path / "notes").mkdir(parents=True)
    (path / "thesis.txt").write_text("three years of work")
    (path / "notes" / "todo.md").write_text("- back up")
    return path


@pytest.fixture()
def data(tmp_path):
    write_places(tmp_path / "city", 3, seed=5)
    return tmp_path / "city"


def build(monkeypatch, capsys, db, out, *extra):
    return run_cli(monkeypatch, capsys, "build-index", db, "--out", out, *TINY, *extra)


def test_an_existing_folder_of_user_files_is_refused_and_kept(monkeypatch, capsys, data, tmp_path):
    mine = user_folder(tmp_path / "mine")
    before = snapshot(tmp_path)
    code, _, err = build(monkeypatch, capsys, data / "database", mine)
    assert code == 1 and "files vpr did not write" in err and str(mine) in err and len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["database", "parent", "inside"])
def test_out_may_not_be_contain_or_lie_inside_the_database(monkeypatch, capsys, data, where):
    out = {"database": data / "database", "parent": data, "inside": data / "database" / "idx"}[where]
    before = snapshot(data)
    code, _, err = build(monkeypatch, capsys, data / "database", out)
    assert code == 1 and "input" in err and "choose a path outside it" in err
    assert snapshot(data) == before and not (data / "database" / "idx").exists()


def test_a_manifest_database_is_protected_too(monkeypatch, capsys, data):
    manifest = data / "db.csv"
    rows = [f"database/{p.name},{p.name.split('@')[1]},{p.name.split('@')[2]}" for p in sorted((data / "database").iterdir())]
    manifest.write_text("path,utm_east,utm_north\n" + "\n".join(rows) + "\n")
    before = snapshot(data)
    code, _, err = build(monkeypatch, capsys, manifest, data)  # the folder holding the manifest and its images
    assert code == 1 and "contains the input" in err
    assert snapshot(data) == before


def test_a_training_run_folder_is_not_an_index(monkeypatch, capsys, data, tmp_path):
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    for name in ("last.pt", "best.pt", "log.jsonl", "config.json"):
        (run / name).write_text(name)
    before = snapshot(tmp_path / "runs")
    code, _, err = build(monkeypatch, capsys, data / "database", run)
    assert code == 1 and "files vpr did not write" in err
    assert snapshot(tmp_path / "runs") == before


def test_a_file_at_out_or_at_its_cache_path_is_refused(monkeypatch, capsys, data, tmp_path):
    (tmp_path / "report.txt").write_text("mine")
    code, _, err = build(monkeypatch, capsys, data / "database", tmp_path / "report.txt")
    assert code == 1 and "names an existing file" in err and (tmp_path / "report.txt").read_text() == "mine"
    (tmp_path / "idx.cache").write_text("also mine")
    code, _, err = build(monkeypatch, capsys, data / "database", tmp_path / "idx")
    assert code == 1 and "not a vpr descriptor cache" in err and "--no-cache" in err
    assert (tmp_path / "idx.cache").read_text() == "also mine" and not (tmp_path / "idx").exists()
    code, _, _ = build(monkeypatch, capsys, data / "database", tmp_path / "idx", "--no-cache")
    assert code == 0 and is_vpr_index(tmp_path / "idx") and (tmp_path / "idx.cache").read_text() == "also mine"


def test_leftover_cleanup_touches_only_marked_temporaries(monkeypatch, capsys, data, tmp_path):
    out = tmp_path / "t" / "[ab]"
    user_folder(tmp_path / "t" / "a")  # what the glob '[ab]' would have matched
    user_folder(tmp_path / "t" / "[ab].tmp-mine")  # the user's own folder with a temporary-looking name
    user_folder(tmp_path / "t" / "[ab].old-2024")
    stale = tmp_path / "t" / "[ab].tmp-k1lled_x"  # what a killed vpr run leaves: mkdtemp's name, marked as its temporary
    stale.mkdir()
    write_marker(stale, "tmp", "[ab]")
    other = tmp_path / "t" / "[ab].tmp-0ther_ab"  # the same shape, but a temporary of another output
    other.mkdir()
    write_marker(other, "tmp", "[ab]x")
    before = snapshot(tmp_path / "t")
    code, out_text, err = build(monkeypatch, capsys, data / "database", out)
    assert code == 0, err
    assert str(out) in out_text  # a bracketed path prints literally
    assert not stale.exists() and other.exists()
    after = snapshot(tmp_path / "t")
    kept = {k: v for k, v in before.items() if not k.startswith("[ab].tmp-k1lled_x")}
    assert {k: after.get(k) for k in kept} == kept


def test_out_dot_is_refused_and_dot_tmp_folders_survive(monkeypatch, capsys, data, tmp_path):
    user_folder(tmp_path / "work" / ".tmp-cache")
    monkeypatch.chdir(tmp_path / "work")
    before = snapshot(tmp_path / "work")
    code, _, err = build(monkeypatch, capsys, data / "database", ".")
    assert code == 1 and "current folder" in err
    assert snapshot(tmp_path / "work") == before


def test_an_index_is_replaced_only_whole_and_only_when_nothing_else_is_inside(monkeypatch, capsys, data, tmp_path):
    out = tmp_path / "idx"
    assert build(monkeypatch, capsys, data / "database", out, "--no-cache")[0] == 0
    (out / "my-notes.txt").write_text("mine")  # the user put a file into the index folder
    code, _, err = build(monkeypatch, capsys, data / "database", out, "--no-cache")
    assert code == 1 and "my-notes.txt" in err and (out / "my-notes.txt").read_text() == "mine"
    (out / "my-notes.txt").unlink()
    assert build(monkeypatch, capsys, data / "database", out, "--no-cache")[0] == 0


def test_new_folders_and_files_follow_the_umask(data, tmp_path, tiny_config):
    old = os.umask(0o022)
    try:
        out = tmp_path / "idx"
        build_index(load_image_set(data / "database"), out, model=build_model(tiny_config, seed=0), options=ExtractOptions(num_workers=0))
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "model.pt").stat().st_mode & 0o777 == 0o644
    assert (out / "database.h5").stat().st_mode & 0o777 == 0o644


def test_an_unwritable_output_folder_is_one_line_and_leaves_nothing(monkeypatch, capsys, data, tmp_path):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkdtemp", refuse)  # as root, chmod would not stop the write
    code, _, err = build(monkeypatch, capsys, data / "database", tmp_path / "idx", "--no-cache")
    assert code == 1 and err.startswith("error: ") and "permission denied" in err and "writable" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "idx").exists()


def test_a_failed_rebuild_keeps_the_old_index_and_leaves_no_temporary(data, tmp_path, tiny_config, monkeypatch):
    out = tmp_path / "idx"
    images = load_image_set(data / "database")
    build_index(images, out, model=build_model(tiny_config, seed=0), options=ExtractOptions(num_workers=0))
    before = snapshot(out)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module, "file_sha256", disk_full)
    with pytest.raises(OutputError, match="no space left"):
        build_index(images, out, model=build_model(tiny_config, seed=1), options=ExtractOptions(num_workers=0))
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("idx.")] == []


def test_a_stale_skipped_list_does_not_outlive_a_clean_rebuild(monkeypatch, capsys, data, tmp_path):
    bad = data / "database" / format_at_name(550000.0, 4180300.0, 10, "S")
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "idx"
    code, text, _ = build(monkeypatch, capsys, data / "database", out, "--skip-bad", "--no-cache")
    assert code == 0 and bad.name in (out / "skipped.txt").read_text() and "skipped.txt" in text
    bad.unlink()
    assert build(monkeypatch, capsys, data / "database", out, "--no-cache")[0] == 0
    assert not (out / "skipped.txt").exists()


def test_non_finite_weights_or_descriptors_are_refused(monkeypatch, capsys, data, tmp_path, tiny_config):
    model = build_model(tiny_config, seed=0)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    save_checkpoint(model, tmp_path / "nan.pt")
    code, _, err = build(monkeypatch, capsys, data / "database", tmp_path / "idx", "--checkpoint", tmp_path / "nan.pt")
    assert code == 1 and "NaN or infinite" in err and "nan.pt" in err and not (tmp_path / "idx").exists()

    out = tmp_path / "good"
    build_index(load_image_set(data / "database"), out, model=build_model(tiny_config, seed=0), options=ExtractOptions(num_workers=0))
    with h5py.File(out / "database.h5", "r+") as f:
        f["descriptors"][1, 3] = np.inf
    with pytest.raises(IndexFormatError, match="NaN or infinite"):
        load_index(out)


def test_run_folders_are_refused_unless_resumable(monkeypatch, capsys, data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "config.json", "log.jsonl"):  # a run whose last.pt is gone
        (run / name).write_text("{}" if name == "config.json" else name)
    before = snapshot(run)
    args = ["train", "--method", "cosplace", "--dataset", data, "--out", run, "--epochs", "1", "--device", "cpu"]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and "a run already exists here" in err
    code, _, err = run_cli(monkeypatch, capsys, *args, "--resume")
    assert code == 2 and "nothing to resume" in err
    assert snapshot(run) == before
    mine = user_folder(tmp_path / "mine")
    before = snapshot(mine)
    code, _, err = run_cli(monkeypatch, capsys, *args[:-4], "--out", mine, "--epochs", "1", "--device", "cpu")
    assert code == 1 and "files vpr did not write" in err and snapshot(mine) == before
    code, _, err = run_cli(monkeypatch, capsys, *args[:-4], "--out", data / "runs", "--epochs", "1", "--device", "cpu")
    assert code == 1 and "lies inside the input" in err and not (data / "runs").exists()


def test_resume_with_a_corrupt_config_is_one_line(tmp_path):
    from vpr.training.run import RunDir

    run = RunDir(tmp_path / "run")
    run.prepare({"a": 1}, resume=False, inputs=[])
    (run.root / "last.pt").write_bytes(b"x")
    run.config.write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        run.prepare({"a": 1}, resume=True, inputs=[])
    run.config.unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        run.prepare({"a": 1}, resume=True, inputs=[])


def test_pngs_are_replaced_only_when_vpr_wrote_them(tmp_path):
    from PIL import Image

    image = Image.new("RGB", (8, 8), (10, 20, 30))
    save_png(image, tmp_path / "map.png", "--map")
    assert is_vpr_png(tmp_path / "map.png")
    save_png(image, tmp_path / "map.png", "--map")  # ours: replaced
    image.save(tmp_path / "holiday.png")
    with pytest.raises(OutputError, match="not a PNG written by vpr"):
        save_png(image, tmp_path / "holiday.png", "--map")
    with pytest.raises(OutputError, match="existing folder"):
        save_png(image, tmp_path, "--map")


@pytest.mark.slow
def test_two_builds_at_once_share_the_cache_without_mixing_descriptors(tmp_path):
    write_places(tmp_path / "city", 16, seed=7)
    images = sorted((tmp_path / "city" / "database").iterdir())
    manifests = []
    for name, order in (("forward", images), ("backward", images[::-1])):
        rows = [f"{p},{p.name.split('@')[1]},{p.name.split('@')[2]}" for p in order]
        manifests.append(tmp_path / f"{name}.csv")
        manifests[-1].write_text("path,utm_east,utm_north\n" + "\n".join(rows) + "\n")
    args = ["--resize", "96x128", "--dim", "64", "--workers", "0", "--batch-size", "2", "--device", "cpu", "--json"]

    def command(manifest, out, *extra):
        return [sys.executable, "-c", "from cli.app import main; main()", "build-index", str(manifest), "--out", str(out), *args, *extra]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen(command(m, tmp_path / "idx"), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for m in manifests]
    results = [(p.returncode, *p.communicate(timeout=300)) for p in runs]
    results = [(p.returncode, out, err) for p, (_, out, err) in zip(runs, results)]
    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    cached = subprocess.run(command(manifests[0], tmp_path / "again"), env=env, capture_output=True, text=True, timeout=300)
    fresh = subprocess.run(command(manifests[0], tmp_path / "fresh", "--no-cache"), env=env, capture_output=True, text=True, timeout=300)
    assert json.loads(cached.stdout)["reused_from_cache"] == 0 and fresh.returncode == 0  # another --out: another cache
    rerun = subprocess.run(command(manifests[1], tmp_path / "idx"), env=env, capture_output=True, text=True, timeout=300)
    assert json.loads(rerun.stdout)["reused_from_cache"] == 16
    reference = by_path(tmp_path / "fresh")
    for out in ("idx", "again"):
        found = by_path(tmp_path / out)
        assert sorted(found) == sorted(reference)
        for path, descriptor in found.items():  # every cached descriptor belongs to its own image
            np.testing.assert_allclose(descriptor, reference[path], atol=1e-5)


def by_path(index_dir: Path) -> dict[str, np.ndarray]:
    with h5py.File(index_dir / "database.h5") as f:
        return dict(zip(f["paths"].asstr()[:], f["descriptors"][:]))


OUT_CHOICES = ["mine", "mine/notes", "city", "city/database", "city/database/x", "new", "new/deeper", "file.txt",
               "[ab]", "mine.tmp-x", "idx", "idx/model.pt", ".", "link"]


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(choice=st.sampled_from(OUT_CHOICES), cache=st.booleans(), twice=st.booleans())
def test_any_output_path_either_builds_an_index_or_refuses_without_touching_user_files(
    tmp_path_factory, tiny_config, choice, cache, twice,
):
    root = tmp_path_factory.mktemp("fuzz")
    write_places(root / "city", 2, seed=3)
    user_folder(root / "mine")
    user_folder(root / "mine.tmp-x")
    (root / "file.txt").write_text("mine")
    (root / "link").symlink_to(root / "mine")
    images = load_image_set(root / "city" / "database")
    model = build_model(tiny_config, seed=0)
    build_index(images, root / "idx", model=model, options=ExtractOptions(num_workers=0))
    protected = {k: v for k, v in snapshot(root).items() if not k.startswith("idx")}
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for _ in range(1 + twice):
            out = Path(choice)
            try:
                build_index(images, out, model=model, options=ExtractOptions(num_workers=0), cache=cache_dir_for(out) if cache else None)
            except VPRError:
                continue
            assert is_vpr_index(out) and load_index(out).manifest["count"] == 2
    finally:
        os.chdir(cwd)
    after = snapshot(root)
    assert {k: after.get(k) for k in protected} == protected


def test_viz_and_bench_outputs_never_replace_a_users_file(monkeypatch, capsys, data, tmp_path):
    from PIL import Image

    out = tmp_path / "idx"
    assert build(monkeypatch, capsys, data / "database", out, "--no-cache")[0] == 0
    Image.new("RGB", (4, 4)).save(tmp_path / "holiday.png")
    before = (tmp_path / "holiday.png").read_bytes()
    query = sorted((data / "queries").iterdir())[0]
    code, _, err = run_cli(monkeypatch, capsys, "query", query, "--index", out, "--device", "cpu", "--viz", tmp_path / "holiday.png")
    assert code == 1 and "not a PNG written by vpr" in err and (tmp_path / "holiday.png").read_bytes() == before
    code, _, _ = run_cli(monkeypatch, capsys, "query", query, "--index", out, "--device", "cpu", "--viz", tmp_path / "v.png")
    assert code == 0 and is_vpr_png(tmp_path / "v.png")
    assert run_cli(monkeypatch, capsys, "query", query, "--index", out, "--device", "cpu", "--viz", tmp_path / "v.png")[0] == 0
    (tmp_path / "results.json").write_text('{"mine": true}')
    code, _, err = run_cli(monkeypatch, capsys, "bench", "--quick", "--device", "cpu", "--out", tmp_path / "results.json")
    assert code == 1 and "not a bench results file written by vpr" in err
    assert (tmp_path / "results.json").read_text() == '{"mine": true}'
