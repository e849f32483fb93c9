"""The jobs the command line runs end to end beside index, query and eval, reached through `vpr.api`: render the
synthetic city, the demo (city -> index -> recall -> picture), CosPlace's class groups of a dataset, the speed
benchmark, joining AnyLoc's two files, retrieval pairs and global features for the SfM tools, a model exported as one graph, places from GPS, and
training (each method's trainer). Each returns what the command prints; none prints."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from vpr.training.config import GroupParams, TrainConfig

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


def _names_root(root: Path | None, *image_lists: list[Path]) -> Path:
    """The folder image names are relative to: `root`, else the deepest folder holding every image given (queries
    and database together), so a query and a database image with the same file name keep different names."""
    from vpr.retrieval.exports import common_root

    return Path(root) if root is not None else common_root(*image_lists)


def pairs(queries: Path, index: Path, out: Path, *, num_matched: int = 20, fmt: str = "hloc", root: Path | None = None,
          device: str = "cpu", min_score: float | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Retrieval pairs for the SfM tools: each query's top `num_matched` database images (`vpr query`'s search), as
    hloc / COLMAP match lists or a kapture pairsfile at `out`, names relative to `root`."""
    import numpy as np

    from vpr import api
    from vpr.retrieval.exports import check_pairs_path, relative_names, write_pairs

    check_pairs_path(out)
    searcher = api.Index.load(index, device=device)
    query_paths = api.query_images([queries])
    names_root = _names_root(root, query_paths, searcher.bundle.database.paths)
    query_names = relative_names(query_paths, names_root)
    db_names = relative_names(searcher.bundle.database.paths, names_root)
    results = searcher.search(searcher.describe(query_paths, progress=progress), num_matched)
    width = max((len(r.matches) for r in results), default=0)
    indices, scores = np.full((len(results), width), -1, dtype=np.int64), np.zeros((len(results), width), dtype=np.float32)
    for row, result in enumerate(results):
        for col, match in enumerate(result.matches):
            indices[row, col], scores[row, col] = match.id, match.similarity
    written = write_pairs(out, query_names, db_names, indices, scores, fmt, num_matched=num_matched, min_score=min_score)
    return {"out": str(out), "format": fmt, "queries": len(query_names), "pairs": written, "root": str(names_root),
            "random_init": searcher.info()["random_init"]}


def export_features(source: Path, out: Path, *, fmt: str = "hloc", index: Path | None = None, root: Path | None = None,
                    device: str = "cpu", progress: Callable[[int, int], None] | None = None) -> dict:
    """Global descriptors for the SfM tools: an index's database rows (`source` an index directory), or images
    described by `index` (`source` a folder or manifest), in the index's space, one per image name."""
    from vpr import api
    from vpr.errors import UsageError
    from vpr.retrieval.exports import write_global_features, relative_names

    source = Path(source)
    if (source / "manifest.json").is_file():
        if index is not None:
            raise UsageError(f"{source} is an index: it exports its own database rows; drop `index`")
        searcher = api.Index.load(source, device=device)
        paths, descriptors = searcher.bundle.database.paths, searcher.bundle.descriptors
        names_root = _names_root(root, paths)
    else:
        if index is None:
            raise UsageError(f"{source}: images are described by an index's model; give `index`")
        searcher = api.Index.load(index, device=device)
        paths = api.query_images([source])
        descriptors = searcher.describe(paths, progress=progress)
        names_root = _names_root(root, paths)
    names = relative_names(paths, names_root)
    written = write_global_features(out, names, descriptors, fmt)
    return {"out": str(written), "format": fmt, "images": len(names), "dim": int(descriptors.shape[1]),
            "root": str(names_root), "random_init": searcher.info()["random_init"]}


