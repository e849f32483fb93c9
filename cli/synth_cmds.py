"""`vpr synth` (the procedural demo city) and `vpr demo` (synth -> index -> eval -> picture)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.common import DEVICE, JSON, SEED_MAX, console, device_of, phase_bar, print_json, progress_bar, warn_random_init
from cli.eval_cmd import print_recall_table
from vpr import api


def synth_cmd(
    out: Path = typer.Argument(..., help="Dataset folder to create (ROOT/images/{train,val,test}/{database,queries})."),
    preset: str = typer.Option("small", "--preset", help=f"Size preset: {', '.join(api.SYNTH_PRESETS)}."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Random seed; the same seed gives the same bytes."),
    preview: Optional[Path] = typer.Option(None, "--preview", help="Also save a contact sheet PNG (database images beside their queries)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Render a deterministic geo-tagged synthetic city in the VPR-datasets layout."""
    with progress_bar(f"rendering '{preset}' city", enabled=not json_out) as progress:
        summary = api.synth(out, preset=preset, seed=seed, preview=preview, progress=progress)
    if json_out:
        print_json({"out": str(out), "preview": str(preview) if preview else None, **summary})
        return
    console.print(f"wrote {out} ({summary})")
    if preview is not None:
        console.print(f"contact sheet: {preview}")


def demo_cmd(
    workdir: Path = typer.Option(Path("."), "--workdir", help="Where data/demo-city and indexes/demo go."),
    preset: str = typer.Option("small", "--preset", help="Synthetic city preset."),
    device: str = DEVICE, json_out: bool = JSON,
) -> None:
    """The whole path on the built-in city: synthesise, build an index, evaluate, draw matches."""
    with phase_bar(enabled=not json_out) as progress:
        summary = api.demo(workdir, preset=preset, device=device_of(device), progress=progress)
    warn_random_init(summary.get("random_init", False), "the demo's index")
    if json_out:
        print_json(summary)
        return
    print_recall_table(summary, title="demo city (test split)")
    console.print(f"matches drawn in {summary['visualisation']}; took {summary['seconds']}s")
