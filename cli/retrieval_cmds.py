"""`vpr build-index` and `vpr query`: parse the flags, call `vpr.api`, print."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from cli.answer_options import (
    CAUSAL, POSITION_K, POSITION_RADIUS, QE, QE_ALPHA, RERANK, RERANK_K, SEQUENCE, SPEEDS, WINDOW, answer_options,
)
from cli.common import (
    AMP, BACKEND, BATCH_SIZE, COMPILE, DEVICE, EF_SEARCH_HELP, GPU_DECODE, INT32_MAX, JSON, MAX_BATCH, MAX_CLUSTERS, MAX_DIM,
    MAX_EF_SEARCH, NPROBE_HELP, WORKERS, check_output_file, console, device_of, distributed_run, err_console,
    extract_options, parse_resize, print_json, progress_bar, warn_random_init,
)
from cli.source_options import (
    BENCHMARK, FPS, ROOT, SAVE_FRAMES, SKIP_UNLOCATED, TRACK, TRACK_OFFSET, VIDEO_START, benchmark_source, load_source,
    video_options,
)
from vpr import api
from vpr.errors import UsageError

DEFAULT_INDEX = Path("indexes/default")


def build_index_cmd(
    database: Optional[Path] = typer.Argument(None, help="Folder of database images (`@utm_east@utm_north@...` names, EXIF GPS, or unlabelled), a CSV manifest path,lat,lon[,heading], or a video (--fps, --track); none with --benchmark."),
    out: Path = typer.Option(DEFAULT_INDEX, "--out", "-o", help="Index directory to write (replaced atomically if it exists)."),
    backbone: str = typer.Option("resnet18", "--model", "--backbone", help="Backbone when no checkpoint is given: resnet18, resnet50, resnet101, vgg16, pixels (no weights: grey thumbnails, with --head patchnorm), or a DINOv2 ViT (dinov2_vits14 ... dinov2_vitg14); `vpr models` lists all."),
    head: str = typer.Option("cosplace", "--head", help="Head when no checkpoint is given: cosplace (GeM + FC), netvlad, patchnorm (SeqSLAM's thumbnail, with --model pixels), or a published method's aggregator (salad, megaloc, boq, mixvpr, ...: `vpr models`)."),
    descriptor_dim: int = typer.Option(512, "--dim", min=1, max=MAX_DIM, help="CosPlace descriptor size when no checkpoint is given."),
    num_clusters: int = typer.Option(64, "--clusters", min=2, max=MAX_CLUSTERS, help="NetVLAD cluster count when no checkpoint is given."),
    layer: int = typer.Option(4, "--layer", min=3, max=4, help="ResNet stage to cut after (4, or 3)."),
    patch_size: int = typer.Option(8, "--patch", min=1, max=MAX_DIM, help="patchnorm's patch size P (P x P tiles normalised to zero mean, unit variance)."),
    resize: Optional[str] = typer.Option(None, "--resize", help="Input size: HEIGHTxWIDTH, a shorter side S (aspect kept) or 'native'. 240x320 for a new model by default (32x64 for --model pixels, 322x322 for DINOv2); with --checkpoint it overrides the method's stored preprocessing (CNN checkpoints without one get 480x640). DINOv2 models then round sides to multiples of 14."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="torchvision ImageNet weights: a name (IMAGENET1K_V1: downloaded once into the torch hub cache, offline after that) or a local .pth file."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="A vpr checkpoint (from `vpr train`) or a published model's file (.pth, .ckpt or .safetensors: MegaLoc, SALAD, BoQ, MixVPR, CosPlace, NetVLAD, ...; see `vpr models`); its architecture and preprocessing override the model options."),
    fmt: Optional[str] = typer.Option(None, "--format", help="Checkpoint layout: auto (default: detected from the keys) or a format name from `vpr models` (vpr, cosplace, netvlad, benchmark, megaloc, salad, boq, ...)."),
    pca_dim: Optional[int] = typer.Option(None, "--pca-dim", min=1, max=MAX_DIM, help="Compress descriptors to D dimensions with PCA fitted on the database."),
    whiten: bool = typer.Option(api.BuildOptions.whiten, "--whiten/--no-whiten", help="Whiten the PCA (as NetVLAD's WPCA)."),
    kind: str = typer.Option(api.BuildOptions.kind, "--index", help=f"FAISS index: flat (exact inner product), ivfpq or hnsw (approximate, for large databases); one of {', '.join(api.INDEX_KINDS)}."),
    batch_size: int = BATCH_SIZE, workers: int = WORKERS, device: str = DEVICE, amp: bool = AMP,
    compile_model: bool = COMPILE, gpu_decode: bool = GPU_DECODE,
    cache: bool = typer.Option(api.BuildOptions.cache, "--cache/--no-cache", help="Keep descriptors in OUT.cache/ so an interrupted or repeated build resumes."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable images (listed in OUT/skipped.txt) instead of stopping at the first."),
    dba: int = typer.Option(0, "--dba", min=0, max=MAX_BATCH, help="Database-side augmentation: replace each database descriptor by its alpha-weighted average with its N nearest database neighbours; 0 = off."),
    dba_alpha: float = typer.Option(api.Expansion.alpha, "--dba-alpha", min=0.0, max=100.0, help="DBA's similarity exponent (0 = plain average)."),
    local_features: bool = typer.Option(False, "--local-features", help="Also extract local features (OpenCV SIFT, or --local-method orb) into the index, for `query/eval --rerank local`."),
    local_method: str = typer.Option(api.LocalFeatureConfig.method, "--local-method", help="With --local-features: sift (default) or orb (faster, binary)."),
    max_keypoints: int = typer.Option(api.LocalFeatureConfig.max_keypoints, "--max-keypoints", min=1, max=100_000, help="With --local-features: the strongest keypoints kept per image."),
    fps: float = FPS, track: Optional[Path] = TRACK, video_start: Optional[str] = VIDEO_START,
    track_offset: float = TRACK_OFFSET, save_frames: Optional[Path] = SAVE_FRAMES, skip_unlocated: bool = SKIP_UNLOCATED,
    benchmark: Optional[str] = BENCHMARK, root: Optional[Path] = ROOT, backend: str = BACKEND, json_out: bool = JSON,
) -> None:
    """Build a self-contained index (model, PCA, FAISS index, database metadata) from database images."""
    bench = benchmark_source(benchmark, root, database, "DATABASE")
    if checkpoint is not None:
        model, model_pca = api.load_model(checkpoint, fmt=fmt, preprocessing=parse_resize(resize) if resize else None)
    elif fmt is not None:
        raise UsageError("--format describes a --checkpoint file; give --checkpoint FILE or drop --format")
    else:
        model, model_pca = api.new_model(backbone, head=head, descriptor_dim=descriptor_dim, num_clusters=num_clusters,
                                         layer=layer, patch_size=patch_size, pretrained=pretrained,
                                         **(parse_resize(resize) if resize else {}))
    if not local_features and (local_method != api.LocalFeatureConfig.method or max_keypoints != api.LocalFeatureConfig.max_keypoints):
        raise UsageError("--local-method and --max-keypoints describe --local-features; add --local-features")
    options = api.BuildOptions(
        pca_dim=pca_dim, whiten=whiten, kind=kind, dba=api.Expansion(dba, dba_alpha), cache=cache,
        local_features=api.LocalFeatureConfig(method=local_method, max_keypoints=max_keypoints) if local_features else None,
        extract=extract_options(device, batch_size=batch_size, workers=workers, amp=amp, compile_model=compile_model,
                                gpu_decode=gpu_decode, skip_bad=skip_bad, backend=backend),
    )
    images = bench.database if bench is not None else load_source(
        database, video_options(fps, track, video_start, track_offset), skip_unlocated, save_frames, json_out)
    start = time.perf_counter()
    with distributed_run(options.extract.device) as main, \
            progress_bar(f"indexing {len(images)} images", enabled=not json_out and main) as progress:
        report = api.build_index(images, out, model=model, model_pca=model_pca, options=options, progress=progress)
    if not main:  # its share is done; rank 0 wrote the index and reports
        return
    seconds = time.perf_counter() - start
    skipped_file = report.out_dir / "skipped.txt"
    summary = {
        "index": str(report.out_dir), "images": len(images) + len(images.left_out), "indexed": report.count,
        "skipped": len(report.skipped),
        "reused_from_cache": report.reused, "dim": report.dim, "index_kind": kind, "seconds": round(seconds, 2),
        "skipped_report": str(skipped_file) if report.skipped else None, "random_init": model.random_init,
    }
    warn_random_init(model.random_init, f"the model of {report.out_dir}")
    if json_out:
        print_json(summary)
        return
    console.print(
        f"indexed {report.count} of {len(images) + len(images.left_out)} images ({len(report.skipped)} skipped, "
        f"{report.reused} from cache) "
        f"-> {report.out_dir} [{report.dim}-d, {kind}] in {seconds:.1f}s"
    )
    if report.skipped:
        console.print(f"skipped files are listed in {skipped_file}")


def query_cmd(
    images: list[Path] = typer.Argument(..., help="Query image(s), folders of frames (their images in file-name order), or videos (their frames at --fps)."),
    index: Path = typer.Option(DEFAULT_INDEX, "--index", "-i", help="Index directory from `vpr build-index`."),
    k: int = typer.Option(5, "-k", "--top-k", max=INT32_MAX, help="Number of matches per query."),
    device: str = DEVICE, amp: bool = AMP,
    nprobe: Optional[int] = typer.Option(None, "--nprobe", min=1, max=INT32_MAX, help=NPROBE_HELP),
    ef_search: Optional[int] = typer.Option(None, "--ef-search", min=1, max=MAX_EF_SEARCH, help=EF_SEARCH_HELP),
    qe: int = QE, qe_alpha: float = QE_ALPHA, sequence: Optional[int] = SEQUENCE, causal: bool = CAUSAL,
    speeds: str = SPEEDS, window: int = WINDOW, rerank: Optional[str] = RERANK, rerank_k: int = RERANK_K,
    position_k: int = POSITION_K, position_radius: float = POSITION_RADIUS,
    json_out: bool = typer.Option(False, "--json", help="Print matches as JSON."),
    viz: Optional[Path] = typer.Option(None, "--viz", help="Save a PNG of each query beside its matches (with --rerank local, also VIZ-inliers-N.png: the inlier matches of query N with its top match)."),
    fps: float = FPS, backend: str = BACKEND,
) -> None:
    """Find where photos were taken: print the top-k database matches with distance and position, and the
    estimated position with its confidence."""
    if k < 1:
        raise UsageError(f"-k {k}: must be at least 1")
    answering = answer_options(qe=qe, qe_alpha=qe_alpha, sequence=sequence, causal=causal, speeds=speeds, window=window,
                               rerank=rerank, rerank_k=rerank_k, position_k=position_k, position_radius=position_radius)
    check_output_file(viz, "--viz")
    images = api.query_images(images, video=api.VideoOptions(fps=fps))
    searcher = api.Index.load(index, device=device_of(device, amp) if backend == "torch" else "cpu", amp=amp, backend=backend, nprobe=nprobe, ef_search=ef_search,
                              options=answering)
    results = searcher.query(images, k)
    if json_out:
        print_json([r.to_dict() for r in results])
    else:
        for result in results:
            _print_result(result, answering)
        if k > len(searcher):
            err_console.print(f"note: -k {k} is larger than the database ({len(searcher)} images); showed all")
    if viz is not None:
        _draw_queries(images, results, viz, json_out)
    warn_random_init(searcher.info()["random_init"], str(index))


def _draw_queries(images: list[Path], results: list, viz: Path, quiet: bool) -> None:
    """`--viz`: each query beside its matches, and each re-ranked query's inliers with its top match."""
    rows = [(q, [(m.path, f"#{m.rank} d={m.distance:.3f}", None) for m in r.matches]) for q, r in zip(images, results)]
    figure = api.save_matches_figure(rows, viz)  # after the results: an unwritable --viz loses no answer
    if figure.missing:
        count = len(figure.missing)
        err_console.print(f"note: {count} database image{'s' if count > 1 else ''} unreadable, drawn as grey 'missing' "
                          f"tiles in {viz}; first: {figure.missing[0][1]}", soft_wrap=True)
    written = [viz]
    for n, (query, result) in enumerate(zip(images, results), start=1):
        if result.inlier_pairs is not None:
            written.append(api.draw_inlier_matches(query, result.matches[0].path, result.inlier_pairs, inliers_png(viz, n)))
    if not quiet:
        console.print(f"visualisation written to {', '.join(str(p) for p in written)}")


