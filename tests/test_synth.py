"""Tests of the synthetic demo city: determinism, layout, names, ground truth, rendering and preview."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vpr.data.geo import parse_at_name
from vpr.data.synth.generate import build_city, generate_city
from vpr.data.synth.presets import PRESETS
from vpr.data.synth.preview import save_preview
from vpr.data.synth.render import render_view
from vpr.data.synth.generate import _names, plan_poses
from vpr.data.synth.preview import CAPTION_H, PAD, tile_scale
from vpr.errors import UsageError

SPLITS = ("train", "val", "test")
ROLES = ("database", "queries")


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _poses(root: Path, split: str, role: str) -> np.ndarray:
    names = [parse_at_name(p.name) for p in sorted((root / "images" / split / role).iterdir())]
    return np.array([(g.east, g.north) for g in names])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[tuple[int, int]]]:
    out = tmp_path_factory.mktemp("synth") / "tiny"
    out.mkdir()  # an existing empty directory is accepted
    calls: list[tuple[int, int]] = []
    summary = generate_city(out, "tiny", seed=0, progress=lambda done, total: calls.append((done, total)))
    return out, summary, calls


def test_same_seed_gives_identical_names_and_bytes(tiny, tmp_path):
    root, _, _ = tiny
    again = generate_city(tmp_path / "again", "tiny", seed=0)
    assert _digest(root) == _digest(Path(again["path"]))


def test_other_seed_gives_another_city():
    preset = PRESETS["tiny"]
    a, b = build_city(preset, 0), build_city(preset, 1)
    assert not np.array_equal(a.street_x, b.street_x) and len(a.buildings) != len(b.buildings)
    names_a = set(_names(a, plan_poses(a, preset, 0)[("test", "database")]))
    names_b = set(_names(b, plan_poses(b, preset, 1)[("test", "database")]))
    assert names_a.isdisjoint(names_b)
    pose = (a.origin_east + float(a.street_x[0]), a.origin_north + 30.0, 0.0, 96, 72)
    assert np.abs(render_view(a, *pose).astype(int) - render_view(b, *pose)).mean() > 10


def test_summary_progress_and_no_leftovers(tiny):
    root, summary, calls = tiny
    preset = PRESETS["tiny"]
    assert summary["counts"] == {
        "train": {"database": 120, "queries": 30}, "val": {"database": 40, "queries": 12},
        "test": {"database": 40, "queries": 12},
    } == {s: dict(zip(ROLES, preset.counts()[s])) for s in SPLITS}
    assert {k: v for k, v in summary.items() if k not in ("counts", "seconds")} == {
        "path": str(root), "preset": "tiny", "seed": 0, "width": 96, "height": 72, "total": 254,
    }
    assert len([p for p in root.rglob("*") if p.is_file()]) == 254 and isinstance(summary["seconds"], float)
    total = summary["total"]
    assert calls[-1] == (total, total) and [d for d, _ in calls] == list(range(1, total + 1))
    assert [p.name for p in root.parent.iterdir()] == [root.name]


def test_layout_names_and_disjoint_splits(tiny):
    root, summary, _ = tiny
    assert sorted(p.name for p in (root / "images").iterdir()) == sorted(SPLITS)
    extents = {}
    for split in SPLITS:
        assert sorted(p.name for p in (root / "images" / split).iterdir()) == sorted(ROLES)
        points = []
        for role in ROLES:
            files = sorted((root / "images" / split / role).iterdir())
            assert len(files) == summary["counts"][split][role]
            for f in files:
                assert f.suffix == ".jpg"
                g = parse_at_name(f.name)
                assert math.isfinite(g.east) and math.isfinite(g.north)
                assert (g.zone_number, g.zone_letter) == (10, "S")
                assert g.heading is not None and 0.0 <= g.heading < 360.0
                assert 37.0 < g.lat < 38.5 and -123.0 < g.lon < -122.0
                points.append((g.east, g.north))
            with Image.open(files[0]) as img:
                assert img.size == (PRESETS["tiny"].width, PRESETS["tiny"].height) and img.mode == "RGB"
        extents[split] = np.array(points)
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                gap = np.linalg.norm(extents[a][:, None] - extents[b][None], axis=2).min()
                assert gap > 25.0, (a, b, gap)


def test_names_hold_the_planned_poses_and_every_query_sees_a_database_view(tiny):
    """The ground truth in the names is where each image was rendered; the database has a position
    every 8 m of street (2 m per image) with 4 headings (0, 90, 180, 270), and each query is a
    database view moved at most 6 m along and 3 m across the street and turned at most 12 degrees
    (so a positive within 25 m always)."""
    root, _, _ = tiny
    preset = PRESETS["tiny"]
    city = build_city(preset, 0)
    plan = plan_poses(city, preset, 0)
    for split in SPLITS:
        poses = {}
        for role in ROLES:
            names = [parse_at_name(p.name) for p in sorted((root / "images" / split / role).iterdir())]
            got = sorted((round(g.east, 2), round(g.north, 2), g.heading) for g in names)
            planned = plan[(split, role)]
            want = sorted((round(city.origin_east + float(x), 2), round(city.origin_north + float(y), 2), float(h))
                          for x, y, h in zip(planned.x, planned.y, planned.heading))
            assert got == want, (split, role)
            poses[role] = np.array(got)
        db, q = poses["database"], poses["queries"]
        places, per_place = np.unique(db[:, :2], axis=0, return_counts=True)
        assert len(places) == len(db) // 4 and set(per_place) == {4} and set(db[:, 2]) == {0.0, 90.0, 180.0, 270.0}
        distance = np.linalg.norm(q[:, None, :2] - db[None, :, :2], axis=2)
        turn = np.abs((q[:, None, 2] - db[None, :, 2] + 180.0) % 360.0 - 180.0)
        seen = (distance <= math.hypot(6.0, 3.0) + 0.01) & (turn <= 12.0 + 0.05)
        assert seen.any(axis=1).all(), split
        assert distance.min(axis=1).max() <= 25.0


def test_nearby_views_look_alike_distant_views_do_not():
    preset = PRESETS["tiny"]
    city = build_city(preset, 0)
    plan = plan_poses(city, preset, 0)
    db = [plan[(s, "database")] for s in SPLITS]
    xs, ys, hs, axis = (np.concatenate([getattr(p, a) for p in db]) for a in ("x", "y", "heading", "axis"))
    e0, n0 = city.origin_east, city.origin_north

    def view(x: float, y: float, h: float) -> np.ndarray:
        return render_view(city, e0 + x, n0 + y, h, 96, 72).astype(np.float32)

    near, far, behind, along_street = [], [], [], []
    for k in range(0, len(xs), 7):
        x, y, h = float(xs[k]), float(ys[k]), float(hs[k])
        here = view(x, y, h)
        step = (2.0, 0.0) if axis[k] == 0 else (0.0, 2.0)  # 2 m along the street
        near.append(np.abs(here - view(x + step[0], y + step[1], h)).mean())
        dist = np.hypot(xs - x, ys - y)
        far_k = int(np.argmin(np.abs(dist - 200.0) + np.where(hs == h, 0.0, 1e6)))
        far.append(np.abs(here - view(float(xs[far_k]), float(ys[far_k]), h)).mean())
        behind.append(np.abs(here - view(x, y, (h + 180.0) % 360.0)).mean())
        along_street.append((h % 180.0 == 0.0) == (axis[k] == 1))
    near, far, behind, along_street = map(np.array, (near, far, behind, along_street))
    closer = (near < far) & (near < behind)
    assert closer[along_street].all()
    assert closer.mean() >= 0.9
    assert near.mean() < 0.7 * min(far.mean(), behind.mean())


def test_render_view_is_deterministic_uint8():
    city = build_city(PRESETS["tiny"], 3)
    args = (city, city.origin_east + float(city.street_x[0]), city.origin_north + 20.0, 30.0, 64, 48)
    a, b = render_view(*args), render_view(*args)
    assert a.dtype == np.uint8 and a.shape == (48, 64, 3)
    assert np.array_equal(a, b) and a.std() > 10


def test_existing_non_empty_out_dir_is_refused(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UsageError, match="taken.*choose another path or delete it"):
        generate_city(out, "tiny")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_unknown_preset_lists_valid_ones(tmp_path):
    with pytest.raises(UsageError, match="tiny, small, medium, large"):
        generate_city(tmp_path / "x", "huge")
    assert not (tmp_path / "x").exists()


def test_interrupted_run_leaves_nothing(tmp_path):
    def stop(done: int, total: int) -> None:
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_city(tmp_path / "cut", "tiny", progress=stop)
    assert list(tmp_path.iterdir()) == []


def test_preview_png_size(tiny, tmp_path):
    root, _, _ = tiny
    out = save_preview(root, tmp_path / "sheet.png", rows=2, cols=4)
    preset = PRESETS["tiny"]
    scale = tile_scale(preset.width)
    expected = (4 * preset.width * scale + 5 * PAD, 2 * (preset.height * scale + CAPTION_H) + 3 * PAD)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == expected
    with pytest.raises(UsageError):
        save_preview(root, tmp_path / "bad.png", cols=3)


def test_dense_train_database_fills_cosplace_classes():
    preset = PRESETS["medium"]
    city = build_city(preset, 0)
    plan = plan_poses(city, preset, 0)
    db, q = plan[("train", "database")], plan[("train", "queries")]
    assert (len(db), len(q)) == preset.counts()["train"]
    cells = np.stack([np.floor(db.x / 10), np.floor(db.y / 10), np.floor(db.heading / 30)], axis=1)
    _, sizes = np.unique(cells, axis=0, return_counts=True)
    assert (sizes >= 10).sum() >= 500
    some = np.stack([q.x[::20], q.y[::20]], axis=1)
    nearest = np.hypot(some[:, None, 0] - db.x[None], some[:, None, 1] - db.y[None]).min(axis=1)
    assert nearest.max() <= 10.0
