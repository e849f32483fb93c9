"""`vpr groups`: show how CosPlace would cut a dataset's training images into classes and groups."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.common import DEGREES, INT32_MAX, MAX_SPACING, POSITIVE, check_output_file, console, print_json
from vpr.data.datasets import find_split, load_image_set
from vpr.training.cosplace_groups import build_groups, save_group_map
from vpr.training.config import GroupParams


def _train_images(dataset: Path) -> Path:
    """A dataset root's train split, or the folder/CSV itself when it has no split layout."""
    return (find_split(dataset, "train") if dataset.is_dir() else None) or dataset


def groups_cmd(
    dataset: Path = typer.Argument(..., help="Dataset root (its images/train split is used), or any folder of `@`-named images or CSV manifest."),
    cell_m: float = typer.Option(10.0, "--M", callback=POSITIVE, help="Class cell side in metres."),
    alpha: float = typer.Option(30.0, "--alpha", callback=DEGREES, help="Class heading sector in degrees."),
    cell_n: int = typer.Option(5, "--N", min=1, max=MAX_SPACING, help="Group spacing in cells: same-group classes are >= M*(N-1) m apart."),
    sector_l: int = typer.Option(2, "--L", min=1, max=360, help="Group spacing in heading sectors (1 ignores heading for grouping)."),
    min_images_per_class: int = typer.Option(10, "--min-images-per-class", min=1, max=INT32_MAX, help="Drop classes with fewer images."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="HDF5 file to reuse (rebuilt when the images or parameters change)."),
    map_png: Optional[Path] = typer.Option(None, "--map", help="Save a PNG map of the classes coloured by group (grey: dropped images)."),
    map_size: int = typer.Option(1024, "--map-size", min=64, max=16384, help="Width/height in pixels of the map's plot area."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Print the number of classes per CosPlace group and the images dropped; optionally draw a map."""
    check_output_file(map_png, "--map")
    source = _train_images(dataset)
    images = load_image_set(source)
    params = GroupParams(M=cell_m, alpha=alpha, N=cell_n, L=sector_l, min_images_per_class=min_images_per_class)
    groups = build_groups(images, params, cache=cache)
    if map_png is not None:
        save_group_map(groups, images, map_png, size=map_size)
    summary = {"source": str(source), **groups.summary(), "map": str(map_png) if map_png else None}
    if json_out:
        print_json(summary)
        return
    table = Table(title=f"{source}: {groups.num_classes} classes in {groups.num_groups} of {params.max_groups} possible groups")
    for column in ("group", "(east, north, heading) residue", "classes", "images"):
        table.add_column(column)
    for g in range(groups.num_groups):
        table.add_row(str(g), str(tuple(summary["group_ids"][g])), str(summary["classes_per_group"][g]), str(summary["images_per_group"][g]))
    console.print(table)
    console.print(
        f"{groups.dropped_images} of {len(images)} images dropped (classes with fewer than {min_images_per_class} images)"
        + ("" if groups.uses_heading else "; no headings, classes by position only")
    )
    if map_png is not None:
        console.print(f"map: {map_png}")
