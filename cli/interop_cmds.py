"""`vpr pairs` and `vpr export-features`: retrieval results and global descriptors for hloc, COLMAP and kapture."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import DEVICE, INT32_MAX, JSON, console, device_of, print_json, progress_bar, warn_random_init
from cli.retrieval_cmds import DEFAULT_INDEX
from vpr import api

ROOT = typer.Option(None, "--root", help="Folder the image names are relative to (default: the deepest folder holding the queries and the database), as hloc, COLMAP and kapture expect.")


def pairs_cmd(
    queries: Path = typer.Argument(..., help="Query images: a folder, a CSV manifest or a video."),
    index: Path = typer.Option(DEFAULT_INDEX, "--index", "-i", help="Index directory from `vpr build-index`."),
    num_matched: int = typer.Option(20, "--num-matched", "-k", min=1, max=INT32_MAX, help="Database images paired with each query (its top K)."),
    fmt: str = typer.Option("hloc", "--format", help="hloc or colmap (`query db` lines: hloc's pairs-from-retrieval file, COLMAP's custom match list) or kapture (a pairsfile with scores)."),
    out: Path = typer.Option(..., "--out", "-o", help="Pairs file to write."),
    root: Optional[Path] = ROOT,
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Leave out pairs whose similarity is below this (hloc's pairs_from_retrieval drops negatives: 0)."),
    device: str = DEVICE, json_out: bool = JSON,
) -> None:
    """Retrieval pairs for the SfM tools: each query's top-K database images, as hloc, COLMAP or kapture read them."""
    with progress_bar("describing the queries", enabled=not json_out) as progress:
        summary = api.pairs(queries, index, out, num_matched=num_matched, fmt=fmt, root=root, device=device_of(device),
                            min_score=min_score, progress=progress)
    warn_random_init(summary["random_init"], str(index))
    if json_out:
        print_json(summary)
        return
    console.print(f"{summary['pairs']} pairs of {summary['queries']} queries ({fmt}) written to {out}; names relative to "
                  f"{summary['root']}")


def export_features_cmd(
    source: Path = typer.Argument(..., help="An index directory (its database's descriptors) or images to describe with --index."),
    fmt: str = typer.Option("hloc", "--format", help="hloc (global-feats .h5: one group per image with global_descriptor), kapture (reconstruction/global_features under --out) or npy (.npz of names and descriptors)."),
    out: Path = typer.Option(..., "--out", "-o", help="File (.h5, .npz) or kapture folder to write."),
    index: Optional[Path] = typer.Option(None, "--index", "-i", help="With images as SOURCE: the index whose model describes them (in its space)."),
    root: Optional[Path] = ROOT, device: str = DEVICE, json_out: bool = JSON,
) -> None:
    """Global descriptors for the SfM tools (hloc's pairs_from_retrieval, kapture's image pairs), one per image name."""
    with progress_bar("describing the images", enabled=not json_out) as progress:
        summary = api.export_features(source, out, fmt=fmt, index=index, root=root, device=device_of(device), progress=progress)
    warn_random_init(summary["random_init"], str(index or source))
    if json_out:
        print_json(summary)
        return
    console.print(f"{summary['images']} descriptors ({summary['dim']}-d, {fmt}) written to {summary['out']}; names relative "
                  f"to {summary['root']}")
