"""vpr's one surface: everything the command line, `vpr serve` and the measurement scripts use, and what a
Python user needs.

    from vpr import api
    api.build_index("city/images/test/database", "indexes/city", model=api.new_model()[0])
    index = api.Index.load("indexes/city")
    result = index.query(["photo.jpg"], k=5)[0]   # result.matches[0].path, .similarity, .lat, .lon; result.position
    report = index.evaluate(api.images("city/images/test/queries"))   # report.recalls, report.summary()

Images may be paths, PIL images, H x W x 3 (or H x W) uint8 arrays or the bytes of an image file. Results are
dataclasses whose `to_dict()` is the JSON of `vpr query --json`, of `vpr serve` and of `vpr eval`'s predictions.
Importing this module is cheap: torch, FAISS and the models load when a function first needs them, and the
settings (the dataclasses below) import nothing heavy. Errors are `vpr.errors.VPRError`s naming the parameter.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from vpr.data.frames import VIDEO_EXTENSIONS
from vpr.data.synth.presets import PRESETS as SYNTH_PRESETS
from vpr.errors import UsageError
from vpr.runtime import bf16_is_slow, distributed_run, extract_options, resolve_device
from vpr.retrieval.options import (
    DEFAULT_RADIUS, DEFAULT_TOP_K, INDEX_KINDS, AnswerOptions, BuildOptions, Expansion, ExtractOptions,
    LocalFeatureConfig, RerankOptions, SequenceOptions, speed_range,
)
from vpr.training.config import AugmentParams, CosPlaceConfig, GroupParams, NetVLADConfig, TrainConfig

if TYPE_CHECKING:
    import numpy as np
    import torch

    from vpr.data.datasets import GeoImageSet
    from vpr.data.video import VideoOptions
    from vpr.data.benchmarks import Benchmark
    from vpr.evaluation.evaluate import EvalReport
    from vpr.models.model import ModelConfig, VPRModel
    from vpr.models.pca import PCA
    from vpr.retrieval.build import BuildReport
    from vpr.retrieval.results import QueryResult

ImageInput = Union[str, os.PathLike, Any]  # a path, a PIL image, a uint8 array or the bytes of an image file
Progress = Callable[[int, int], None]
LAZY = {  # heavy names, imported when first asked for
    "Match": "vpr.retrieval.results", "Position": "vpr.retrieval.results", "QueryResult": "vpr.retrieval.results",
    "ModelConfig": "vpr.models.model", "GeoImageSet": "vpr.data.datasets", "BuildReport": "vpr.retrieval.build",
    "EvalReport": "vpr.evaluation.evaluate", "ImageTooLarge": "vpr.errors", "VPRError": "vpr.errors", "NotAnImage": "vpr.errors",
    "decode_image": "vpr.data.images", "recall_at_n": "vpr.evaluation.recall", "supported_models": "vpr.models.catalog",
    "sequence_search": "vpr.retrieval.sequence", "save_matches_figure": "vpr.evaluation.viz",
    "save_positions_map": "vpr.evaluation.viz", "draw_inlier_matches": "vpr.retrieval.rerank",
    "save_descriptors": "vpr.evaluation.predictions", "save_predictions": "vpr.evaluation.predictions",
    "check_predictions_path": "vpr.evaluation.predictions", "check_descriptors_path": "vpr.evaluation.predictions",
    "positives_within": "vpr.data.ground_truth", "load_benchmark": "vpr.data.benchmarks", "Benchmark": "vpr.data.benchmarks",
    "BENCHMARKS": "vpr.data.benchmarks", "GT_KINDS": "vpr.data.benchmarks", "exact_search": "vpr.retrieval.search", "cache_dir_for": "vpr.retrieval.build",
    "synth": "vpr.jobs", "demo": "vpr.jobs", "pairs": "vpr.jobs", "export_features": "vpr.jobs", "export_model": "vpr.jobs", "places": "vpr.jobs",
    "BACKENDS": "vpr.deploy", "EXPORT_FORMATS": "vpr.deploy:FORMATS", "PRECISIONS": "vpr.deploy",
    "PAIRS_FORMATS": "vpr.retrieval.exports", "FEATURE_FORMATS": "vpr.retrieval.exports", "groups": "vpr.jobs", "bench": "vpr.jobs", "BENCH_CASES": "vpr.bench", "BENCH_BACKENDS": "vpr.bench",
    "join_anyloc": "vpr.jobs", "VideoOptions": "vpr.data.video", "to_json": "vpr.fileio", "write_json": "vpr.fileio", "save_png": "vpr.fileio",
    "Reported": "vpr.distributed", "rss_bytes": "vpr.bench.measure", "peak_rss_bytes": "vpr.bench.measure",
    "reset_peak_rss": "vpr.bench.measure", "netvlad_start": "vpr.training.netvlad:initial_model",
    "PlaceBatchConfig": "vpr.training.recipes", "RECIPES": "vpr.training.recipes", "train": "vpr.jobs",
    "freeze_blocks": "vpr.training.place_batch", "multi_similarity": "vpr.training.place_batch",
}
__all__ = [
    "AnswerOptions", "AugmentParams", "BuildOptions", "CosPlaceConfig", "DEFAULT_RADIUS", "DEFAULT_TOP_K", "Expansion",
    "ExtractOptions", "GroupParams", "INDEX_KINDS", "Index", "SYNTH_PRESETS", "LocalFeatureConfig", "NetVLADConfig", "RerankOptions",
    "SequenceOptions", "TrainConfig", "VIDEO_EXTENSIONS", "build_index", "check_index", "describe", "images", "index_descriptors", "load_model",
    "new_model", "query_images", "recall", "save_frames", "save_model",
    "bf16_is_slow", "distributed_run", "extract_options", "resolve_device",
    "speed_range", "split", *LAZY,
]


def __getattr__(name: str):
    if name in ("BENCH_CASES", "BENCH_BACKENDS"):
        return getattr(import_module("vpr.bench"), "CASES" if name == "BENCH_CASES" else "BACKEND_VARIANTS")
    if name in LAZY:
        module, _, attribute = LAZY[name].partition(":")
        return getattr(import_module(module), attribute or name)
    raise AttributeError(f"module 'vpr.api' has no attribute {name!r}")


def whole_number(value: object, name: str, minimum: int = 1) -> int:
    """`value` as an int when it is a whole number >= `minimum` (not a bool, a float or a string), else a
    `UsageError` naming the parameter."""
    if isinstance(value, bool) or not hasattr(value, "__index__") or int(value) < minimum:
        raise UsageError(f"`{name}` {value!r}: must be a whole number of at least {minimum}")
    return int(value)


def images(source: str | os.PathLike, *, skip_unlocated: bool = False, video: VideoOptions | None = None) -> GeoImageSet:
    """An image set: a folder (located by `@` names or EXIF GPS), a CSV manifest, or a video's frames (`video`: the
    frame rate and GPS track). `skip_unlocated` leaves out a located folder's images without a position (their
    paths and why in `left_out`) instead of refusing the folder."""
    from vpr.data.datasets import load_image_set

    return load_image_set(Path(source), skip_unlocated=skip_unlocated, video=video)


def split(root: str | os.PathLike, name: str) -> tuple[GeoImageSet, GeoImageSet]:
    """A dataset's split `name` as (database, queries): ROOT/images/SPLIT or ROOT/SPLIT."""
    from vpr.data.datasets import load_split

    return load_split(Path(root), name)


