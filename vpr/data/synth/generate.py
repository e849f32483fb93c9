"""Presets, pose sampling and dataset writing for the synthetic city (VPR-datasets-downloader layout).

`OUT/images/{train,val,test}/{database,queries}/@east@north@10@S@lat@lon@...@heading@...@.jpg`; splits are
bands of the city one block apart along east. Queries differ from the database by lighting, noise, position
and heading offsets and pedestrians or vehicles in front of the camera.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from vpr.data.geo import format_at_name
from vpr.data.synth.city import PEDESTRIAN, VAN, VEHICLE, City, Sprites, make_city, make_sprites, street_length
from vpr.data.synth.presets import SynthPreset, get_preset
from vpr.data.synth.lighting import LIGHTINGS, Lighting
from vpr.data.synth.render import render_view
from vpr.errors import UsageError

SPLITS = ("train", "val", "test")
ROLES = ("database", "queries")
JPEG_QUALITY = 90
QUERY_MAX_ALONG_M = 6.0
QUERY_MAX_LATERAL_M = 3.0
QUERY_MAX_TURN_DEG = 12.0
DENSE_MAX_LATERAL_M = 2.5
DENSE_STREET_ALIGNED = 0.8


@dataclass(frozen=True)
class Poses:
    """Camera poses in local city metres with the street axis (0 east-west, 1 north-south) they lie on."""

    x: np.ndarray
    y: np.ndarray
    heading: np.ndarray
    axis: np.ndarray
    centre_x: np.ndarray
    centre_y: np.ndarray

    def __len__(self) -> int:
        return int(self.x.shape[0])


def build_city(preset: SynthPreset, seed: int) -> City:
    """The city of a preset and seed, with split bands sized for the preset's database sampling."""
    lengths = [(split, preset.street_metres(split)) for split in SPLITS]
    return make_city(seed, lengths, rows=preset.rows)


