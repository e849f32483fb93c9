"""`vpr build-index`, `vpr query` and `vpr eval`: parse the flags, call `vpr.api`, print."""

from __future__ import annotations

import math
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
    AMP, BATCH_SIZE, COMPILE, DEVICE, EF_SEARCH_HELP, GPU_DECODE, INT32_MAX, JSON, MAX_BATCH, MAX_CLUSTERS, MAX_DIM,
    MAX_EF_SEARCH, NPROBE_HELP, POSITIVE, WORKERS, check_output_file, console, device_of, distributed_run, err_console,
    extract_options, parse_int_list, parse_resize, print_json, progress_bar, warn_random_init,
)
from cli.source_options import (
    FPS, SAVE_FRAMES, SKIP_UNLOCATED, TRACK, TRACK_OFFSET, VIDEO_START, load_source, video_options,
)
from vpr import api
from vpr.errors import UsageError

DEFAULT_INDEX = Path("indexes/default")


def build_index_cmd(
    database: Path = typer.Argument(..., help="Folder of database images (`@utm_east@utm_north@...` names, EXIF GPS, or unlabelled), a CSV manifest path,lat,lon[,heading], or a video (--fps, --track)."),
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
    json_out: bool = JSON,
) -> None:
    """Build a self-contained index (model, PCA, FAISS index, database metadata) from database images."""
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
                                gpu_decode=gpu_decode, skip_bad=skip_bad),
    )
    images = load_source(database, video_options(fps, track, video_start, track_offset), skip_unlocated, save_frames,
                         json_out)
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
    fps: float = FPS,
) -> None:
    """Find where photos were taken: print the top-k database matches with distance and position, and the
    estimated position with its confidence."""
    if k < 1:
        raise UsageError(f"-k {k}: must be at least 1")
    answering = answer_options(qe=qe, qe_alpha=qe_alpha, sequence=sequence, causal=causal, speeds=speeds, window=window,
                               rerank=rerank, rerank_k=rerank_k, position_k=position_k, position_radius=position_radius)
    check_output_file(viz, "--viz")
    images = api.query_images(images, video=api.VideoOptions(fps=fps))
    searcher = api.Index.load(index, device=device_of(device, amp), amp=amp, nprobe=nprobe, ef_search=ef_search,
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


def eval_cmd(
    queries: Path = typer.Argument(..., help="Folder of query images (`@` names or EXIF GPS), a CSV manifest, or a video with --track; with --gt, any folder."),
    index: Path = typer.Option(DEFAULT_INDEX, "--index", "-i", help="Index directory from `vpr build-index`."),
    recall: str = typer.Option("1,5,10,20", "--recall", help="Comma-separated N values for recall@N."),
    threshold: float = typer.Option(25.0, "--threshold", callback=POSITIVE, help="A database image within this many metres of a query is a positive."),
    gt: Optional[Path] = typer.Option(None, "--gt", help="Ground-truth CSV `query,positives` (space-separated database names or indices) instead of coordinates."),
    device: str = DEVICE, workers: int = WORKERS, amp: bool = AMP, compile_model: bool = COMPILE, gpu_decode: bool = GPU_DECODE,
    nprobe: Optional[int] = typer.Option(None, "--nprobe", min=1, max=INT32_MAX, help=NPROBE_HELP),
    ef_search: Optional[int] = typer.Option(None, "--ef-search", min=1, max=MAX_EF_SEARCH, help=EF_SEARCH_HELP),
    qe: int = QE, qe_alpha: float = QE_ALPHA, sequence: Optional[int] = SEQUENCE, causal: bool = CAUSAL,
    speeds: str = SPEEDS, window: int = WINDOW, rerank: Optional[str] = RERANK, rerank_k: int = RERANK_K,
    position_k: int = POSITION_K, position_radius: float = POSITION_RADIUS,
    save_predictions: Optional[Path] = typer.Option(None, "--save-predictions", help="Write each query's top-k (similarity, metres, positive?), position estimate and error to a .csv or .json file."),
    save_descriptors: Optional[Path] = typer.Option(None, "--save-descriptors", help="Write the query descriptors (index space) to a .h5 file."),
    viz: Optional[Path] = typer.Option(None, "--viz", help="Save a PNG map of database positions with each query's true and estimated position (wrong answers as red lines)."),
    pr_curve: Optional[Path] = typer.Option(None, "--pr-curve", help="Save a PNG of the precision-recall curve of the top-1 answers ranked by confidence."),
    save_preds: Optional[Path] = typer.Option(None, "--save-preds", help="Write one picture per query into this new folder: the query beside its top matches, green within the threshold, red beyond."),
    num_preds: int = typer.Option(5, "--num-preds", min=1, max=100, help="With --save-preds: matches drawn per query."),
    only_wrong: bool = typer.Option(False, "--only-wrong", help="With --save-preds: only the queries whose top-1 is wrong."),
    json_out: bool = typer.Option(False, "--json", help="Print the recalls and metrics as JSON."),
    fps: float = FPS, track: Optional[Path] = TRACK, video_start: Optional[str] = VIDEO_START,
    track_offset: float = TRACK_OFFSET, save_frames: Optional[Path] = SAVE_FRAMES, skip_unlocated: bool = SKIP_UNLOCATED,
) -> None:
    """Recall@N of an index on labelled queries (standard protocol: hit = a positive in the top N), and the
    localisation error of the position estimate."""
    ns = parse_int_list(recall, "--recall")
    if not (math.isfinite(threshold) and threshold > 0):  # the option's callback refuses these first; kept for direct calls
        raise UsageError(f"--threshold {threshold}: must be a positive number of metres, e.g. 25")
    if gt is not None and not gt.is_file():
        raise UsageError(f"--gt {gt}: file not found")
    answering = answer_options(qe=qe, qe_alpha=qe_alpha, sequence=sequence, causal=causal, speeds=speeds, window=window,
                               rerank=rerank, rerank_k=rerank_k, position_k=position_k, position_radius=position_radius)
    for path, check in ((save_predictions, api.check_predictions_path), (save_descriptors, api.check_descriptors_path)):
        if path is not None:
            check(path)
    check_output_file(viz, "--viz")
    check_output_file(pr_curve, "--pr-curve")
    if save_preds is None and (num_preds != 5 or only_wrong):
        raise UsageError("--num-preds and --only-wrong describe --save-preds; add --save-preds DIR")
    options = extract_options(device, workers=workers, amp=amp, compile_model=compile_model, gpu_decode=gpu_decode)
    searcher = api.Index.load(index, device=options.device, amp=amp, nprobe=nprobe, ef_search=ef_search, options=answering)
    query_set = load_source(queries, video_options(fps, track, video_start, track_offset), skip_unlocated, save_frames,
                            json_out)
    with distributed_run(options.device) as main:
        with progress_bar(f"evaluating {len(query_set)} queries", enabled=not json_out and main) as progress:
            report = searcher.evaluate(query_set, ns=ns, gt=gt, threshold=threshold, options=options, progress=progress)
    if not main:  # under torchrun: this rank described its share of the queries; rank 0 reports
        return
    summary = {**report.summary(), "index": str(index)}
    if save_predictions is not None:
        api.save_predictions(report.results, save_predictions, summary)
    if save_descriptors is not None:
        api.save_descriptors(report.descriptors, query_set.paths, save_descriptors)
    if viz is not None:
        if not searcher.info()["positions"]:
            raise UsageError(f"--viz draws positions, but {index} holds no coordinates; drop --viz")
        report.draw_positions(viz)
    if pr_curve is not None:
        report.draw_pr_curve(pr_curve)
    pictures = report.draw_queries(save_preds, num_preds, only_wrong) if save_preds is not None else []
    warn_random_init(summary["random_init"], str(index))
    if json_out:
        print_json(summary)
        return
    print_recall_table(summary)
    print_metrics(summary)
    print_localization(summary)
    for path, what in ((save_predictions, "predictions"), (save_descriptors, "query descriptors"), (viz, "position map"),
                       (pr_curve, "precision-recall curve")):
        if path is not None:
            console.print(f"{what} written to {path}")
    if save_preds is not None:
        console.print(f"{len(pictures)} query pictures written to {save_preds}")


def print_metrics(summary: dict) -> None:
    """mAP@k and the precision-recall figures of the top-1 answers."""
    def shown(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    maps = ", ".join(f"{k} {v:.1f}" for k, v in summary["mAP"].items())
    console.print(f"{maps}; AUC-PR {shown(summary['auc_pr'])}, recall at 100% precision "
                  f"{shown(summary['recall_at_100_precision'])}, extended precision {shown(summary['extended_precision'])}")


def print_localization(summary: dict) -> None:
    """The position estimate's error and the confidence's precision, when the run measured them."""
    loc = summary["localization"]
    if loc is not None:
        within = ", ".join(f"{k}: {v:.1f}%" for k, v in loc["within"].items())
        median = "-" if loc["median_m"] is None else f"{loc['median_m']:.1f} m"
        p90 = "-" if loc["p90_m"] is None else f"{loc['p90_m']:.1f} m"
        console.print(f"position error: median {median}, 90th percentile {p90}; within {within}")
    precision = summary["confidence_precision"]
    if any(v is not None for v in precision.values()):
        shown = ", ".join(f"{k}: {'-' if v is None else f'{v:.1f}%'}" for k, v in precision.items())
        console.print(f"top-1 precision by confidence threshold (recall of correct top-1s): {shown}")


def print_recall_table(summary: dict, title: str = "recall") -> None:
    """The recall@N table shared by `eval` and `demo`, with the query and database counts."""
    console.print(f"{title}: {summary['queries']} queries ({summary['queries_with_positives']} with a positive), "
                  f"{summary['database']} database images")
    table = Table()
    for name in summary["recall"]:
        table.add_column(name, justify="right")
    table.add_row(*(f"{v:.1f}" for v in summary["recall"].values()))
    console.print(table)
