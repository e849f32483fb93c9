"""`vpr build-index`, `vpr query` and `vpr eval`."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from cli.common import (
    AMP_HELP, COMPILE_HELP, EF_SEARCH_HELP, INT32_MAX, MAX_BATCH, MAX_CLUSTERS, MAX_DIM, MAX_EF_SEARCH, MAX_WORKERS,
    GPU_DECODE_HELP, NPROBE_HELP, POSITIVE, check_output_file, console, err_console, extract_options, parse_int_list,
    parse_size, print_json, progress_bar,
)
from vpr.data.datasets import load_image_set
from vpr.data.geo import utm_to_latlon
from vpr.errors import UsageError
from vpr.evaluation.evaluate import evaluate
from vpr.evaluation.viz import save_matches_figure
from vpr.models.model import ModelConfig
from vpr.retrieval.pipeline import Match, build_index, cache_dir_for, describe, load_model, retrieve
from vpr.retrieval.store import load_index

DEFAULT_INDEX = Path("indexes/default")


def build_index_cmd(
    database: Path = typer.Argument(..., help="Folder of database images (`@utm_east@utm_north@...` names or unlabelled), or a CSV manifest path,lat,lon[,heading]."),
    out: Path = typer.Option(DEFAULT_INDEX, "--out", "-o", help="Index directory to write (replaced atomically if it exists)."),
    backbone: str = typer.Option("resnet18", "--model", "--backbone", help="Backbone when no checkpoint is given: resnet18, resnet50, resnet101, vgg16."),
    head: str = typer.Option("cosplace", "--head", help="Head when no checkpoint is given: cosplace (GeM + FC) or netvlad."),
    dim: int = typer.Option(512, "--dim", min=1, max=MAX_DIM, help="CosPlace descriptor size when no checkpoint is given."),
    clusters: int = typer.Option(64, "--clusters", min=2, max=MAX_CLUSTERS, help="NetVLAD cluster count when no checkpoint is given."),
    layer: int = typer.Option(4, "--layer", min=3, max=4, help="ResNet stage to cut after (4, or 3)."),
    resize: Optional[str] = typer.Option(None, "--resize", help="Input size HEIGHTxWIDTH: 240x320 for a new model by default; with --checkpoint it overrides the stored size (published checkpoints default to 480x640)."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="torchvision ImageNet weights: a name (IMAGENET1K_V1: downloaded once into the torch hub cache, offline after that) or a local .pth file."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="A vpr checkpoint (from `vpr train`) or a published CosPlace/EigenPlaces/NetVLAD/benchmark .pth (see `vpr models`); its architecture overrides the model options."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Checkpoint layout: auto (default: detected from the keys), vpr, cosplace (also EigenPlaces), netvlad (pytorch-NetVlad, Patch-NetVLAD) or benchmark."),
    pca_dim: Optional[int] = typer.Option(None, "--pca-dim", min=1, max=MAX_DIM, help="Compress descriptors to D dimensions with PCA fitted on the database."),
    whiten: bool = typer.Option(False, "--whiten/--no-whiten", help="Whiten the PCA (as NetVLAD's WPCA)."),
    kind: str = typer.Option("flat", "--index", help="FAISS index: flat (exact inner product), ivfpq or hnsw (approximate, for large databases)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, max=MAX_BATCH, help="Images per forward pass."),
    workers: int = typer.Option(2, "--workers", min=0, max=MAX_WORKERS, help="DataLoader worker processes for decoding images."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    amp: bool = typer.Option(False, "--amp/--no-amp", help=AMP_HELP),
    compile_model: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    gpu_decode: bool = typer.Option(False, "--gpu-decode", help=GPU_DECODE_HELP),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Keep descriptors in OUT.cache/ so an interrupted or repeated build resumes."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images (listed in OUT/skipped.txt) instead of stopping at the first."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Build a self-contained index (model, PCA, FAISS index, database metadata) from database images."""
    if checkpoint is not None:
        model, model_pca = load_model(checkpoint, ModelConfig(), fmt=fmt)
        if resize is not None:
            model.config = replace(model.config, input_size=parse_size(resize))
    elif fmt is not None:
        raise UsageError("--format describes a --checkpoint file; give --checkpoint FILE or drop --format")
    else:
        config = ModelConfig(backbone=backbone, head=head, descriptor_dim=dim, num_clusters=clusters, layer=layer, input_size=parse_size(resize or "240x320"))
        model, model_pca = load_model(None, config, pretrained)
    options = extract_options(device, batch_size=batch_size, workers=workers, amp=amp, compile_model=compile_model,
                              gpu_decode=gpu_decode, skip_bad=skip_bad)
    images = load_image_set(database)
    start = time.perf_counter()
    cache_path = cache_dir_for(out) if cache else None
    with progress_bar(f"indexing {len(images)} images", enabled=not json_out) as progress:
        report = build_index(
            images, out, model=model, model_pca=model_pca, pca_dim=pca_dim, pca_whiten=whiten, kind=kind,
            options=options, cache=cache_path, progress=progress,
        )
    seconds = time.perf_counter() - start
    skipped_file = report.out_dir / "skipped.txt"
    summary = {
        "index": str(report.out_dir), "images": len(images), "indexed": report.count, "skipped": len(report.skipped),
        "reused_from_cache": report.reused, "dim": report.dim, "index_kind": kind, "seconds": round(seconds, 2),
        "skipped_report": str(skipped_file) if report.skipped else None,
    }
    if json_out:
        print_json(summary)
        return
    console.print(
        f"indexed {report.count} of {len(images)} images ({len(report.skipped)} skipped, {report.reused} from cache) "
        f"-> {report.out_dir} [{report.dim}-d, {kind}] in {seconds:.1f}s"
    )
    if report.skipped:
        console.print(f"skipped files are listed in {skipped_file}")


