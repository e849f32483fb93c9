"""`vpr bench`: measure extraction, indexing and search speed; write one JSON and print a short table."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.common import (
    INT32_MAX, MAX_BATCH, MAX_WORKERS, console, device_of, err_console, parse_int_list, parse_size, print_json,
)
from vpr import api
from vpr.errors import UsageError


def bench_cmd(
    quick: bool = typer.Option(False, "--quick", help="Small settings (tiny city, 192 JPEGs, 10k and 100k descriptors): a few minutes on a laptop CPU."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto; on CUDA the GPU cases (bf16, torch.compile, GPU JPEG decoding, fp16 search) run too."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="JSON file to write (default bench_results/bench-<timestamp>.json)."),
    data: Optional[Path] = typer.Option(None, "--data", help="A synthetic city from `vpr synth` to use instead of rendering one into a temporary folder."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Measure this vpr checkpoint instead of a random-init ResNet-18 CosPlace model."),
    index_sizes: Optional[str] = typer.Option(None, "--sizes", help="Database sizes of the index and search cases, e.g. 10000,100000,1000000."),
    extract_images: Optional[int] = typer.Option(None, "--images", min=2, max=INT32_MAX, help="JPEG files through the extraction cases."),
    backbone: Optional[str] = typer.Option(None, "--model", help="Measure a random-init model with this backbone (e.g. dinov2_vitb14; default resnet18)."),
    head: Optional[str] = typer.Option(None, "--head", help="... and this head (e.g. megaloc, salad, boq; default cosplace)."),
    resize: Optional[str] = typer.Option(None, "--resize", help="Model input HEIGHTxWIDTH (default 240x320; 322x322 for DINOv2)."),
    cases: str = typer.Option("all", "--cases", help="Comma-separated cases to run: extraction, search (index build, search and query latency), memory; or all."),
    jpeg_size: str = typer.Option("480x640", "--jpeg-size", help="Size HEIGHTxWIDTH of the JPEGs extracted (the city's images upscaled, like camera photos), or 'native'."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, max=MAX_BATCH, help="Images per forward pass (default 32 on CPU, 128 on CUDA)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, max=MAX_WORKERS, help="DataLoader worker processes decoding JPEGs (default 2 on CPU)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=4096, help="torch and FAISS threads (default: all cores)."),
    compile_model: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="Add torch.compile cases: forward only and the bf16 pipeline (default: on CUDA only; on the CPU they add about a minute of compilation)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="Add the backends case: all, or some of torch_fp32, torch_bf16, onnxruntime_fp32, onnxruntime_int8, openvino_fp32, openvino_bf16, openvino_int8 (comma-separated), beside a plain ONNX Runtime session. With --cases none only this case runs."),
    json_out: bool = typer.Option(False, "--json", help="Print the results as JSON instead of tables."),
) -> None:
    """Benchmark extraction (vs a plain fp32 reference loop), index building and search, side by side."""
    model = None
    if backbone or head or resize:
        if checkpoint is not None:
            raise UsageError("--model, --head and --resize describe a random-init model; drop them with --checkpoint")
        model = api.ModelConfig.for_backbone(backbone or "resnet18", head=head or "cosplace",
                                             **({"input_size": parse_size(resize)} if resize else {}))
    settings = dict(
        backends=parse_backends(backend), quick=quick, device=device_of(device), data=data, checkpoint=checkpoint, extract_images=extract_images,
        batch_size=batch_size, workers=workers, threads=threads, model=model, cases=parse_cases(cases),
        index_sizes=parse_int_list(index_sizes, "--sizes") if index_sizes else None,
        jpeg_size=None if jpeg_size == "native" else parse_size(jpeg_size, "--jpeg-size"), compile=compile_model,
    )
    with err_console.status("benchmarking") as status:
        results, path = api.bench(out, stage=lambda message: status.update(f"bench: {message}"), **settings)
    if json_out:
        print_json(results)
        return
    print_tables(results)
    console.print(f"results written to {path} ({results['seconds']:.0f} s)")


def _words(text: str) -> tuple[str, ...]:
    return tuple(part.strip().lower() for part in text.split(",") if part.strip())


def parse_choices(text: str, flag: str, choices: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated selection of `choices` ('all': every one), or a `UsageError` naming `flag`."""
    wanted = _words(text)
    if wanted == ("all",):
        return choices
    if not wanted or any(name not in choices for name in wanted):
        raise UsageError(f"{flag} {text}: choose from {', '.join(choices)} or all")
    return wanted


def parse_backends(text: Optional[str]) -> tuple[str, ...]:
    """--backend 'all' -> every variant; 'onnxruntime_fp32,torch_fp32' -> those; None -> ()."""
    return () if text is None else parse_choices(text, "--backend", api.BENCH_BACKENDS)


def parse_cases(text: str) -> tuple[str, ...]:
    """--cases 'extraction,search' -> ('extraction', 'search'); 'all' -> every case; 'none' -> none."""
    if _words(text) == ("none",):
        return ()
    return parse_choices(text, "--cases", api.BENCH_CASES)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:,.2f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _table(title: str, columns: list[str], rows: list[list], text_columns: int = 2) -> Table:
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i < text_columns else "right")
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    return table


