"""The jobs the command line runs end to end beside index, query and eval, reached through `vpr.api`: render the
synthetic city, the demo (city -> index -> recall -> picture), CosPlace's class groups of a dataset, the speed
benchmark, and joining AnyLoc's two files. Each returns what the command prints; none prints."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from vpr.training.config import GroupParams

PhaseProgress = Callable[[str, int, int], None]  # (phase, done, total)


def synth(out: Path, preset: str = "small", seed: int = 0, preview: Path | None = None,
          progress: Callable[[int, int], None] | None = None) -> dict:
    """Render the deterministic synthetic city into `out` (and its contact sheet into `preview`)."""
    from vpr.data.synth.generate import generate_city
    from vpr.data.synth.preview import save_preview

    summary = generate_city(out, preset=preset, seed=seed, progress=progress)
    if preview is not None:
        save_preview(out, preview)
    return summary


def demo(workdir: Path, preset: str = "small", device: str = "cpu", progress: PhaseProgress | None = None) -> dict:
    """The whole path on the built-in city: render it (once), index its test database with a random-init
    ResNet-18 CosPlace model at the city's own resolution, evaluate its queries, draw four queries' matches."""
    from vpr import api
    from vpr.data.synth.generate import generate_city, get_preset
    from vpr.evaluation.viz import save_matches_figure

    def phase(name: str):
        return None if progress is None else (lambda done, total: progress(name, done, total))

    spec = get_preset(preset)
    start = time.perf_counter()
    dataset, index_dir = workdir / "data" / f"demo-city-{preset}", workdir / "indexes" / f"demo-{preset}"
    viz = workdir / "indexes" / f"demo-{preset}-matches.png"
    if not dataset.exists():
        generate_city(dataset, preset=preset, seed=0, progress=phase("rendering demo city"))
    database, queries = api.split(dataset, "test")
    model, _ = api.new_model(input_size=(spec.height, spec.width))
    options = api.BuildOptions(extract=api.ExtractOptions(device=device))
    api.build_index(database, index_dir, model=model, options=options, progress=phase(f"indexing {len(database)} images"))
    index = api.Index.load(index_dir, device=device)
    report = index.evaluate(queries, options=options.extract, progress=phase(f"evaluating {len(queries)} queries"))
    rows = [(queries.paths[q], [(m.path, f"#{m.rank}", m.positive) for m in report.results[q].matches[:4]])
            for q in range(min(4, len(queries)))]
    save_matches_figure(rows, viz)
    return {
        "dataset": str(dataset), "index": str(index_dir), "queries": report.num_queries,
        "queries_with_positives": report.num_with_positives, "database": len(database),
        "recall": {f"R@{n}": round(v, 2) for n, v in report.recalls.items()},
        "visualisation": str(viz), "seconds": round(time.perf_counter() - start, 1), "random_init": model.random_init,
    }


def groups(dataset: Path, params: GroupParams = GroupParams(), cache: Path | None = None, map_png: Path | None = None,
           map_size: int = 1024) -> dict:
    """How CosPlace would cut a dataset's training images into classes and groups (its train split, or the
    folder or manifest itself), optionally drawn as a map; the summary `vpr groups` prints."""
    from vpr.data.datasets import find_split, load_image_set
    from vpr.training.cosplace_groups import build_groups, save_group_map

    source = (find_split(dataset, "train") if Path(dataset).is_dir() else None) or Path(dataset)
    images = load_image_set(source)
    found = build_groups(images, params, cache=cache)
    if map_png is not None:
        save_group_map(found, images, map_png, size=map_size)
    return {"source": str(source), **found.summary(), "max_groups": params.max_groups, "map": str(map_png) if map_png else None}


def bench(out: Path | None = None, *, stage: Callable[[str], None] | None = None, **settings) -> tuple[dict, Path]:
    """Measure extraction, index building and search (`vpr bench`, `vpr.bench`); write the results JSON to `out`
    (default bench_results/bench-TIMESTAMP.json), replacing only a file `vpr bench` wrote. `settings` are
    `vpr.bench.config.bench_config`'s."""
    from datetime import datetime

    from vpr.bench.config import bench_config
    from vpr.bench.run import is_bench_results, run_bench
    from vpr.fileio import check_replaceable_file, write_json

    path = out or Path("bench_results") / f"bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    if out is not None:  # checked before minutes of measuring: never replace a file vpr bench did not write
        check_replaceable_file(out, is_bench_results, "bench results file", "out")
    results = run_bench(bench_config(**settings), stage=stage or (lambda message: None))
    write_json(path, results)
    return results, path


def join_anyloc(dinov2: Path, centers: Path, out: Path, layer: int | None = None, facet: str | None = None) -> dict:
    """Join DINOv2 weights and an AnyLoc vocabulary into the one file `build-index` reads (`methods.anyloc.combine`)."""
    from vpr.models.methods.anyloc import combine

    return combine(dinov2, centers, out, layer, facet)
