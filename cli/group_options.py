"""CosPlace's class-group options, declared once for `vpr train --method cosplace` and `vpr groups`; the
defaults are `GroupParams`'."""

from __future__ import annotations

import typer

from cli.common import DEGREES, INT32_MAX, MAX_SPACING, POSITIVE
from vpr.api import GroupParams

CELL_M = typer.Option(GroupParams.M, "--M", callback=POSITIVE, help="[cosplace] Class cell side in metres.")
ALPHA = typer.Option(GroupParams.alpha, "--alpha", callback=DEGREES, help="[cosplace] Class heading sector in degrees.")
CELL_N = typer.Option(GroupParams.N, "--N", min=1, max=MAX_SPACING, help="[cosplace] Group spacing in cells: same-group classes are >= M*(N-1) m apart.")
SECTOR_L = typer.Option(GroupParams.L, "--L", min=1, max=360, help="[cosplace] Group spacing in heading sectors (1 ignores heading for grouping).")
MIN_IMAGES = typer.Option(GroupParams.min_images_per_class, "--min-images-per-class", min=1, max=INT32_MAX, help="[cosplace] Drop classes with fewer images.")


def group_params(cell_m: float, alpha: float, cell_n: int, sector_l: int, min_images_per_class: int) -> GroupParams:
    """The `GroupParams` the group options give."""
    return GroupParams(M=cell_m, alpha=alpha, N=cell_n, L=sector_l, min_images_per_class=min_images_per_class)