def print_tables(results: dict) -> None:
    """The short human-readable view of a bench result."""
    machine = results["machine"]
    console.print(f"{machine['cpu']} ({machine['usable_cpus']} cpus, {machine['torch_threads']} torch threads, load "
                  f"{machine['load_average']}), device {machine['device']}" + (f" {machine['gpu']['name']}" if machine["gpu"] else ""))
    if "extraction" in results:
        print_extraction(results["extraction"])
    if "search" in results:
        print_search(results)
    if "build_index_memory" in results:
        print_memory(results["build_index_memory"])
    if "backends" in results:
        print_backends(results["backends"])
    console.print(f"peak RSS {results['memory']['peak_rss_mb']:,.0f} MB"
                  + (f", GPU peak {results['memory']['gpu_peak_mb']:,.0f} MB" if results["memory"]["gpu_peak_mb"] else ""))


def print_backends(b: dict) -> None:
    """The backends table: forward-only and JPEG-pipeline images/s, their ratio, latency and int8's cosine."""
    rows = [["plain ONNX Runtime session fp32", b["forward_only_images_per_s"]["plain_onnxruntime_fp32"], None, None, None, None]]
    for name, p in b["pipeline"].items():
        rows.append([name.replace("_", " "), b["forward_only_images_per_s"][name], p["steady_images_per_s"],
                     b["pipeline_vs_forward"][name], b["single_image_latency_ms"][name],
                     b["agreement"].get(name, {}).get("min_cosine_to_torch_fp32")])
    h, w = b["input_size"]
    console.print(_table(f"backends: {b['images']} JPEGs, batch {b['batch_size']}, {h}x{w}",
                         ["backend", "forward img/s", "pipeline img/s", "of forward", "1-image ms", "min cos"], rows,
                         text_columns=1))


def print_extraction(ex: dict) -> None:
    """The extraction tables: forward-only, pipeline and reference rates, CPU per image, agreement."""
    forward, pipeline = ex["forward_only_images_per_s"], ex["pipeline"]
    amp = ex["amp_dtype"]
    rows = [[f"forward {name.replace('_', ' ')}", rate, None, None, None, None] for name, rate in forward.items()]
    for name, p in pipeline.items():
        rows.append([f"pipeline {name.replace('_', ' ')}", p["images_per_s"], p["steady_images_per_s"],
                     ex["pipeline_vs_forward"].get(name), ex["speedup_vs_reference"][name],
                     ex["steady_speedup_vs_reference"].get(name)])
    ref = ex["reference"]
    rows.append(["plain reference fp32", ref["images_per_s"], ref["steady_images_per_s"], None, 1.0, 1.0])
    console.print(_table(
        f"extraction images/s: {ex['images']} JPEGs, batch {ex['batch_size']}, {ex['workers']} workers, amp={amp} "
        "(forward: tensors in memory; steady: after the first batch)",
        ["case", "img/s", "steady", "of forward", "x ref", "x ref steady"], rows, text_columns=1))
    cpu = "; ".join(f"{name}: {p['main_cpu_ms_per_image']:.1f} main + {p['workers_cpu_ms_per_image']:.1f} decode workers"
                    for name, p in pipeline.items())
    console.print(f"CPU ms per image: {cpu}; reference: {ref['main_cpu_ms_per_image']:.1f}")
    agreement = "; ".join(f"{k}: max|diff| {v['max_abs_diff']:.1e}, top-5 identical {100 * v['top5_identical']:.0f}% "
                          f"(top-5 similarities within {v['top5_similarity_max_diff']:.1e})"
                          for k, v in ex["agreement_with_reference"].items())
    console.print(f"descriptors vs the reference loop: {agreement}")


def print_search(results: dict) -> None:
    """The index-build, search and single-query latency tables."""
    console.print(_table("index build (pca: fit + transform)", ["size", "kind", "seconds", "index MB", "peak MB"], [
        [r["size"], r["kind"], r.get("build_s", r.get("fit_s", 0) + r.get("transform_s", 0)), r.get("index_mb"), r.get("peak_mb")]
        for r in results["index"]
    ]))
    console.print(_table(f"search, k={results['settings']['k']} (ms: one query at a time; q/s: one batch; R@1: top-1 is "
                         "the exact top-1; top-10: the exact top-1 is in the top 10; MB: peak during the batch)", [
        "size", "kind", "p50 ms", "p95 ms", "q/s", "R@1", "top-10", "MB",
    ], [
        [r["size"], r["kind"], r["p50_ms"], r["p95_ms"], r["queries_per_s"], r["recall1_vs_exact"], r["recall1_at10_vs_exact"],
         r["batch_peak_mb"]]
        for r in results["search"]
    ]))
    latency = results["query_latency"]
    console.print(_table(f"single-image query at {latency['database_size']:,} descriptors (p50 ms)",
                         ["kind", "", "load", "forward", "pca", "search", "total", "total p95"], [
        [kind, "", v["load_p50_ms"], v["forward_p50_ms"], v["pca_p50_ms"], v["search_p50_ms"], v["total_p50_ms"], v["total_p95_ms"]]
        for kind, v in latency["kinds"].items()
    ]))


def print_memory(memory: dict) -> None:
    """The build-index peak-memory table."""
    console.print(_table("build-index peak memory, fresh process (32x32 input)", ["images", "", "peak MB", "descriptors MB", "seconds"], [
        [r["images"], r.get("error", ""), r.get("peak_mb"), r["descriptors_mb"], r.get("seconds")] for r in memory["rows"]
    ]))
    growth = memory["peak_bytes_per_extra_image"]
    if growth is not None:
        console.print(f"build-index peak grows {growth:,.0f} bytes per extra image "
                      f"(one descriptor is {memory['descriptor_bytes_per_image']:,} bytes)")
