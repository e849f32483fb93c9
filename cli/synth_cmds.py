"""`vpr synth` (the procedural demo city) and `vpr demo` (synth -> index -> eval -> picture)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from cli.common import SEED_MAX, console, extract_options, print_json, progress_bar
from cli.retrieval_cmds import print_recall_table
from vpr.data.datasets import load_split
from vpr.data.synth import PRESETS, generate_city, get_preset, save_preview
from vpr.evaluation.evaluate import evaluate
from vpr.evaluation.viz import save_matches_figure
from vpr.models.model import ModelConfig, build_model
from vpr.retrieval.build import build_index
from vpr.retrieval.store import load_index


def synth_cmd(
    out: Path = typer.Argument(..., help="Dataset folder to create (ROOT/images/{train,val,test}/{database,queries})."),
    preset: str = typer.Option("small", "--preset", help=f"Size preset: {', '.join(PRESETS)}."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Random seed; the same seed gives the same bytes."),
    preview: Optional[Path] = typer.Option(None, "--preview", help="Also save a contact sheet PNG (database images beside their queries)."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Render a deterministic geo-tagged synthetic city in the VPR-datasets layout."""
    with progress_bar(f"rendering '{preset}' city", enabled=not json_out) as progress:
        summary = generate_city(out, preset=preset, seed=seed, progress=progress)
    if preview is not None:
        save_preview(out, preview)
    if json_out:
        print_json({"out": str(out), "preview": str(preview) if preview else None, **summary})
        return
    console.print(f"wrote {out} ({summary})")
    if preview is not None:
        console.print(f"contact sheet: {preview}")


def demo_cmd(
    workdir: Path = typer.Option(Path("."), "--workdir", help="Where data/demo-city and indexes/demo go."),
    preset: str = typer.Option("small", "--preset", help="Synthetic city preset."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """The whole path on the built-in city: synthesise, build an index, evaluate, draw matches."""
    spec = get_preset(preset)
    start = time.perf_counter()
    dataset = workdir / "data" / f"demo-city-{preset}"
    index_dir = workdir / "indexes" / f"demo-{preset}"
    viz = workdir / "indexes" / f"demo-{preset}-matches.png"
    options = extract_options(device)
    if not dataset.exists():
        with progress_bar("rendering demo city", enabled=not json_out) as progress:
            generate_city(dataset, preset=preset, seed=0, progress=progress)
    database, queries = load_split(dataset, "test")
    model = build_model(ModelConfig(input_size=(spec.height, spec.width)), seed=0)  # native resolution
    with progress_bar(f"indexing {len(database)} images", enabled=not json_out) as progress:
        build_index(database, index_dir, model=model, options=options, progress=progress)
    bundle = load_index(index_dir)
    with progress_bar(f"evaluating {len(queries)} queries", enabled=not json_out) as progress:
        report = evaluate(bundle, queries, options=options, progress=progress)
    rows = []
    for q in range(min(4, len(queries))):
        matches = [(bundle.database.paths[i], f"#{r + 1}", bool(i in report.positives[q]))
                   for r, i in enumerate(report.predictions[q][:4])]
        rows.append((queries.paths[q], matches))
    save_matches_figure(rows, viz)
    summary = {
        "dataset": str(dataset), "index": str(index_dir), "queries": report.num_queries,
        "queries_with_positives": report.num_with_positives, "database": len(database),
        "recall": {f"R@{n}": round(v, 2) for n, v in report.recalls.items()},
        "visualisation": str(viz), "seconds": round(time.perf_counter() - start, 1),
    }
    if json_out:
        print_json(summary)
        return
    print_recall_table(summary, title="demo city (test split)")
    console.print(f"matches drawn in {viz}; took {summary['seconds']}s")
