"""Deterministic synthetic demo city: procedural geo-tagged street views for demos and tests."""

from vpr.data.synth.city import City, Sprites, make_city, make_sprites
from vpr.data.synth.generate import PRESETS, SynthPreset, build_city, generate_city, get_preset
from vpr.data.synth.preview import save_preview
from vpr.data.synth.render import LIGHTINGS, Lighting, render_view

__all__ = [
    "LIGHTINGS", "PRESETS", "City", "Lighting", "Sprites", "SynthPreset", "build_city", "generate_city",
    "get_preset", "make_city", "make_sprites", "render_view", "save_preview",
]
