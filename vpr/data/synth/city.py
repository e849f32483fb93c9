"""Procedural city layout: a street grid, building lots with facade attributes, trees and parked vehicles.

Coordinates are local metres (x = east, y = north) relative to `ORIGIN_EAST`/`ORIGIN_NORTH` in UTM zone 10S.
Everything is drawn from one seeded `numpy.random.Generator`, so a seed fully determines the city.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

ORIGIN_EAST = 550_000.0
ORIGIN_NORTH = 4_180_000.0
ZONE_NUMBER = 10
ZONE_LETTER = "S"

TREE, VEHICLE, PEDESTRIAN, VAN = 0, 1, 2, 3

_WALL_PALETTE = np.array([
    (0.56, 0.28, 0.20), (0.80, 0.70, 0.52), (0.90, 0.86, 0.76), (0.60, 0.60, 0.58), (0.92, 0.92, 0.89),
    (0.76, 0.46, 0.30), (0.58, 0.68, 0.80), (0.64, 0.75, 0.60), (0.86, 0.66, 0.64), (0.36, 0.26, 0.21),
    (0.86, 0.70, 0.36), (0.40, 0.45, 0.52), (0.70, 0.35, 0.30), (0.50, 0.55, 0.45), (0.95, 0.80, 0.60),
], dtype=np.float32)
_GLASS_PALETTE = np.array([
    (0.14, 0.20, 0.26), (0.10, 0.24, 0.26), (0.22, 0.24, 0.26), (0.26, 0.22, 0.18), (0.16, 0.22, 0.34),
    (0.30, 0.36, 0.40),
], dtype=np.float32)


@dataclass(frozen=True)
class Sprites:
    """Upright billboard objects on the ground: trees, vehicles, pedestrians and vans (one row per object)."""

    kind: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    x: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    y: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    size: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.float32))
    axis: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    colour: np.ndarray = field(default_factory=lambda: np.zeros((0, 2, 3), np.float32))
    seed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    def concat(self, other: Sprites) -> Sprites:
        """Return the objects of both sets in one set."""
        return Sprites(*(np.concatenate([getattr(self, n), getattr(other, n)]) for n in _SPRITE_FIELDS))

    def take(self, index: np.ndarray) -> Sprites:
        """Return the objects selected by an index or boolean mask."""
        return Sprites(*(getattr(self, n)[index] for n in _SPRITE_FIELDS))


_SPRITE_FIELDS = ("kind", "x", "y", "size", "axis", "colour", "seed")


def make_sprites(
    kind: Sequence[int], x: Sequence[float], y: Sequence[float], size: Sequence[Sequence[float]],
    axis: Sequence[int], colour: Sequence[Sequence[Sequence[float]]], seed: Sequence[int],
) -> Sprites:
    """Build a `Sprites` set from plain sequences; size is (length, width, height) in metres."""
    return Sprites(
        kind=np.asarray(kind, np.int8).reshape(-1), x=np.asarray(x, np.float32).reshape(-1),
        y=np.asarray(y, np.float32).reshape(-1), size=np.asarray(size, np.float32).reshape(-1, 3),
        axis=np.asarray(axis, np.int8).reshape(-1), colour=np.asarray(colour, np.float32).reshape(-1, 2, 3),
        seed=np.asarray(seed, np.int64).astype(np.uint32).reshape(-1),
    )


@dataclass(frozen=True)
class Buildings:
    """Per-building footprint (axis-aligned box) and facade attributes, one array entry per building.

    `palette` is (buildings, materials, 3): the colour of each facade material (`WALL` ... `LIT`).
    """

    x0: np.ndarray
    y0: np.ndarray
    x1: np.ndarray
    y1: np.ndarray
    height: np.ndarray
    floor_h: np.ndarray
    store_h: np.ndarray
    win_pitch: np.ndarray
    win_w: np.ndarray
    win_h: np.ndarray
    bands: np.ndarray
    palette: np.ndarray

    def __len__(self) -> int:
        return int(self.x0.shape[0])


# Facade materials: rows of `Buildings.palette` (per building, RGB in 0..1).
(WALL, TRIM, EDGE, GLASS, STORE, RESIDENTIAL, DISPLAY, DISPLAY_WARM, DOOR, AWNING, AWNING_DARK, SIGN, TEXT,
 LIT) = range(14)


@dataclass(frozen=True)
class Edges:
    """Building faces as axis-aligned segments: axis 0 lies on x = c (faces east/west), axis 1 on y = c.

    Faces are sorted by axis; `split` is the number of axis-0 faces. `sign` is the outward normal's
    direction along the axis; the remaining arrays are per-face storefront and sign attributes.
    """

    axis: np.ndarray
    c: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    sign: np.ndarray
    building: np.ndarray
    normal_az: np.ndarray
    face_hash: np.ndarray
    store_kind: np.ndarray
    store_pitch: np.ndarray
    awning_on: np.ndarray
    sign_on: np.ndarray
    sign_pos: np.ndarray
    sign_w: np.ndarray
    sign_h: np.ndarray
    sign_bits: np.ndarray
    split: int

    @property
    def length(self) -> np.ndarray:
        """Face widths in metres."""
        return self.hi - self.lo


@dataclass(frozen=True)
class City:
    """A generated city: street grid, buildings, faces, roadside objects and geographic split bands."""

    seed: int
    street_x: np.ndarray
    street_x_road: np.ndarray
    street_x_half: np.ndarray
    street_y: np.ndarray
    street_y_road: np.ndarray
    street_y_half: np.ndarray
    buildings: Buildings
    edges: Edges
    sprites: Sprites
    bands: dict[str, tuple[int, int]]
    sky_phase: np.ndarray
    origin_east: float = ORIGIN_EAST
    origin_north: float = ORIGIN_NORTH
    zone_number: int = ZONE_NUMBER
    zone_letter: str = ZONE_LETTER

    def segments(self, split: str) -> np.ndarray:
        """Street centre-line segments of one split band as rows (x0, y0, x1, y1, axis); axis 0 runs east."""
        first, last = self.bands[split]
        xs = self.street_x[first:last + 1]
        y_lo, y_hi = float(self.street_y[0]), float(self.street_y[-1])
        rows = [(float(x), y_lo, float(x), y_hi, 1.0) for x in xs]
        if last > first:
            rows += [(float(xs[0]), float(y), float(xs[-1]), float(y), 0.0) for y in self.street_y]
        return np.array(rows, dtype=np.float64)

    def band_extent(self, split: str) -> tuple[float, float]:
        """West and east limits (local metres, street edges included) of one split band."""
        first, last = self.bands[split]
        return (float(self.street_x[first] - self.street_x_half[first]),
                float(self.street_x[last] + self.street_x_half[last]))


def street_length(city: City, split: str) -> float:
    """Total centre-line length of the streets in one split band, in metres."""
    seg = city.segments(split)
    return float(np.sum(np.abs(seg[:, 2] - seg[:, 0]) + np.abs(seg[:, 3] - seg[:, 1])))


def _street_widths(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    road = rng.choice(np.array([4.0, 4.5, 5.0, 6.0, 7.0]), size=n, p=[0.25, 0.25, 0.2, 0.2, 0.1])
    half = road + rng.uniform(2.5, 4.0, size=n)
    return road.astype(np.float32), half.astype(np.float32)


def _split_range(rng: np.random.Generator, a: float, b: float, lo: float = 7.0, hi: float = 22.0) -> list[float]:
    cuts = [a]
    pos = a
    while b - pos > hi:
        pos += rng.uniform(lo, min(hi, b - pos - lo))
        cuts.append(pos)
    cuts.append(b)
    return cuts


def _block_lots(rng: np.random.Generator, x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, ...]]:
    """Perimeter lots of one block: rows along the north and south sides, columns along east and west."""
    depth = min(rng.uniform(12.0, 20.0), (min(x1 - x0, y1 - y0) - 8.0) / 2.0)
    lots = []
    cx = _split_range(rng, x0, x1)
    for a, b in zip(cx[:-1], cx[1:]):
        lots.append((a, y1 - depth, b, y1))
    cx = _split_range(rng, x0, x1)
    for a, b in zip(cx[:-1], cx[1:]):
        lots.append((a, y0, b, y0 + depth))
    for xa, xb in ((x0, x0 + depth), (x1 - depth, x1)):
        cy = _split_range(rng, y0 + depth, y1 - depth)
        for a, b in zip(cy[:-1], cy[1:]):
            lots.append((xa, a, xb, b))
    keep = rng.random(len(lots)) > 0.06
    return [lot for lot, k in zip(lots, keep) if k]


def _hsv(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    i = (np.floor(h * 6).astype(np.int64)) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], -1).astype(np.float32)


def _buildings(rng: np.random.Generator, lots: np.ndarray) -> Buildings:
    f32 = np.float32
    n = len(lots)
    floors = rng.integers(2, 8, size=n)
    towers = rng.random(n) < 0.06
    floors[towers] = rng.integers(10, 20, size=int(towers.sum()))
    floor_h = rng.uniform(2.9, 3.6, n)
    store_h = rng.uniform(3.4, 4.6, n)
    height = store_h + floors * floor_h + rng.uniform(0.3, 1.2, n)
    base = _WALL_PALETTE[rng.integers(0, len(_WALL_PALETTE), n)]
    wall = np.clip(base + rng.uniform(-0.07, 0.07, (n, 3)), 0.05, 0.97)
    light_trim = rng.random(n) < 0.5
    trim = np.where(light_trim[:, None], np.clip(wall * 0.4 + 0.6, 0, 1), wall * 0.6)
    glass = np.clip(_GLASS_PALETTE[rng.integers(0, len(_GLASS_PALETTE), n)] + rng.uniform(-0.04, 0.04, (n, 3)), 0, 1)
    store = _hsv(rng.random(n), rng.uniform(0.4, 0.9, n), rng.uniform(0.3, 0.8, n))
    awning = _hsv(rng.random(n), rng.uniform(0.6, 1.0, n), rng.uniform(0.45, 0.9, n))
    sign = _hsv(rng.random(n), rng.uniform(0.6, 1.0, n), rng.uniform(0.65, 1.0, n))
    ones = np.ones((n, 3), f32)
    luminance = sign @ np.array([0.3, 0.59, 0.11], f32)
    text = np.where((luminance > 0.55)[:, None], f32(0.08), f32(0.97)) * ones
    palette = np.stack([
        wall, trim, trim * 0.92, glass, store, wall * 0.82, ones * f32((0.12, 0.14, 0.17)),
        ones * f32((0.30, 0.26, 0.18)), trim * 0.35, awning, awning * 0.72, sign, text, ones * f32((1.0, 0.84, 0.48)),
    ], axis=1).astype(f32)
    return Buildings(
        x0=lots[:, 0].astype(f32), y0=lots[:, 1].astype(f32), x1=lots[:, 2].astype(f32), y1=lots[:, 3].astype(f32),
        height=height.astype(f32), floor_h=floor_h.astype(f32), store_h=store_h.astype(f32),
        win_pitch=rng.uniform(2.2, 4.0, n).astype(f32), win_w=rng.uniform(0.35, 0.7, n).astype(f32),
        win_h=rng.uniform(0.4, 0.65, n).astype(f32), bands=(rng.random(n) < 0.4), palette=palette,
    )


def _edges(rng: np.random.Generator, b: Buildings) -> Edges:
    n = len(b)
    idx = np.arange(n)
    # Faces: west (x = x0, normal -x), east (x = x1, +x), south (y = y0, -y), north (y = y1, +y).
    axis = np.repeat(np.array([0, 0, 1, 1], np.int8), n)
    c = np.concatenate([b.x0, b.x1, b.y0, b.y1])
    lo = np.concatenate([b.y0, b.y0, b.x0, b.x0])
    hi = np.concatenate([b.y1, b.y1, b.x1, b.x1])
    sign = np.repeat(np.array([-1, 1, -1, 1], np.float32), n)
    building = np.tile(idx, 4)
    normal_az = np.repeat(np.array([270.0, 90.0, 180.0, 0.0], np.float32), n)
    m = 4 * n
    length = hi - lo
    sign_w = np.minimum(rng.uniform(2.5, 6.5, m), length * 0.8)
    return Edges(
        axis=axis, c=c, lo=lo, hi=hi, sign=sign, building=building, normal_az=normal_az,
        face_hash=rng.integers(0, 2**32, m, dtype=np.uint64).astype(np.uint32),
        store_kind=rng.choice(np.array([0, 1, 2], np.int8), m, p=[0.45, 0.3, 0.25]),
        store_pitch=rng.uniform(2.5, 5.0, m).astype(np.float32),
        awning_on=rng.random(m) < 0.45, sign_on=rng.random(m) < 0.8,
        sign_pos=(length * rng.uniform(0.3, 0.7, m)).astype(np.float32), sign_w=sign_w.astype(np.float32),
        sign_h=rng.uniform(0.7, 1.3, m).astype(np.float32),
        sign_bits=rng.integers(0, 2**16, m, dtype=np.int64),
        split=2 * n,
    )


def _roadside(rng: np.random.Generator, sx: np.ndarray, sx_road: np.ndarray, sx_half: np.ndarray,
              sy: np.ndarray, sy_road: np.ndarray, sy_half: np.ndarray, trees: bool, vehicles: bool) -> Sprites:
    """Street trees on the kerb and cars parked along the roads, per block side."""
    kind, xs, ys, size, axis, colour = [], [], [], [], [], []
    streets = [(0, y, r, sx, sx_half) for y, r in zip(sy, sy_road)]
    streets += [(1, x, r, sy, sy_half) for x, r in zip(sx, sx_road)]
    for ax, centre, road, cross, cross_half in streets:
        for k in range(len(cross) - 1):
            a = float(cross[k] + cross_half[k]) + 2.0
            b = float(cross[k + 1] - cross_half[k + 1]) - 2.0
            for side in (-1.0, 1.0):
                if trees and rng.random() < 0.55:
                    pos = a + rng.uniform(0.5, 4.0)
                    while pos < b:
                        kind.append(TREE)
                        size.append((rng.uniform(2.6, 4.4), 0.0, rng.uniform(5.0, 9.0)))
                        colour.append((_tree_green(rng), (0.30, 0.22, 0.15)))
                        off = side * (road + 0.8)
                        xs.append(pos if ax == 0 else centre + off)
                        ys.append(centre + off if ax == 0 else pos)
                        axis.append(ax)
                        pos += rng.uniform(7.0, 12.0)
                if vehicles and rng.random() < 0.7:
                    pos = a + rng.uniform(0.5, 6.0)
                    while pos < b - 4.0:
                        length = rng.uniform(3.8, 5.0)
                        if rng.random() < 0.75:
                            kind.append(VEHICLE)
                            size.append((length, rng.uniform(1.7, 1.95), rng.uniform(1.35, 1.65)))
                            body = _hsv(np.array([rng.random()]), np.array([rng.uniform(0.0, 0.8)]),
                                        np.array([rng.uniform(0.15, 0.95)]))[0]
                            colour.append((tuple(body), (0.12, 0.14, 0.17)))
                            off = side * (road - 1.1)
                            xs.append(pos + length / 2 if ax == 0 else centre + off)
                            ys.append(centre + off if ax == 0 else pos + length / 2)
                            axis.append(ax)
                        pos += length + rng.uniform(1.0, 6.0)
    n = len(kind)
    return make_sprites(kind, xs, ys, size if n else np.zeros((0, 3)), axis, colour if n else np.zeros((0, 2, 3)),
                        rng.integers(0, 2**32, n, dtype=np.uint64))


def _tree_green(rng: np.random.Generator) -> tuple[float, float, float]:
    g = rng.uniform(0.32, 0.55)
    return (g * rng.uniform(0.45, 0.8), g, g * rng.uniform(0.25, 0.5))


def make_city(
    seed: int, band_lengths: Sequence[tuple[str, float]] = (("train", 300.0), ("val", 100.0), ("test", 100.0)),
    rows: int = 2, *, trees: bool = True, vehicles: bool = True,
) -> City:
    """Generate a city whose split bands (west to east, one block apart) each hold the given street length.

    `rows` is the number of east-west streets used for sampling; one ring of outer blocks surrounds them.
    """
    rng = np.random.default_rng([int(seed), 0x5C17])
    ny = max(int(rows), 1)
    sy_road, sy_half = _street_widths(rng, ny)
    gaps_y = rng.uniform(55.0, 95.0, ny - 1)
    sy = np.zeros(ny, np.float64)
    for j in range(1, ny):
        sy[j] = sy[j - 1] + sy_half[j - 1] + gaps_y[j - 1] + sy_half[j]
    span_y = float(sy[-1] - sy[0])

    road0, half0 = _street_widths(rng, 1)
    sx, sx_road_l, sx_half_l = [0.0], [float(road0[0])], [float(half0[0])]
    bands: dict[str, tuple[int, int]] = {}

    def add_street() -> None:
        road, half = _street_widths(rng, 1)
        sx.append(sx[-1] + sx_half_l[-1] + rng.uniform(55.0, 95.0) + float(half[0]))
        sx_road_l.append(float(road[0]))
        sx_half_l.append(float(half[0]))

    for i, (name, length) in enumerate(band_lengths):
        if i > 0:
            add_street()
        first = len(sx) - 1
        while (len(sx) - first) * span_y + ny * (sx[-1] - sx[first]) < length:
            add_street()
        bands[name] = (first, len(sx) - 1)
    street_x = np.array(sx, np.float64)
    sx_road, sx_half = np.array(sx_road_l, np.float32), np.array(sx_half_l, np.float32)

    # Block edges: one ring of outer blocks beyond the outermost streets.
    def bounds(centres: np.ndarray, half: np.ndarray) -> list[tuple[float, float]]:
        out = [(float(centres[0] - half[0]) - rng.uniform(45.0, 80.0), float(centres[0] - half[0]))]
        out += [(float(centres[k] + half[k]), float(centres[k + 1] - half[k + 1])) for k in range(len(centres) - 1)]
        out.append((float(centres[-1] + half[-1]), float(centres[-1] + half[-1]) + rng.uniform(45.0, 80.0)))
        return out

    xb, yb = bounds(street_x, sx_half), bounds(sy, sy_half)
    lots = [lot for (x0, x1) in xb for (y0, y1) in yb for lot in _block_lots(rng, x0, y0, x1, y1)]
    buildings = _buildings(rng, np.array(lots, np.float64))
    edges = _edges(rng, buildings)
    sprites = _roadside(rng, street_x, sx_road, sx_half, sy, sy_road, sy_half, trees, vehicles)
    return City(
        seed=int(seed), street_x=street_x.astype(np.float32), street_x_road=sx_road, street_x_half=sx_half,
        street_y=sy.astype(np.float32), street_y_road=sy_road, street_y_half=sy_half,
        buildings=buildings, edges=edges, sprites=sprites, bands=bands,
        sky_phase=rng.uniform(0, 2 * np.pi, 6).astype(np.float32),
    )
