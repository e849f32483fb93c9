"""Vectorised 2.5D renderer: one ray per image column against all building faces, floor casting, sky, sprites.

Walls: every column's ray is intersected with every camera-facing face at once (columns x faces), keeping the
`LAYERS` nearest hits so taller buildings behind lower ones show above their roofs. Facade, ground and sky
textures are evaluated per pixel from world coordinates with numpy broadcasting; trees, vehicles and pedestrians
are depth-tested billboards. Compass headings: 0 = north, 90 = east.
"""

from __future__ import annotations

import math
import numpy as np

from vpr.data.synth.city import (
    AWNING, AWNING_DARK, DISPLAY, DISPLAY_WARM, DOOR, EDGE, GLASS, LIT, PEDESTRIAN, RESIDENTIAL, SIGN, STORE, TEXT,
    TREE, TRIM, VAN, WALL, City, Edges, Sprites,
)
from vpr.data.synth.lighting import LIGHTINGS, Lighting, f32, fog, hash_ints, unit

FOV_DEG = 90.0
CAMERA_HEIGHT = 2.0
MAX_DEPTH = 350.0
LAYERS = 3
SPRITE_RANGE = 70.0

def _cast_walls(
    e: Edges, cx: float, cy: float, fx: float, fy: float, dx: np.ndarray, dy: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest `LAYERS` camera-facing face hits per column: depth (inf = none), face index, facade u (metres)."""
    rx, ry = fy, -fx
    ts, us, ids = [], [], []
    for axis, sl in ((0, slice(0, e.split)), (1, slice(e.split, None))):
        pa, pb, fa, fb, ra, rb, da, db = (
            (cx, cy, fx, fy, rx, ry, dx, dy) if axis == 0 else (cy, cx, fy, fx, ry, rx, dy, dx))
        c, lo, hi, sg = e.c[sl], e.lo[sl], e.hi[sl], e.sign[sl]
        rel = c - f32(pa)
        z_lo = rel * fa + (lo - pb) * fb
        z_hi = rel * fa + (hi - pb) * fb
        l_lo = rel * ra + (lo - pb) * rb
        l_hi = rel * ra + (hi - pb) * rb
        keep = ((sg * rel < 0) & (np.abs(rel) < MAX_DEPTH) & (hi > pb - MAX_DEPTH) & (lo < pb + MAX_DEPTH)
                & (np.maximum(z_lo, z_hi) > 0.05) & ~((l_lo > z_lo) & (l_hi > z_hi))
                & ~((l_lo < -z_lo) & (l_hi < -z_hi)))
        idx = np.nonzero(keep)[0]
        lo_k, hi_k = lo[idx], hi[idx]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = rel[idx][None, :] / da[:, None]
            hit = f32(pb) + t * db[:, None]
        ok = (t > 0.05) & (t < MAX_DEPTH) & (hit >= lo_k) & (hit <= hi_k)
        ts.append(np.where(ok, t, np.inf).astype(f32))
        us.append(np.where((sg[idx] > 0) == (axis == 0), hit - lo_k, hi_k - hit).astype(f32))
        ids.append(idx + sl.start)
    t_all = np.concatenate(ts, axis=1)
    u_all = np.concatenate(us, axis=1)
    id_all = np.concatenate(ids)
    width = dx.shape[0]
    if t_all.shape[1] < LAYERS:
        pad = LAYERS - t_all.shape[1]
        t_all = np.concatenate([t_all, np.full((width, pad), np.inf, f32)], axis=1)
        u_all = np.concatenate([u_all, np.zeros((width, pad), f32)], axis=1)
        id_all = np.concatenate([id_all, np.zeros(pad, np.int64)])
    near = np.argpartition(t_all, LAYERS - 1, axis=1)[:, :LAYERS]
    t_near = np.take_along_axis(t_all, near, axis=1)
    order = np.argsort(t_near, axis=1, kind="stable")
    near = np.take_along_axis(near, order, axis=1)
    t_near = np.take_along_axis(t_near, order, axis=1)
    u_near = np.take_along_axis(u_all, near, axis=1)
    return t_near.T.copy(), id_all[near].T.copy(), u_near.T.copy()


def _facade(city: City, e: np.ndarray, u: np.ndarray, v: np.ndarray, light: Lighting) -> np.ndarray:
    """Facade colour at face `e`, horizontal position u and height v (metres): windows, storefront, sign."""
    E, B = city.edges, city.buildings
    b = E.building[e]
    w = E.hi[e] - E.lo[e]
    top, fh, sh = B.height[b], B.floor_h[b], B.store_h[b]

    up = v - sh
    fl = np.floor(up / fh)
    fv = up - fl * fh
    pitch = B.win_pitch[b]
    ncol = np.maximum(np.floor((w - 1.6) / pitch), 1.0)
    uu = u - (w - ncol * pitch) * 0.5
    wc = np.floor(uu / pitch)
    du = np.abs(uu - (wc + 0.5) * pitch)
    upper = (up > 0) & (v < top - 1.0)
    grid = upper & (wc >= 0) & (wc < ncol)
    half = B.win_w[b] * pitch * 0.5
    wy0 = 0.28 * fh
    wy1 = wy0 + B.win_h[b] * fh
    win = grid & (du < half) & (fv > wy0) & (fv < wy1)
    ledge = (grid & (du < half + 0.15) & (fv > wy0 - 0.22) & (fv <= wy0)) | (upper & B.bands[b] & (fv < 0.22))
    mat = np.where(ledge, np.int8(TRIM), np.int8(WALL))
    mat[win] = GLASS

    ground = v < sh
    shop = E.store_kind[e] != 2
    sp = E.store_pitch[e]
    gu = u - 0.6
    nseg = np.maximum(np.floor((w - 1.2) / sp), 1.0)
    seg = np.floor(gu / sp)
    fu = gu - seg * sp
    in_seg = ground & (seg >= 0) & (seg < nseg)
    door = in_seg & (seg == (E.face_hash[e] % nseg.astype(np.uint32))) & (np.abs(fu - sp * 0.5) < 0.6)
    door &= v < sh - 1.0
    big = shop & (fu > 0.3) & (fu < sp - 0.3) & (v > 0.5) & (v < sh - 1.0)
    small = ~shop & (np.abs(fu - sp * 0.5) < 0.55) & (v > 1.1) & (v < sh - 1.1)
    mat[ground] = np.where(shop[ground], np.int8(STORE), np.int8(RESIDENTIAL))
    display = in_seg & (big | small) & ~door
    mat[display] = np.where(E.store_kind[e][display] == 1, np.int8(DISPLAY_WARM), np.int8(DISPLAY))
    mat[door] = DOOR
    awn = ground & shop & E.awning_on[e] & (v >= sh - 1.0) & (v < sh - 0.3) & (u > 0.4) & (u < w - 0.4)
    mat[awn] = np.where(np.floor(u[awn] / 0.5) % 2 == 0, np.int8(AWNING), np.int8(AWNING_DARK))

    su = (u - (E.sign_pos[e] - E.sign_w[e] * 0.5)) / E.sign_w[e]
    sv = (v - sh - 0.15) / E.sign_h[e]
    sign = E.sign_on[e] & (su >= 0) & (su < 1) & (sv >= 0) & (sv < 1)
    cell = np.floor(su * 10.0).astype(np.int64) - 1
    row = np.floor(sv * 4.0).astype(np.int64) - 1
    valid = (cell >= 0) & (cell < 8) & (row >= 0) & (row < 2)
    letter = sign & valid & (((E.sign_bits[e] >> np.clip(row * 8 + cell, 0, 15)) & 1) == 1)
    mat[sign] = SIGN
    mat[letter] = TEXT
    mat[((u < 0.3) | (u > w - 0.3) | (v > top - 0.5)) & ~ground] = EDGE
    if light.lit_windows > 0:
        glass = mat == GLASS
        glass[glass] = unit(hash_ints(e[glass], fl[glass], wc[glass])) < light.lit_windows
        mat[glass] = LIT

    col = B.palette[b, mat]
    cosang = np.cos(np.radians(E.normal_az[e] - f32(light.sun_azimuth)))
    shade = (light.ambient + light.direct * np.maximum(cosang, 0.0)) * (0.82 + 0.18 * np.clip(v / 1.5, 0.0, 1.0))
    shade = np.where(mat == LIT, f32(1.0), shade)
    glass = mat == GLASS
    ramp = np.clip((fv[glass] - wy0[glass]) / (wy1[glass] - wy0[glass]), 0.0, 1.0)[:, None]
    col[glass] = col[glass] * (0.7 + 0.6 * ramp) + 0.12 * np.asarray(light.sky_horizon, f32)
    return col * shade[:, None]


def _nearest(centres: np.ndarray, p: np.ndarray) -> np.ndarray:
    if centres.shape[0] == 1:
        return np.zeros(p.shape, np.int64)
    i = np.clip(np.searchsorted(centres, p), 1, centres.shape[0] - 1)
    return np.where(p - centres[i - 1] < centres[i] - p, i - 1, i)


_GROUND = np.array([
    (0.42, 0.45, 0.36), (0.27, 0.27, 0.29), (0.85, 0.72, 0.25), (0.86, 0.86, 0.84), (0.62, 0.60, 0.57),
    (0.52, 0.50, 0.47), (0.75, 0.74, 0.70),
], np.float32)
LOT, ASPHALT, YELLOW, WHITE, SIDEWALK, TILE_JOINT, KERB = range(7)


def _ground(city: City, x: np.ndarray, y: np.ndarray, t: np.ndarray, light: Lighting) -> np.ndarray:
    """Ground colour at world points: asphalt with lane markings and crossings, sidewalks, lots."""
    i = _nearest(city.street_x, x)
    j = _nearest(city.street_y, y)
    ax, ay = np.abs(x - city.street_x[i]), np.abs(y - city.street_y[j])
    rx, hx = city.street_x_road[i], city.street_x_half[i]
    ry, hy = city.street_y_road[j], city.street_y_half[j]
    road_ns, road_ew = ax < rx, ay < ry
    road = road_ns | road_ew
    walk = ((ax < hx) | (ay < hy)) & ~road
    mat = np.where(road, np.int8(ASPHALT), np.int8(LOT))
    tiles = ((x / 1.5) % 1.0 < 0.07) | ((y / 1.5) % 1.0 < 0.07)
    mat[walk] = np.where(tiles[walk], np.int8(TILE_JOINT), np.int8(SIDEWALK))
    mat[walk & (((ax >= rx) & (ax < rx + 0.3)) | ((ay >= ry) & (ay < ry + 0.3)))] = KERB

    ns_only = road_ns & ~(ay < hy)
    ew_only = road_ew & ~(ax < hx)
    white = (ns_only & (np.abs(ax - (rx - 0.35)) < 0.09)) | (ew_only & (np.abs(ay - (ry - 0.35)) < 0.09))
    white |= road_ns & ~road_ew & (ay >= hy) & (ay < hy + 3.0) & (x % 1.0 < 0.5)
    white |= road_ew & ~road_ns & (ax >= hx) & (ax < hx + 3.0) & (y % 1.0 < 0.5)
    mat[white] = WHITE
    mat[(ns_only & (ax < 0.13) & ((y / 8.0) % 1.0 < 0.5)) | (ew_only & (ay < 0.13) & ((x / 8.0) % 1.0 < 0.5))] = YELLOW

    col = _GROUND[mat]
    asphalt = mat == ASPHALT
    grain = unit(hash_ints(np.floor(x[asphalt] * 2.0), np.floor(y[asphalt] * 2.0), city.seed)) - 0.5
    col[asphalt] *= (1.0 + grain * np.exp(-t[asphalt] / 12.0) * 0.06)[:, None]
    return col * f32(light.ambient + 0.7 * light.direct)


def _sky(city: City, elev: np.ndarray, az: np.ndarray, light: Lighting) -> np.ndarray:
    """Sky colour from elevation (0 at horizon, 1 at the top row) and compass azimuth (radians)."""
    g = np.power(np.clip(elev, 0.0, 1.0), 0.6)[:, None]
    col = np.asarray(light.sky_horizon, f32) * (1.0 - g) + np.asarray(light.sky_zenith, f32) * g
    p = city.sky_phase
    c = (np.sin(2 * az + p[0] + 3 * elev) * np.sin(5 * az + p[1] - 2 * elev)
         + 0.5 * np.sin(11 * az + p[2] + 7 * elev) * np.sin(3 * az + p[3]))
    amount = np.clip((c - 1.0 + 1.6 * light.clouds) * 1.5, 0.0, 1.0) * np.clip(elev * 4.0, 0.0, 1.0)
    a = amount[:, None] * 0.85
    return col * (1.0 - a) + np.asarray(light.cloud_colour, f32) * a


def _sprite_colour(kind: int, su: np.ndarray, sv: np.ndarray, size: np.ndarray, colour: np.ndarray,
                   seed: int, half_w: float, end_on: float) -> tuple[np.ndarray, np.ndarray]:
    """Mask and colour of one billboard in its local metres (su across, sv up), broadcast over a pixel box."""
    shape = np.broadcast_shapes(su.shape, sv.shape)
    rgb = np.empty(shape + (3,), f32)
    if kind == TREE:
        rc = size[0] * 0.5
        hc = size[2] - rc * 1.1
        dv = sv - hc
        ang = np.arctan2(dv, su)
        rr = np.sqrt((su / rc) ** 2 + (dv / (rc * 1.1)) ** 2)
        crown = rr < 1.0 - 0.07 * (1.0 + np.sin(ang * 7.0 + (seed % 628) * 0.01))
        trunk = (np.abs(su) < 0.17) & (sv < hc) & (sv >= 0) & ~crown
        phase = (seed % 1000) * 0.01
        speck = 0.96 + 0.05 * np.sin(su * 7.0 + sv * 3.0 + phase) + 0.04 * np.sin(sv * 9.0 - su * 4.0 - phase)
        light = (0.75 + 0.3 * np.clip(dv / rc * 0.5 + 0.5, 0.0, 1.0)) * speck
        rgb[:] = colour[0] * light[..., None]
        rgb[trunk] = colour[1]
        return crown | trunk, rgb
    if kind == PEDESTRIAN:
        h = size[2]
        head = su ** 2 + (sv - (h - 0.12)) ** 2 < 0.12 ** 2
        torso = (np.abs(su) < 0.22) & (sv >= 0.85) & (sv < h - 0.23)
        legs = (sv >= 0) & (sv < 0.85) & (np.abs(su) > 0.02) & (np.abs(su) < 0.15)
        rgb[:] = colour[1]
        rgb[torso] = colour[0]
        rgb[head] = f32((0.80, 0.62, 0.50)) * (0.6 + 0.4 * (seed % 100) / 100.0)
        return head | torso | legs, rgb
    height = size[2]
    asu = np.abs(su)
    wheels = (sv >= 0) & (sv < 0.42) & (np.abs(asu - half_w * 0.68) < min(0.32, half_w * 0.2))
    if kind == VAN:
        body = (asu < half_w) & (sv >= 0.32) & (sv < height)
        window = body & (sv > height * 0.62) & (sv < height * 0.86) & (asu < half_w * 0.85)
        stripe = body & (sv > height * 0.42) & (sv < height * 0.5)
        rgb[:] = colour[0]
        rgb[stripe] = colour[0] * 0.55
        rgb[window] = f32((0.10, 0.12, 0.15))
        rgb[wheels] = f32((0.05, 0.05, 0.05))
        return body | wheels, rgb
    belt = 0.55 * height + 0.1
    cabin_half = half_w * (0.55 + 0.3 * end_on)
    body = (asu < half_w) & (sv >= 0.28) & (sv < belt)
    cabin = (asu < cabin_half) & (sv >= belt) & (sv < height)
    window = cabin & (asu < cabin_half - 0.12) & (sv < height - 0.08) & (sv > belt + 0.08)
    rgb[:] = colour[0] * (0.85 + 0.25 * np.clip((sv - 0.28) / height, 0.0, 1.0))[..., None]
    rgb[window] = colour[1]
    if end_on > 0.7:
        lights = body & (asu > half_w - 0.3) & (sv > belt - 0.25) & (sv < belt - 0.05)
        rgb[lights] = f32((0.75, 0.08, 0.06))
    rgb[wheels] = f32((0.05, 0.05, 0.05))
    return body | cabin | wheels, rgb


def _draw_sprites(img: np.ndarray, depth: np.ndarray, sprites: Sprites, cx: float, cy: float, fx: float,
                  fy: float, f: float, hz: float, light: Lighting, wall_t: np.ndarray, wall_top: np.ndarray) -> None:
    """Depth-tested billboards, drawn in place into `img` and `depth`; ones hidden behind walls are skipped.

    `wall_t` and `wall_top` are the nearest wall's depth and top row per column.
    """
    if len(sprites) == 0:
        return
    height, width = depth.shape
    px, py = sprites.x - f32(cx), sprites.y - f32(cy)
    z = px * fx + py * fy
    lat = px * fy - py * fx
    extent = np.maximum(sprites.size[:, 0], sprites.size[:, 2])
    vis = (z > 0.8) & (z < SPRITE_RANGE) & (np.abs(lat) < z + extent) & (f * extent / np.maximum(z, 0.8) > 1.5)
    idx = np.nonzero(vis)[0]
    if idx.size == 0:
        return
    kind, size, zs, ls = sprites.kind[idx], sprites.size[idx], z[idx], lat[idx]
    along = np.abs(np.where(sprites.axis[idx] == 0, px[idx], py[idx]))
    end_on = np.minimum(along / np.maximum(np.hypot(px[idx], py[idx]), 1e-6), 1.0)
    half_w = np.where(kind == TREE, size[:, 0] * 0.5, np.where(
        kind == PEDESTRIAN, f32(0.25), 0.5 * (size[:, 0] * end_on + size[:, 1] * np.sqrt(1.0 - end_on ** 2))))
    c0 = np.clip(np.floor(width / 2 + f * (ls - half_w) / zs), 0, width).astype(np.int64)
    c1 = np.clip(np.ceil(width / 2 + f * (ls + half_w) / zs), 0, width).astype(np.int64)
    r0 = np.clip(np.floor(hz - f * (size[:, 2] - CAMERA_HEIGHT) / zs), 0, height).astype(np.int64)
    r1 = np.clip(np.ceil(hz + f * CAMERA_HEIGHT / zs), 0, height).astype(np.int64)
    cols = np.arange(width)
    span = (cols >= c0[:, None]) & (cols < c1[:, None])
    seen = np.any(span & ((wall_t >= zs[:, None]) | (wall_top > r0[:, None])), axis=1)
    shade = f32(light.ambient + 0.5 * light.direct)
    fog = np.asarray(light.fog_colour, f32)
    for j in np.nonzero(seen & (r1 > r0))[0][np.argsort(-zs[seen & (r1 > r0)], kind="stable")]:
        k, zk, lk = idx[j], float(zs[j]), float(ls[j])
        a0, a1, b0, b1 = int(c0[j]), int(c1[j]), int(r0[j]), int(r1[j])
        su = ((np.arange(a0, a1, dtype=f32) + 0.5 - width / 2) * f32(zk / f) - f32(lk))[None, :]
        sv = (CAMERA_HEIGHT + (hz - (np.arange(b0, b1, dtype=f32) + 0.5)) * f32(zk / f))[:, None]
        mask, rgb = _sprite_colour(int(kind[j]), su, sv, size[j], sprites.colour[k], int(sprites.seed[k]),
                                   float(half_w[j]), float(end_on[j]))
        box = depth[b0:b1, a0:a1]
        mask &= zk < box
        if not mask.any():
            continue
        a = 1.0 - math.exp(-zk / light.fog_distance)
        img[b0:b1, a0:a1][mask] = (rgb[mask] * shade) * (1.0 - a) + fog * a
        box[mask] = zk


def render_view(
    city: City, east: float, north: float, heading_deg: float, width: int, height: int, *,
    lighting: Lighting | None = None, occluders: Sprites | None = None,
) -> np.ndarray:
    """Render the street view from a UTM position (metres) and compass heading; returns uint8 HxWx3.

    Camera: 2 m above the ground, 90 degree horizontal field of view, level. `occluders` are extra
    billboards (pedestrians, vehicles) drawn for this view only.
    """
    if width < 2 or height < 2:
        raise ValueError(f"image size {width}x{height} is too small; use at least 2x2")
    light = lighting or LIGHTINGS["day"]
    cx, cy = float(east - city.origin_east), float(north - city.origin_north)
    hd = math.radians(float(heading_deg))
    fx, fy = math.sin(hd), math.cos(hd)
    focal = (width / 2) / math.tan(math.radians(FOV_DEG) / 2)
    hz = height / 2
    slope = ((np.arange(width, dtype=f32) + 0.5) - width / 2) / f32(focal)
    dx = (f32(fx) + slope * f32(fy)).astype(f32)
    dy = (f32(fy) - slope * f32(fx)).astype(f32)
    rows = np.arange(height, dtype=f32) + 0.5

    t_k, e_k, u_k = _cast_walls(city.edges, cx, cy, fx, fy, dx, dy)
    finite = np.isfinite(t_k)
    safe_t = np.where(finite, t_k, f32(1.0))
    wall_h = city.buildings.height[city.edges.building[e_k]]
    top = np.where(finite, hz - focal * (wall_h - CAMERA_HEIGHT) / safe_t, hz)
    bottom = np.where(finite, hz + focal * CAMERA_HEIGHT / safe_t, hz)
    layer = np.full((height, width), LAYERS, np.int8)
    for k in range(LAYERS - 1, -1, -1):
        layer[(rows[:, None] >= top[k]) & (rows[:, None] < bottom[k])] = k

    img = np.empty((height, width, 3), f32)
    depth = np.full((height, width), np.inf, f32)

    pr, pc = np.nonzero(layer < LAYERS)
    if pr.size:
        lk = layer[pr, pc]
        t = t_k[lk, pc]
        v = CAMERA_HEIGHT + (hz - rows[pr]) * t / f32(focal)
        col = _facade(city, e_k[lk, pc], u_k[lk, pc], v, light)
        img[pr, pc] = fog(col, t, light)
        depth[pr, pc] = t

    empty = layer == LAYERS
    pr, pc = np.nonzero(empty & (rows[:, None] > hz))
    if pr.size:
        t = f32(focal * CAMERA_HEIGHT) / (rows[pr] - f32(hz))
        col = _ground(city, f32(cx) + t * dx[pc], f32(cy) + t * dy[pc], t, light)
        img[pr, pc] = fog(col, t, light)
        depth[pr, pc] = t

    pr, pc = np.nonzero(empty & (rows[:, None] <= hz))
    if pr.size:
        az = f32(hd) + np.arctan(slope)
        img[pr, pc] = _sky(city, (f32(hz) - rows[pr]) / f32(hz), az[pc], light)

    sprites = city.sprites if occluders is None else city.sprites.concat(occluders)
    _draw_sprites(img, depth, sprites, cx, cy, fx, fy, focal, hz, light, t_k[0], top[0])

    img *= f32(light.brightness) * np.asarray(light.tint, f32)
    np.clip(img, 0.0, 1.0, out=img)
    if light.gamma != 1.0:
        np.power(img, f32(light.gamma), out=img)
    return (img * 255.0 + 0.5).astype(np.uint8)