def export_model(source: Path, out: Path, *, fmt: str = "onnx", precision: str = "fp32", pca: bool = False,
                 calibration: Path | None = None, checkpoint_format: str | None = None) -> dict:
    """`vpr export-model`: the model of an index directory or a checkpoint file `source` (and with `pca` the PCA
    that turns its descriptors into the index's) as one ONNX / OpenVINO graph at `out`; int8 calibrates on
    `calibration` (a folder or manifest), by default on up to 64 of the index's database images."""
    from vpr.api import images, load_model
    from vpr.data.images import load_rgb, preprocess
    from vpr.deploy.export import CALIBRATION_IMAGES, check_export
    from vpr.deploy.export import export_model as write_graph
    from vpr.errors import UsageError
    from vpr.retrieval.store import load_index

    source = Path(source)
    check_export(fmt, precision, Path(out))
    if source.is_dir():
        bundle = load_index(source)
        model, pcas, pool = bundle.model, [p for p in (bundle.model_pca, bundle.pca) if p is not None], bundle.database.paths
    elif source.is_file():
        model, model_pca = load_model(source, fmt=checkpoint_format)
        pcas, pool = [p for p in (model_pca,) if p is not None], None
    else:
        raise UsageError(f"`source` {source}: no such index folder or checkpoint file")
    if calibration is not None:
        pool = images(calibration).paths
    if precision == "int8" and not pool:
        raise UsageError(f"`precision` int8 calibrates on images and {source} is a checkpoint; give `calibration` DIR")

    def calibration_inputs():
        step = max(1, len(pool) // CALIBRATION_IMAGES)
        rule = model.config.preprocess
        return [preprocess(load_rgb(path), rule, str(path)) for path in list(pool)[::step][:CALIBRATION_IMAGES]]

    start = time.perf_counter()
    report = write_graph(model, Path(out), fmt=fmt, precision=precision, pcas=pcas if pca else (),
                         calibration=calibration_inputs if pool else None)
    return {**report, "source": str(source), "seconds": round(time.perf_counter() - start, 2),
            "random_init": model.random_init}


def places(data: Path, out: Path, *, radius: float = 10.0, heading: float | None = None, min_images: int = 4,
           spacing: float = 25.0, map_png: Path | None = None) -> dict:
    """`vpr places`: group the located images of `data` (any layout vpr reads) into places for place-batch
    training and write them as a GSV-Cities-style CSV `out` (and a map); says how many images were left out and why."""
    from vpr.api import images
    from vpr.training.places import PlaceParams, make_places, places_table, save_places_map, write_places

    params = PlaceParams(radius=radius, heading=heading, min_images=min_images, spacing=spacing)
    source = images(data)
    found = make_places(source, params)
    write_places(out, places_table(source, found, Path(out).resolve().parent))  # image paths relative to the CSV
    if map_png is not None:
        save_places_map(source, found, map_png)
    kept = int((found.place >= 0).sum())
    return {"out": str(out), "places": found.count, "images": len(source), "kept": kept, "left_out": found.left_out,
            "unlocated": len(source.left_out), "map": str(map_png) if map_png else None,
            "params": {"radius_m": radius, "heading_deg": heading, "min_images": min_images, "spacing_m": spacing}}


def train(config: TrainConfig, *, resume: bool = False, progress: Callable[[str, int, int], None] | None = None,
          on_epoch: Callable[[dict], None] | None = None):
    """Train (or `resume`) the method `config` describes, in `config.out`; returns the run's `TrainResult`."""
    from vpr.errors import UsageError
    from vpr.training.config import CosPlaceConfig, NetVLADConfig
    from vpr.training.recipes import PlaceBatchConfig

    if isinstance(config, CosPlaceConfig):
        from vpr.training.cosplace import train_cosplace as trainer
    elif isinstance(config, NetVLADConfig):
        from vpr.training.netvlad import train_netvlad as trainer
    elif isinstance(config, PlaceBatchConfig):
        from vpr.training.place_batch import train_place_batch as trainer
    else:
        raise UsageError(f"config: a {type(config).__name__}, not a method's TrainConfig (CosPlace, NetVLAD, PlaceBatch)")
    return trainer(config, resume=resume, progress=progress, on_epoch=on_epoch)
