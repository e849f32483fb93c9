"""`vpr groups`: show how CosPlace would cut a dataset's training images into classes and groups."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.common import check_output_file, console, print_json
from cli.group_options import ALPHA, CELL_M, CELL_N, MIN_IMAGES, SECTOR_L, group_params
from vpr import api


def groups_cmd(
    dataset: Path = typer.Argument(..., help="Dataset root (its images/train split is used), or any folder of `@`-named images or CSV manifest."),
    cell_m: float = CELL_M, alpha: float = ALPHA, cell_n: int = CELL_N, sector_l: int = SECTOR_L,
    min_images_per_class: int = MIN_IMAGES,
    cache: Optional[Path] = typer.Option(None, "--cache", help="HDF5 file to reuse (rebuilt when the images or parameters change)."),
    map_png: Optional[Path] = typer.Option(None, "--map", help="Save a PNG map of the classes coloured by group (grey: dropped images)."),
    map_size: int = typer.Option(1024, "--map-size", min=64, max=16384, help="Width/height in pixels of the map's plot area."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Print the number of classes per CosPlace group and the images dropped; optionally draw a map."""
    check_output_file(map_png, "--map")
    params = group_params(cell_m, alpha, cell_n, sector_l, min_images_per_class)
    summary = api.groups(dataset, params, cache=cache, map_png=map_png, map_size=map_size)
    if json_out:
        print_json({key: value for key, value in summary.items() if key != "max_groups"})
        return
    table = Table(title=f"{summary['source']}: {summary['classes']} classes in {summary['groups']} of {summary['max_groups']} possible groups")
    for column in ("group", "(east, north, heading) residue", "classes", "images"):
        table.add_column(column)
    for g in range(summary["groups"]):
        table.add_row(str(g), str(tuple(summary["group_ids"][g])), str(summary["classes_per_group"][g]), str(summary["images_per_group"][g]))
    console.print(table)
    console.print(
        f"{summary['dropped_images']} of {summary['images']} images dropped (classes with fewer than {min_images_per_class} images)"
        + ("" if summary["uses_heading"] else "; no headings, classes by position only")
    )
    if map_png is not None:
        console.print(f"map: {map_png}")
