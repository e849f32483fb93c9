"""`vpr eval`: recall@N and the field's metrics of an index on labelled queries, a ground-truth file of the
benchmarks' own formats, or a whole benchmark from its authors' layout."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.answer_options import (
    CAUSAL, POSITION_K, POSITION_RADIUS, QE, QE_ALPHA, RERANK, RERANK_K, SEQUENCE, SPEEDS, WINDOW, answer_options,
)
from cli.common import (
    AMP, BACKEND, COMPILE, DEVICE, EF_SEARCH_HELP, GPU_DECODE, INT32_MAX, MAX_EF_SEARCH, NPROBE_HELP, POSITIVE, WORKERS,
    check_output_file, console, distributed_run, extract_options, parse_int_list, print_json, progress_bar,
    warn_random_init,
)
from cli.retrieval_cmds import DEFAULT_INDEX
from cli.source_options import (
    BENCHMARK, FPS, GT_KIND, ROOT, SAVE_FRAMES, SKIP_UNLOCATED, TRACK, TRACK_OFFSET, VIDEO_START, benchmark_source,
    load_source, video_options,
)
from vpr import api
from vpr.errors import UsageError


def eval_cmd(
    queries: Optional[Path] = typer.Argument(None, help="Folder of query images (`@` names or EXIF GPS), a CSV manifest, or a video with --track; with --gt, any folder; none with --benchmark."),
    index: Path = typer.Option(DEFAULT_INDEX, "--index", "-i", help="Index directory from `vpr build-index`."),
    recall: str = typer.Option("1,5,10,20", "--recall", help="Comma-separated N values for recall@N."),
    threshold: float = typer.Option(25.0, "--threshold", callback=POSITIVE, help="A database image within this many metres of a query is a positive."),
    gt: Optional[Path] = typer.Option(None, "--gt", help="Ground truth instead of coordinates: a CSV `query,positives` (space-separated database names or indices) or a benchmark's own file (gsv-cities .npy, NetVLAD .mat, VPR-Bench .npy, Patch-NetVLAD .npz, an MSLS folder)."),
    gt_kind: Optional[str] = GT_KIND, benchmark: Optional[str] = BENCHMARK, root: Optional[Path] = ROOT,
    backend: str = BACKEND,
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
    if gt is not None and not gt.exists():
        raise UsageError(f"--gt {gt}: file not found")
    if gt_kind is not None and gt is None:
        raise UsageError("--gt-kind describes a --gt file; add --gt FILE or drop --gt-kind")
    if gt_kind is not None and gt_kind not in api.GT_KINDS:
        raise UsageError(f"--gt-kind {gt_kind}: not a ground-truth format; use one of {', '.join(api.GT_KINDS)}")
    bench = benchmark_source(benchmark, root, queries, "QUERIES")
    if bench is not None and gt is not None:
        raise UsageError("--benchmark brings its own ground truth; drop --gt or drop --benchmark")
    answering = answer_options(qe=qe, qe_alpha=qe_alpha, sequence=sequence, causal=causal, speeds=speeds, window=window,
                               rerank=rerank, rerank_k=rerank_k, position_k=position_k, position_radius=position_radius)
    for path, check in ((save_predictions, api.check_predictions_path), (save_descriptors, api.check_descriptors_path)):
        if path is not None:
            check(path)
    check_output_file(viz, "--viz")
    check_output_file(pr_curve, "--pr-curve")
    if save_preds is None and (num_preds != 5 or only_wrong):
        raise UsageError("--num-preds and --only-wrong describe --save-preds; add --save-preds DIR")
    options = extract_options(device, workers=workers, amp=amp, compile_model=compile_model, gpu_decode=gpu_decode,
                              backend=backend)
    searcher = api.Index.load(index, device=options.device, amp=amp, nprobe=nprobe, ef_search=ef_search, options=answering,
                              backend=backend)
    query_set = bench.queries if bench is not None else load_source(
        queries, video_options(fps, track, video_start, track_offset), skip_unlocated, save_frames, json_out)
    with distributed_run(options.device) as main:
        with progress_bar(f"evaluating {len(query_set)} queries", enabled=not json_out and main) as progress:
            report = searcher.evaluate(query_set, ns=ns, gt=gt, threshold=threshold, options=options, progress=progress,
                                       gt_kind=gt_kind, benchmark=bench)
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