def _points_on_streets(segments: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre-line points at arc lengths `s` along the concatenated segments, with their street axis."""
    lengths = np.abs(segments[:, 2] - segments[:, 0]) + np.abs(segments[:, 3] - segments[:, 1])
    ends = np.cumsum(lengths)
    k = np.minimum(np.searchsorted(ends, s, side="right"), len(segments) - 1)
    local = np.clip(s - (ends[k] - lengths[k]), 0.0, lengths[k])
    seg = segments[k]
    frac = local / np.maximum(lengths[k], 1e-9)
    x = seg[:, 0] + frac * (seg[:, 2] - seg[:, 0])
    y = seg[:, 1] + frac * (seg[:, 3] - seg[:, 1])
    return x, y, seg[:, 4].astype(np.int8)


def _offset(x: np.ndarray, y: np.ndarray, axis: np.ndarray, along: np.ndarray,
            lateral: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    east_west = axis == 0
    return x + np.where(east_west, along, lateral), y + np.where(east_west, lateral, along)


def database_poses(city: City, split: str, count: int, rng: np.random.Generator, dense: bool) -> Poses:
    """Database poses: every `L/n` metres along the streets with 4 headings, or dense random (train)."""
    seg = city.segments(split)
    total = street_length(city, split)
    if dense:
        cx, cy, axis = _points_on_streets(seg, rng.uniform(0.0, total, count))
        lateral = rng.uniform(-DENSE_MAX_LATERAL_M, DENSE_MAX_LATERAL_M, count)
        x, y = _offset(cx, cy, axis, np.zeros(count), lateral)
        canonical = 90.0 * rng.integers(0, 4, count) + rng.uniform(-15.0, 15.0, count)
        heading = np.where(rng.random(count) < DENSE_STREET_ALIGNED, canonical, rng.uniform(0.0, 360.0, count))
    else:
        n_pos = max(math.ceil(count / 4), 1)
        cx, cy, axis = _points_on_streets(seg, (np.arange(n_pos) + 0.5) * total / n_pos)
        take = np.arange(count) // 4
        cx, cy, axis = cx[take], cy[take], axis[take]
        x, y = cx, cy
        heading = 90.0 * (np.arange(count) % 4)
    return _rounded(x, y, heading, axis, cx, cy)


def query_poses(db: Poses, count: int, rng: np.random.Generator) -> Poses:
    """Query poses: a few metres along/across the street and up to 12 degrees off a random database pose.

    A query looking across the street steps back from the facade it faces, so it sees at least as much of it.
    """
    base = rng.integers(0, len(db), count)
    along = rng.uniform(-QUERY_MAX_ALONG_M, QUERY_MAX_ALONG_M, count)
    lateral = rng.uniform(-QUERY_MAX_LATERAL_M, QUERY_MAX_LATERAL_M, count)
    axis = db.axis[base]
    heading = db.heading[base] + rng.uniform(-QUERY_MAX_TURN_DEG, QUERY_MAX_TURN_DEG, count)
    facing = np.where(axis == 0, np.cos(np.radians(heading)), np.sin(np.radians(heading)))
    lateral = np.where(np.abs(facing) > 0.5, -np.sign(facing) * np.abs(lateral), lateral)
    x, y = _offset(db.centre_x[base], db.centre_y[base], axis, along, lateral)
    return _rounded(x, y, heading, axis, db.centre_x[base], db.centre_y[base])


def _rounded(x: np.ndarray, y: np.ndarray, heading: np.ndarray, axis: np.ndarray, cx: np.ndarray,
             cy: np.ndarray) -> Poses:
    """Poses rounded to what the file name stores (1 cm, 0.1 degree) so names and renderings agree."""
    h = np.round(np.mod(heading, 360.0), 1)
    return Poses(np.round(x, 2), np.round(y, 2), np.where(h >= 360.0, 0.0, h), axis, cx, cy)


def query_conditions(rng: np.random.Generator, x: float, y: float, heading: float,
                     axis: int) -> tuple[Lighting, Sprites, float]:
    """Random lighting, occluders (pedestrians, a passing vehicle) and noise level for one query."""
    name = ("day", "morning", "overcast", "dusk")[int(rng.integers(0, 4))]
    base = LIGHTINGS[name]
    tint = tuple(float(c) * float(rng.uniform(0.95, 1.05)) for c in base.tint)
    light = replace(base, brightness=base.brightness * float(rng.uniform(0.88, 1.12)), tint=tint,
                    gamma=base.gamma * float(rng.uniform(0.92, 1.08)))
    hd = math.radians(heading)
    fx, fy = math.sin(hd), math.cos(hd)
    kinds, xs, ys, sizes, axes, colours = [], [], [], [], [], []
    for _ in range(int(rng.integers(0, 4))):
        dist, side = rng.uniform(3.0, 14.0), rng.uniform(-0.8, 0.8)
        kinds.append(PEDESTRIAN)
        xs.append(x + fx * dist + fy * side * dist)
        ys.append(y + fy * dist - fx * side * dist)
        sizes.append((0.5, 0.5, rng.uniform(1.55, 1.9)))
        axes.append(0)
        colours.append((rng.uniform(0.05, 0.9, 3), rng.uniform(0.05, 0.5, 3)))
    if rng.random() < 0.35:
        dist = rng.uniform(6.0, 16.0)
        van = rng.random() < 0.4
        kinds.append(VAN if van else VEHICLE)
        xs.append(x + fx * dist + fy * rng.uniform(-2.0, 2.0))
        ys.append(y + fy * dist - fx * rng.uniform(-2.0, 2.0))
        sizes.append((rng.uniform(5.0, 6.5), 2.1, rng.uniform(2.2, 2.8)) if van
                     else (rng.uniform(3.8, 4.8), 1.8, rng.uniform(1.4, 1.6)))
        axes.append(int(axis))
        colours.append((rng.uniform(0.1, 0.95, 3), (0.12, 0.14, 0.17)))
    seeds = rng.integers(0, 2**31, len(kinds))
    occluders = make_sprites(kinds, xs, ys, sizes if kinds else np.zeros((0, 3)), axes,
                             colours if kinds else np.zeros((0, 2, 3)), seeds)
    return light, occluders, float(rng.uniform(1.5, 5.0))


def _names(city: City, poses: Poses) -> list[str]:
    """Unique `@` file names; a colliding pose gets a distinguishing note."""
    used: set[str] = set()
    names = []
    for x, y, h in zip(poses.x, poses.y, poses.heading):
        east, north = city.origin_east + float(x), city.origin_north + float(y)
        name = format_at_name(east, north, city.zone_number, city.zone_letter, heading=float(h))
        k = 1
        while name in used:
            name = format_at_name(east, north, city.zone_number, city.zone_letter, heading=float(h), note=f"dup{k}")
            k += 1
        used.add(name)
        names.append(name)
    return names


def plan_poses(city: City, preset: SynthPreset, seed: int) -> dict[tuple[str, str], Poses]:
    """Database and query poses of every split, keyed by (split, role)."""
    plan = {}
    for i, split in enumerate(SPLITS):
        n_db, n_q = preset.counts()[split]
        rng = np.random.default_rng([int(seed), 0x9051, i])
        db = database_poses(city, split, n_db, rng, dense=preset.dense_train and split == "train")
        plan[(split, "database")] = db
        plan[(split, "queries")] = query_poses(db, n_q, rng)
    return plan


def _save_jpeg(img: np.ndarray, path: Path) -> None:
    Image.fromarray(img).save(path, format="JPEG", quality=JPEG_QUALITY)


def generate_city(
    out_dir: Path, preset: str = "small", seed: int = 0, progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Render and write the synthetic dataset; returns counts per split/role, image size and seconds.

    Writes into a temporary sibling directory renamed into place at the end, so an interrupted run never
    leaves a partial dataset. Same preset and seed give byte-identical files.
    """
    start = time.perf_counter()
    spec = get_preset(preset)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UsageError(f"{out_dir}: already exists and is not empty; choose another path or delete it")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise UsageError(f"seed {seed!r} is invalid; use a non-negative integer")
    city = build_city(spec, seed)
    plan = plan_poses(city, spec, seed)
    total = sum(len(p) for p in plan.values())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f"{out_dir.name}.tmp-{secrets.token_hex(4)}"
    done = 0
    try:
        for i, split in enumerate(SPLITS):
            for role in ROLES:
                poses = plan[(split, role)]
                folder = tmp / "images" / split / role
                folder.mkdir(parents=True)
                for k, name in enumerate(_names(city, poses)):
                    x, y, h = float(poses.x[k]), float(poses.y[k]), float(poses.heading[k])
                    east, north = city.origin_east + x, city.origin_north + y
                    if role == "database":
                        img = render_view(city, east, north, h, spec.width, spec.height)
                    else:
                        rng = np.random.default_rng([int(seed), 0x0C3E, i, k])
                        light, occluders, sigma = query_conditions(rng, x, y, h, int(poses.axis[k]))
                        img = render_view(city, east, north, h, spec.width, spec.height, lighting=light,
                                          occluders=occluders)
                        noise = rng.normal(0.0, sigma, img.shape).astype(np.float32)
                        img = np.clip(img.astype(np.float32) + noise + 0.5, 0, 255).astype(np.uint8)
                    _save_jpeg(img, folder / name)
                    done += 1
                    if progress is not None:
                        progress(done, total)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    counts = {split: {role: len(plan[(split, role)]) for role in ROLES} for split in SPLITS}
    return {
        "path": str(out_dir), "preset": spec.name, "seed": seed, "width": spec.width, "height": spec.height,
        "counts": counts, "total": total, "seconds": round(time.perf_counter() - start, 3),
    }