def query_images(arguments: Sequence[str | os.PathLike], video: VideoOptions | None = None) -> list[Path]:
    """Query images as given: files as they are, folders expanded to their images and videos to their frames
    (`video`), both in frame order."""
    from vpr.data.frames import VIDEO_EXTENSIONS

    out: list[Path] = []
    for argument in arguments:
        if Path(argument).is_dir() or Path(argument).suffix.lower() in VIDEO_EXTENSIONS:
            frames = images(argument, video=video)
            out.extend(frames.paths[i] for i in frames.frame_order())
        else:
            out.append(Path(argument))
    return out


def save_frames(frames: GeoImageSet, out: str | os.PathLike, progress: Progress | None = None) -> Path:
    """Write a video's frames (from `images`) as JPEGs into the new folder `out`, `@`-named when they are located."""
    from vpr.data.video import save_frames as write

    return write(frames, Path(out), progress)


def new_model(backbone: str | ModelConfig = "resnet18", *, pretrained: str | None = None, seed: int = 0,
              **fields) -> tuple[VPRModel, None]:
    """A new model (seeded random weights, or ImageNet weights for its trunk with `pretrained`): `backbone` and
    any `ModelConfig` field (the input rule is the backbone's own unless `fields` say otherwise), or a whole
    `ModelConfig`."""
    from vpr.models.model import ModelConfig, build_model

    config = backbone if isinstance(backbone, ModelConfig) and not fields else ModelConfig.for_backbone(backbone, **fields)
    return build_model(config, pretrained=pretrained, seed=seed), None