def _match_json(match: Match, zone: tuple[int, str] | None) -> dict:
    data = {"rank": match.rank, "path": str(match.path), "distance": round(match.distance, 6),
            "similarity": round(match.similarity, 6), "utm_east": None, "utm_north": None,
            "lat": None, "lon": None, "heading": match.heading}
    if match.utm is not None:
        data["utm_east"], data["utm_north"] = match.utm
        if zone is not None:
            data["lat"], data["lon"] = utm_to_latlon(match.utm[0], match.utm[1], zone[0], zone[1])
    return data


def query_cmd(
    images: list[Path] = typer.Argument(..., help="Query image(s)."),
    index: Path = typer.Option(DEFAULT_INDEX, "--index", "-i", help="Index directory from `vpr build-index`."),
    k: int = typer.Option(5, "-k", "--top-k", max=INT32_MAX, help="Number of matches per query."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    amp: bool = typer.Option(False, "--amp/--no-amp", help=AMP_HELP),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", min=1, max=INT32_MAX, help=NPROBE_HELP),
    ef_search: Optional[int] = typer.Option(None, "--ef-search", min=1, max=MAX_EF_SEARCH, help=EF_SEARCH_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print matches as JSON."),
    viz: Optional[Path] = typer.Option(None, "--viz", help="Save a PNG of each query beside its matches."),
) -> None:
    """Find where photos were taken: print the top-k database matches with distance and position."""
    if k < 1:
        raise UsageError(f"-k {k}: must be at least 1")
    check_output_file(viz, "--viz")
    bundle = load_index(index)
    bundle.set_search_params(nprobe=nprobe, ef_search=ef_search)
    options = extract_options(device, workers=0, amp=amp)
    results = retrieve(bundle, describe(bundle, list(images), options), k, device=options.device)
    zone = bundle.database.zone
    if json_out:
        print_json([{"query": str(q), "matches": [_match_json(m, zone) for m in ms]} for q, ms in zip(images, results)])
    else:
        for query, matches in zip(images, results):
            table = Table(title=Text(str(query)), title_justify="left")
            for column in ("rank", "file", "distance", "utm east", "utm north", "lat, lon"):
                table.add_column(column, overflow="fold")  # a narrow terminal folds file names, never cuts them to "…"
            for m in matches:
                data = _match_json(m, zone)
                position = ("", "") if m.utm is None else (f"{m.utm[0]:.1f}", f"{m.utm[1]:.1f}")
                latlon = "" if data["lat"] is None else f"{data['lat']:.6f}, {data['lon']:.6f}"
                table.add_row(str(m.rank), Text(m.path.name), f"{m.distance:.4f}", *position, latlon)
            console.print(table)
        if k > len(bundle.database):
            err_console.print(f"note: -k {k} is larger than the database ({len(bundle.database)} images); showed all")
    if viz is None:
        return
    rows = [(q, [(m.path, f"#{m.rank} d={m.distance:.3f}", None) for m in matches]) for q, matches in zip(images, results)]
    figure = save_matches_figure(rows, viz)  # after the results: an unwritable --viz loses no answer
    if figure.missing:
        count = len(figure.missing)
        err_console.print(f"note: {count} database image{'s' if count > 1 else ''} unreadable, drawn as grey 'missing' "
                          f"tiles in {viz}; first: {figure.missing[0][1]}", soft_wrap=True)
    if not json_out:
        console.print(f"visualisation written to {viz}")


def eval_cmd(
    queries: Path = typer.Argument(..., help="Folder of query images (`@` names) or a CSV manifest; with --gt, any folder."),
    index: Path = typer.Option(DEFAULT_INDEX, "--index", "-i", help="Index directory from `vpr build-index`."),
    recall: str = typer.Option("1,5,10,20", "--recall", help="Comma-separated N values for recall@N."),
    threshold: float = typer.Option(25.0, "--threshold", callback=POSITIVE, help="A database image within this many metres of a query is a positive."),
    gt: Optional[Path] = typer.Option(None, "--gt", help="Ground-truth CSV `query,positives` (space-separated database names or indices) instead of coordinates."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    workers: int = typer.Option(2, "--workers", min=0, max=MAX_WORKERS, help="DataLoader worker processes for decoding images."),
    amp: bool = typer.Option(False, "--amp/--no-amp", help=AMP_HELP),
    compile_model: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    gpu_decode: bool = typer.Option(False, "--gpu-decode", help=GPU_DECODE_HELP),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", min=1, max=INT32_MAX, help=NPROBE_HELP),
    ef_search: Optional[int] = typer.Option(None, "--ef-search", min=1, max=MAX_EF_SEARCH, help=EF_SEARCH_HELP),
    json_out: bool = typer.Option(False, "--json", help="Print the recalls as JSON."),
) -> None:
    """Recall@N of an index on labelled queries (standard protocol: hit = a positive in the top N)."""
    ns = parse_int_list(recall, "--recall")
    if not (math.isfinite(threshold) and threshold > 0):  # the option's callback refuses these first; kept for direct calls
        raise UsageError(f"--threshold {threshold}: must be a positive number of metres, e.g. 25")
    if gt is not None and not gt.is_file():
        raise UsageError(f"--gt {gt}: file not found")
    bundle = load_index(index)
    bundle.set_search_params(nprobe=nprobe, ef_search=ef_search)
    query_set = load_image_set(queries)
    options = extract_options(device, workers=workers, amp=amp, compile_model=compile_model, gpu_decode=gpu_decode)
    with progress_bar(f"evaluating {len(query_set)} queries", enabled=not json_out) as progress:
        report = evaluate(bundle, query_set, ns=ns, gt=gt, threshold=threshold, options=options, progress=progress)
    summary = {
        "index": str(index), "queries": report.num_queries, "queries_with_positives": report.num_with_positives,
        "database": len(bundle.database), "threshold_m": None if gt else threshold, "ground_truth": str(gt) if gt else None,
        "recall": {f"R@{n}": round(v, 2) for n, v in report.recalls.items()},
    }
    if json_out:
        print_json(summary)
        return
    print_recall_table(summary)


def print_recall_table(summary: dict, title: str = "recall") -> None:
    """The recall@N table shared by `eval` and `demo`, with the query and database counts."""
    console.print(f"{title}: {summary['queries']} queries ({summary['queries_with_positives']} with a positive), "
                  f"{summary['database']} database images")
    table = Table()
    for name in summary["recall"]:
        table.add_column(name, justify="right")
    table.add_row(*(f"{v:.1f}" for v in summary["recall"].values()))
    console.print(table)
