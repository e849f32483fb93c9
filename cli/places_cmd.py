"""`vpr places`: group located images into places for place-batch training (a GSV-Cities-style CSV)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import JSON, console, print_json
from vpr import api


def places_cmd(
    data: Path = typer.Argument(..., help="Located images: a folder (`@` names or EXIF GPS) or a CSV manifest."),
    out: Path = typer.Option(..., "--out", "-o", help="The places CSV to write (GSV-Cities columns plus the image path); replaced only if vpr wrote it."),
    radius: float = typer.Option(10.0, "--radius", min=0.01, max=1e6, help="Images within this many metres of a place's first image join it."),
    heading: Optional[float] = typer.Option(None, "--heading", min=0.01, max=180, help="... and within this many degrees of its heading (default: any heading)."),
    min_images: int = typer.Option(4, "--min-images", min=2, max=100_000, help="Places with fewer images are left out (K of a P x K batch)."),
    spacing: float = typer.Option(25.0, "--spacing", min=0.01, max=1e7, help="Kept places are at least this many metres apart (largest first), so a batch never holds two that look the same."),
    map_png: Optional[Path] = typer.Option(None, "--map", help="Also draw the places as a PNG (left-out images in grey)."),
    json_out: bool = JSON,
) -> None:
    """Make places from GPS: images grouped by position (and heading), for `vpr train` with place batches."""
    report = api.places(data, out, radius=radius, heading=heading, min_images=min_images, spacing=spacing, map_png=map_png)
    if json_out:
        print_json(report)
        return
    console.print(f"{report['places']} places from {report['kept']} of {report['images']} images -> {report['out']}")
    for why, count in report["left_out"].items():
        console.print(f"  left out: {count} images {why}")
    if report["map"]:
        console.print(f"map written to {report['map']}")