def load_model(checkpoint: str | os.PathLike, *, fmt: str | None = None,
               preprocessing: dict | None = None) -> tuple[VPRModel, PCA | None]:
    """A model and its own PCA from a checkpoint: vpr's, or a published layout (`fmt` forces one);
    `preprocessing` (ModelConfig fields) overrides the input rule the file stores."""
    from dataclasses import replace

    from vpr.models.checkpoints import load_checkpoint

    model, pca = load_checkpoint(Path(checkpoint), fmt)
    if preprocessing:
        model.config = replace(model.config, **preprocessing)
    return model, pca


def build_index(database: str | os.PathLike | GeoImageSet, out: str | os.PathLike, *, model: VPRModel | None = None,
                model_pca: PCA | None = None, options: BuildOptions = BuildOptions(),
                progress: Progress | None = None) -> BuildReport:
    """Index a folder, a CSV manifest or an image set into the directory `out` (as `vpr build-index`): `model`
    defaults to `new_model()`; with `options.cache` descriptors are kept in `OUT.cache` so a rerun resumes."""
    from vpr.data.datasets import GeoImageSet, load_image_set
    from vpr.retrieval import build

    if not isinstance(database, (GeoImageSet, str, os.PathLike)):
        raise UsageError(f"database: a {type(database).__name__}, not a folder, a CSV manifest or a GeoImageSet")
    if not isinstance(options, BuildOptions):
        raise UsageError(f"options: a {type(options).__name__}, not BuildOptions")
    source = database if isinstance(database, GeoImageSet) else load_image_set(Path(database))
    if model is None:
        model, model_pca = new_model()
    out = Path(out)
    return build.build_index(
        source, out, model=model, model_pca=model_pca, pca_dim=options.pca_dim, pca_whiten=options.whiten,
        kind=options.kind, options=options.extract, cache=build.cache_dir_for(out) if options.cache else None,
        progress=progress, dba=options.dba, local_features=options.local_features, spill_bytes=options.spill_bytes,
    )


def describe(model: VPRModel, images_: Sequence[ImageInput], options: ExtractOptions = ExtractOptions(),
             progress: Progress | None = None) -> np.ndarray:
    """Unit descriptors (N x D float32) of images, by the model alone (no index, no PCA)."""
    from vpr.retrieval.extract import extract_descriptors

    return extract_descriptors(model, list(images_), options, progress=progress).descriptors


def save_model(model: VPRModel, path: str | os.PathLike, *, pca: PCA | None = None) -> Path:
    """Write `model` (and its PCA) as a vpr checkpoint, atomically; an existing file is replaced only when it is
    a vpr checkpoint (anything else at `path` is refused)."""
    from vpr.fileio import check_replaceable_file
    from vpr.models.checkpoints import is_vpr_checkpoint, save_checkpoint

    check_replaceable_file(Path(path), is_vpr_checkpoint, "vpr checkpoint", "`path`")
    return save_checkpoint(model, Path(path), pca=pca)


def recall(model: VPRModel, database: GeoImageSet, queries: GeoImageSet, *, pca: PCA | None = None,
           ns: tuple[int, ...] = (1, 5, 10, 20), threshold: float = 25.0,
           options: ExtractOptions = ExtractOptions()) -> dict[int, float]:
    """Recall@N (percent) of a model (and its `pca`) on labelled image sets by exact search, positives within
    `threshold` metres, writing nothing: how training validates, for comparing checkpoints."""
    from vpr.training.loop import validate

    return validate(model, database, queries, options, ns=tuple(ns), threshold=threshold, pca=pca)


def index_descriptors(descriptors: np.ndarray | str | os.PathLike, out: str | os.PathLike, *, model: VPRModel,
                      database: GeoImageSet, kind: str = "flat", model_pca: PCA | None = None, pca: PCA | None = None,
                      source: str = "descriptors") -> Path:
    """An index over descriptors computed already (index space, one row per `database` image): an array, or an
    HDF5 file whose `descriptors` dataset is read in chunks (millions of rows in bounded memory). `model` (and
    `model_pca`, `pca`) describe the queries as those rows were made."""
    from vpr.fileio import check_replaceable_dir, output_lock
    from vpr.retrieval.store import foreign_files, write_index, write_index_from_file

    out = Path(out)
    check_replaceable_dir(out, foreign_files, "`out`")
    with output_lock(out):
        if isinstance(descriptors, (str, os.PathLike)):
            return write_index_from_file(out, Path(descriptors), model=model, model_pca=model_pca, pca=pca,
                                         database=database, kind=kind, source=source)
        return write_index(out, model=model, model_pca=model_pca, pca=pca, database=database, descriptors=descriptors,
                           kind=kind, source=source)


