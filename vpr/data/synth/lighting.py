"""The synthetic city's light: time of day and weather (`Lighting`, the named `LIGHTINGS`), fog, and the integer
hash that textures facades, ground and sprites without storing them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

f32 = np.float32
Colour = tuple[float, float, float]


@dataclass(frozen=True)
class Lighting:
    """Time of day and weather: sky, sun, fog, lit windows and a global exposure, colour tint and gamma."""

    brightness: float = 1.0
    gamma: float = 1.0
    tint: Colour = (1.0, 1.0, 1.0)
    sky_zenith: Colour = (0.30, 0.50, 0.85)
    sky_horizon: Colour = (0.72, 0.82, 0.93)
    fog_colour: Colour = (0.74, 0.80, 0.88)
    fog_distance: float = 150.0
    sun_azimuth: float = 150.0
    ambient: float = 0.62
    direct: float = 0.45
    clouds: float = 0.35
    cloud_colour: Colour = (0.96, 0.96, 0.98)
    lit_windows: float = 0.03


LIGHTINGS: dict[str, Lighting] = {
    "day": Lighting(),
    "morning": Lighting(
        brightness=1.05, tint=(1.06, 1.0, 0.88), sky_zenith=(0.40, 0.55, 0.80), sky_horizon=(0.95, 0.84, 0.70),
        fog_colour=(0.90, 0.84, 0.76), fog_distance=120.0, sun_azimuth=95.0, ambient=0.55, direct=0.55,
        clouds=0.2, cloud_colour=(1.0, 0.9, 0.8),
    ),
    "overcast": Lighting(
        brightness=0.9, gamma=0.95, tint=(0.96, 0.98, 1.03), sky_zenith=(0.62, 0.64, 0.68),
        sky_horizon=(0.80, 0.81, 0.83), fog_colour=(0.76, 0.77, 0.79), fog_distance=95.0, ambient=0.88,
        direct=0.05, clouds=0.9, cloud_colour=(0.70, 0.71, 0.74), lit_windows=0.06,
    ),
    "dusk": Lighting(
        brightness=0.7, gamma=1.1, tint=(1.12, 0.92, 0.80), sky_zenith=(0.16, 0.17, 0.38),
        sky_horizon=(0.98, 0.55, 0.32), fog_colour=(0.55, 0.42, 0.42), fog_distance=115.0, sun_azimuth=265.0,
        ambient=0.58, direct=0.22, clouds=0.45, cloud_colour=(0.85, 0.45, 0.40), lit_windows=0.45,
    ),
}


def hash_ints(*keys: np.ndarray) -> np.ndarray:
    """Integer hash of integer arrays (broadcast together) to uint32."""
    h = np.uint32(0x9E3779B9) * np.ones(np.broadcast_shapes(*(np.shape(k) for k in keys)), np.uint32)
    for k in keys:
        k32 = np.asarray(k).astype(np.int64).astype(np.uint32)
        h = h ^ (k32 + np.uint32(0x9E3779B9) + (h << np.uint32(6)) + (h >> np.uint32(2)))
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x7FEB352D)
    h = h ^ (h >> np.uint32(15))
    h = h * np.uint32(0x846CA68B)
    return h ^ (h >> np.uint32(16))


def unit(h: np.ndarray) -> np.ndarray:
    """uint32 hashes -> uniform floats in [0, 1)."""
    return (h >> np.uint32(8)).astype(f32) * f32(1.0 / (1 << 24))


def fog(col: np.ndarray, t: np.ndarray, light: Lighting) -> np.ndarray:
    """Colours `col` seen at distances `t` through the lighting's fog."""
    a = (1.0 - np.exp(-t / f32(light.fog_distance)))[:, None]
    return col * (1.0 - a) + np.asarray(light.fog_colour, f32) * a