def inliers_png(viz: Path, n: int) -> Path:
    """Where `--viz VIZ` draws query n's inlier matches: VIZ-inliers-N.png beside it."""
    return viz.with_name(f"{viz.stem}-inliers-{n}.png")


def _print_result(result, answering: api.AnswerOptions) -> None:
    """One query's matches as a table, its estimated position underneath."""
    table = Table(title=Text(result.query), title_justify="left")
    columns = ["rank", "file", "distance", *(["inliers"] if answering.rerank else []),
               *(["seq score"] if answering.sequence else []), "utm east", "utm north", "lat, lon"]
    for column in columns:
        table.add_column(column, overflow="fold")  # a narrow terminal folds file names, never cuts them to "…"
    for m in result.matches:
        place = ("", "") if m.utm_east is None else (f"{m.utm_east:.1f}", f"{m.utm_north:.1f}")
        latlon = "" if m.lat is None else f"{m.lat:.6f}, {m.lon:.6f}"
        extra = ([str(m.inliers)] if answering.rerank else []) + ([f"{m.score:.3f}"] if answering.sequence else [])
        table.add_row(str(m.rank), Text(m.path.name), f"{m.distance:.4f}", *extra, *place, latlon)
    console.print(table)
    p = result.position
    if p is not None:
        latlon = "" if p.lat is None else f" ({p.lat:.6f}, {p.lon:.6f})"
        console.print(f"estimated position: utm {p.utm_east:.1f}, {p.utm_north:.1f}{latlon}, "
                      f"confidence {p.confidence:.2f} ({p.support} matches agree)")