def check_index(directory: str | os.PathLike) -> dict:
    """Validate an index directory without loading its model; its manifest."""
    from vpr.retrieval.index_files import read_manifest

    return read_manifest(Path(directory))


class Index:
    """A loaded index that answers queries: one `Describer` (the model's inference copy) on `device`, kept for
    every call. Not thread-safe: call it from one thread at a time (`vpr serve` runs it in one worker thread)."""

    def __init__(self, bundle, device: object = "auto", *, amp: bool = False, batch_size: int = 32,
                 options: AnswerOptions = AnswerOptions(), backend: str = "torch") -> None:
        self.bundle = bundle
        self.device = resolve_device(device)
        self.amp, self.backend = amp, backend
        self.batch_size = whole_number(batch_size, "batch_size")
        self.options = options
        self._describer = None

    @classmethod
    def load(cls, directory: str | os.PathLike, *, device: object = "auto", amp: bool = False, batch_size: int = 32,
             nprobe: int | None = None, ef_search: int | None = None, options: AnswerOptions = AnswerOptions(),
             backend: str = "torch") -> "Index":
        """Load and validate an index directory (`vpr build-index`); `nprobe` / `ef_search` tune ivfpq / hnsw
        search, `options` adds query expansion, sequence matching or re-ranking (`vpr.retrieval.answer`),
        `backend` runs the model on ONNX Runtime or OpenVINO (`vpr.deploy`; any backend answers any index)."""
        from vpr.retrieval.store import load_index

        bundle = load_index(Path(directory))
        bundle.set_search_params(nprobe=nprobe, ef_search=ef_search)
        return cls(bundle, device, amp=amp, batch_size=batch_size, options=options, backend=backend)

    def __len__(self) -> int:
        return len(self.bundle.database)

    @property
    def extract_options(self) -> ExtractOptions:
        """How this index describes queries (its device, batch size and precision)."""
        return ExtractOptions(batch_size=self.batch_size, num_workers=0, device=self.device, amp=self.amp,
                              backend=self.backend)

    @property
    def describer(self):
        """The model's inference copy on this index's device, made on first use."""
        if self._describer is None:
            from vpr.retrieval.extract import Describer

            self._describer = Describer(self.bundle.model, self.extract_options)
        return self._describer

    @property
    def preprocessing(self):
        """How every query image becomes the model's input (the index's stored rule)."""
        return self.bundle.model.config.preprocess

    def info(self) -> dict:
        """What the index is: model configuration, descriptor size, database count, index kind, UTM zone."""
        manifest = self.bundle.manifest
        return {
            "index": str(self.bundle.directory), "model": manifest["model"], "dim": self.bundle.dim,
            "count": len(self), "index_kind": manifest["index_kind"], "zone": manifest.get("zone"),
            "positions": self.bundle.database.utm is not None, "device": self.device, "amp": self.amp, "backend": self.backend,
            "vpr_version": manifest.get("vpr_version"), "random_init": manifest.get("random_init", False),
        }

    def database_root(self) -> Path:
        """The deepest folder holding every database image: what served names are relative to."""
        from vpr.retrieval.exports import common_root

        return common_root(self.bundle.database.paths)

    def prepare(self, image: ImageInput, name: str = "image", max_pixels: int | None = None,
                max_input_pixels: int | None = None) -> torch.Tensor:
        """Decode and resize one image to the model's input: a 3 x H x W tensor of 0..255 values (no model
        involved), as the extraction loop reads it. `max_pixels` bounds the decoded image, `max_input_pixels`
        the model input after the index's resize rule (`ImageTooLarge` beyond either)."""
        from vpr.data.images import MAX_INPUT_PIXELS, MAX_PIXELS, as_rgb, preprocess

        rgb = as_rgb(image, name, max_pixels or MAX_PIXELS)
        return preprocess(rgb, self.preprocessing, name, max_input_pixels or MAX_INPUT_PIXELS)

    def describe_batch(self, batch: Sequence[torch.Tensor]) -> np.ndarray:
        """Descriptors in the index's space for images from `prepare` (one forward pass per image size)."""
        return self.bundle.project(self.describer.inputs(batch))

    def describe(self, images_: ImageInput | Sequence[ImageInput], progress: Progress | None = None,
                 names: Sequence[str] | None = None) -> np.ndarray:
        """Descriptors of images in the index's space, `batch_size` images per forward pass."""
        from vpr.data.images import image_list
        from vpr.retrieval.extract import extract_descriptors

        items = image_list(images_)
        if not items:
            import numpy as np

            return np.zeros((0, self.bundle.dim), dtype=np.float32)
        extraction = extract_descriptors(self.describer, items, self.extract_options, progress=progress, names=names)
        return self.bundle.project(extraction.descriptors)

    def search(self, descriptors, k: int = 5, names: Sequence[str] | None = None,
               query_paths: Sequence[str | os.PathLike] | None = None) -> list[QueryResult]:
        """Top-k matches and the position estimate for each descriptor row (from `describe`), through
        the same answering stages as `vpr query` (`options`; re-ranking needs `query_paths`)."""
        from vpr.retrieval.answer import answer
        from vpr.retrieval.results import query_names, query_results
        from vpr.retrieval.search import query_rows

        k = whole_number(k, "k")
        descriptors = query_rows(descriptors, self.bundle.dim)
        names = query_names(names, len(descriptors), lambda i: f"query {i}")
        if len(descriptors) == 0:
            return []
        paths = None if query_paths is None else [Path(p) for p in query_paths]
        answers = answer(self.bundle, descriptors, k, self.options, query_paths=paths, device=self.device)
        return query_results(answers, self.bundle.database, names, sequence_scored=self.options.sequence is not None)

    def query(self, images_: ImageInput | Sequence[ImageInput], k: int = 5,
              names: Sequence[str] | None = None) -> list[QueryResult]:
        """Where were these photos taken: the top-k database matches and a position per image."""
        from vpr.data.images import image_list, image_name
        from vpr.retrieval.results import query_names

        items = image_list(images_)
        names = query_names(names, len(items), lambda i: image_name(items[i], i))
        paths = items if all(isinstance(item, (str, os.PathLike)) for item in items) else None
        return self.search(self.describe(items, names=names), k, names, query_paths=paths)

    def evaluate(self, queries: GeoImageSet, *, ns: tuple[int, ...] = (1, 5, 10, 20), gt: str | os.PathLike | None = None,
                 threshold: float = 25.0, options: ExtractOptions | None = None,
                 progress: Progress | None = None, descriptors: np.ndarray | None = None,
                 gt_kind: str | None = None, benchmark: Benchmark | None = None) -> EvalReport:
        """Recall@N on labelled `queries` (positives within `threshold` metres, from a ground-truth file `gt` of
        kind `gt_kind`, or `benchmark`'s own), answered as this index answers queries, with the position
        estimate's error (`vpr eval`); `descriptors` (from `describe`) skip describing the queries again."""
        import math

        from vpr.evaluation.evaluate import evaluate
        from vpr.retrieval.search import query_rows

        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
            raise UsageError(f"`threshold={threshold}`: must be a positive number of metres, e.g. 25")
        return evaluate(self.bundle, queries, ns=ns, gt=None if gt is None else Path(gt), threshold=threshold,
                        options=options or self.extract_options, answer_options=self.options, progress=progress,
                        model=self.describer if options is None else None, gt_kind=gt_kind, benchmark=benchmark,
                        descriptors=None if descriptors is None else query_rows(descriptors, self.bundle.dim))

    def positions(self, most: int) -> dict:
        """The database positions (UTM) for a map, at most `most` evenly chosen."""
        utm = self.bundle.database.utm
        if utm is None:
            return {"zone": None, "step": 1, "points": []}
        step = max(1, -(-len(utm) // most))
        return {"zone": self.info()["zone"], "step": step, "points": [[round(float(e), 2), round(float(n), 2)]
                                                                      for e, n in utm[::step]]}

    def thumbnail(self, image_id: int, size: int):
        """An upright RGB thumbnail (longest side `size`) of database row `image_id` (`IndexError` outside it)."""
        from vpr.data.images import load_thumbnail

        if not 0 <= image_id < len(self):
            raise IndexError(image_id)
        return load_thumbnail(self.bundle.database.paths[image_id], size)
