"""The benchmark's data: the synthetic city's images, photo-size JPEG copies, replicated descriptors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vpr.bench.config import BenchConfig, Stage
from vpr.data.datasets import SPLITS, find_split, list_images
from vpr.errors import UsageError


def city_images(config: BenchConfig, workdir: Path, stage: Stage) -> tuple[list[Path], list[Path], dict]:
    """(database paths, query paths, description) of a synthetic city: `config.data`, or one rendered
    into `workdir`. Every split's `database/` and `queries/` count, each split folder found by the
    dataset-layout resolver (`ROOT/images/SPLIT`, else `ROOT/SPLIT`)."""
    root = config.data
    info: dict = {}
    if root is None:
        from vpr.data.synth.generate import generate_city

        stage(f"rendering the '{config.preset}' synthetic city")
        root = workdir / "city"
        info = generate_city(root, preset=config.preset, seed=config.seed)
    database, queries = [], []
    for split in SPLITS:
        base = find_split(Path(root), split)
        if base is not None and (base / "database").is_dir():
            database += list_images(base / "database")
        if base is not None and (base / "queries").is_dir():
            queries += list_images(base / "queries")
    if not database or not queries:
        raise UsageError(f"{root}: no ROOT/images/SPLIT/{{database,queries}} (or ROOT/SPLIT/...) images; "
                         "give a `vpr synth` folder as `data`")
    return database, queries, {"root": str(root), "database": len(database), "queries": len(queries),
                               "preset": info.get("preset"), "image_size": _image_size(database[0])}


def _image_size(path: Path) -> list[int]:
    with Image.open(path) as img:
        return [img.height, img.width]


def photo_copies(sources: list[Path], count: int, size: tuple[int, int] | None, out_dir: Path) -> list[Path]:
    """`count` JPEGs cycling over `sources`, upscaled to `size` (height, width) as a camera delivers them."""
    if size is None:
        return [sources[i % len(sources)] for i in range(count)]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = out_dir / f"{i:06d}.jpg"
        if not path.exists():
            with Image.open(sources[i % len(sources)]) as img:
                img.convert("RGB").resize((size[1], size[0]), Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def replicate(base: np.ndarray, count: int, rng: np.random.Generator, noise: float = 0.1) -> np.ndarray:
    """`count` unit descriptors near the real ones: a random real descriptor moved part of the way
    towards another, plus Gaussian noise of `noise` times the real descriptors' spread around their
    mean, so larger databases keep the structure of real data."""
    dim = base.shape[1]
    spread = float(np.sqrt(np.mean(np.sum((base - base.mean(axis=0)) ** 2, axis=1))))
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, 65536):
        n = min(65536, count - start)
        a, b = base[rng.integers(0, len(base), n)], base[rng.integers(0, len(base), n)]
        t = rng.uniform(0.0, 0.5, (n, 1)).astype(np.float32)
        x = a + t * (b - a) + rng.normal(0.0, noise * spread / np.sqrt(dim), (n, dim)).astype(np.float32)
        out[start:start + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out
