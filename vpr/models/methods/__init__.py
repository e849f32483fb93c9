"""The published methods vpr implements, one module each under `vpr.models`, collected in one place:
their heads (`--head`), extra backbones, checkpoint layouts, and the stand-in classes (`PICKLE_GLOBALS`,
(class, pickled name) pairs) that let `torch.load(weights_only=True)` read a published file's
non-tensor data without running its library's code."""

from __future__ import annotations

from importlib import import_module

from vpr.models.registry import Backbone, Head, Layout

MODULES: tuple[str, ...] = ("mixvpr", "convap", "boq", "cricavpr", "qaa", "salad", "megaloc", "supervlad", "anyloc", "sfrs", "apgem", "edtformer")


def _collect(attribute: str) -> list:
    """Every record of `attribute` (HEADS, BACKBONES or LAYOUTS) over the method modules, in order."""
    return [item for module in MODULES for item in getattr(import_module(f"vpr.models.methods.{module}"), attribute, ())]


HEADS: dict[str, Head] = {head.name: head for head in _collect("HEADS")}
BACKBONES: dict[str, Backbone] = {backbone.name: backbone for backbone in _collect("BACKBONES")}
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in _collect("LAYOUTS")}
PICKLE_GLOBALS: list = _collect("PICKLE_GLOBALS")
