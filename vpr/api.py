"""The public Python API: load an index, query it with images, build an index, load a model.

    from vpr.api import Index
    index = Index.load("indexes/demo-small")
    result = index.query(["photo.jpg"], k=5)[0]   # result.matches[0].path, result.position

Images may be paths, PIL images, H x W x 3 (or H x W) uint8 arrays or the bytes of an image file.
Results are dataclasses whose `to_dict()` gives the JSON of `vpr query --json` (and of `vpr serve`).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch
from PIL import Image

from vpr.data.datasets import GeoImageSet, load_image_set
from vpr.data.geo import utm_to_latlon
from vpr.data.images import MAX_INPUT_PIXELS, MAX_PIXELS, Preprocess, decode_rgb, load_rgb, preprocess, to_rgb, upright_rgb
from vpr.data.loading import same_size_groups
from vpr.errors import ImageError, ImageTooLarge, NotAnImage, UsageError
from vpr.models.inference import amp_dtype, forward_batch, inference_model
from vpr.models.model import ModelConfig, VPRModel
from vpr.models.pca import PCA
from vpr.retrieval import build as pipeline
from vpr.retrieval.answer import Answers, answer
from vpr.retrieval.options import AnswerOptions
from vpr.retrieval.options import ExtractOptions
from vpr.retrieval.results import similarity_to_distance
from vpr.retrieval.build import BuildReport, cache_dir_for
from vpr.retrieval.store import IndexBundle, load_index

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, bytes]
Progress = Callable[[int, int], None]

__all__ = [
    "AnswerOptions", "BuildReport", "ImageInput", "ImageTooLarge", "Index", "Match", "NotAnImage", "Position", "QueryResult",
    "build_index", "decode_image", "load_model", "resolve_device",
]


@dataclass(frozen=True)
class Match:
    """One retrieved database image: `id` is its row in the index, `distance` the L2 distance of unit descriptors."""

    rank: int
    id: int
    path: Path
    similarity: float
    distance: float
    utm_east: float | None
    utm_north: float | None
    lat: float | None
    lon: float | None
    heading: float | None
    score: float | None = None  # the sequence score that ordered the matches (sequence matching only)
    inliers: int | None = None  # geometrically verified local matches (re-ranking only)

    def to_dict(self) -> dict:
        """The match as `vpr query --json` prints it, plus its database `id` (and `score` / `inliers` when set)."""
        data = {
            "rank": self.rank, "id": self.id, "path": str(self.path), "distance": round(self.distance, 6),
            "similarity": round(self.similarity, 6), "utm_east": self.utm_east, "utm_north": self.utm_north,
            "lat": self.lat, "lon": self.lon, "heading": self.heading,
        }
        data.update({key: value for key, value in (("score", self.score), ("inliers", self.inliers)) if value is not None})
        return data


@dataclass(frozen=True)
class Position:
    """Where the query was probably taken (`vpr.retrieval.localize`): UTM, lat/lon when the zone is
    known, the share of the shortlist's weight that agrees (`confidence`, 0..1) and how many matches."""

    utm_east: float
    utm_north: float
    lat: float | None
    lon: float | None
    confidence: float
    support: int

    def to_dict(self) -> dict:
        """Plain JSON-ready values."""
        return {
            "utm_east": self.utm_east, "utm_north": self.utm_north, "lat": self.lat, "lon": self.lon,
            "confidence": round(self.confidence, 6), "support": self.support,
        }


@dataclass(frozen=True)
class QueryResult:
    """One query's ranked matches and its estimated position (None when the database has no positions)."""

    query: str
    matches: list[Match]
    position: Position | None
    inlier_pairs: np.ndarray | None = None  # re-ranked: the top match's inliers (m x 4: query x y, database x y)

    def to_dict(self) -> dict:
        """`{"query", "matches", "position"}` with plain JSON-ready values."""
        return {
            "query": self.query, "matches": [m.to_dict() for m in self.matches],
            "position": None if self.position is None else self.position.to_dict(),
        }


def whole_number(value: object, name: str, minimum: int = 1) -> int:
    """`value` as an int when it is a whole number >= `minimum` (not a bool, a float or a string), else a
    `UsageError` naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UsageError(f"{name} {value!r}: must be a whole number of at least {minimum}")
    return int(value)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when a GPU is visible, else the CPU; a named GPU must exist."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {name}: no CUDA GPU is visible; use device cpu")
    try:
        resolved = torch.device(name)
    except RuntimeError:
        raise UsageError(f"device {name}: use auto, cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise UsageError(f"device {name}: use auto, cpu, cuda or cuda:N")
    return resolved


def decode_image(data: bytes, name: str = "image", max_pixels: int | None = None) -> Image.Image:
    """The bytes of an image file (an upload) as an upright 8-bit RGB image, as `load_rgb` reads files.

    Raises `NotAnImage` for unrecognised bytes, `ImageTooLarge` above `max_pixels`, `ImageError` when corrupt.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UsageError(f"{name}: decode_image takes the bytes of an image file, not a {type(data).__name__}")
    if not data:
        raise ImageError(f"{name}: empty file (0 bytes)")
    return decode_rgb(io.BytesIO(bytes(data)), name, max_pixels)


def _as_rgb(image: ImageInput, name: str, max_pixels: int) -> Image.Image:
    """Any accepted image input as an upright 8-bit RGB PIL image."""
    if isinstance(image, (str, os.PathLike)):
        return load_rgb(Path(image))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image), name, max_pixels)
    if isinstance(image, Image.Image):
        if image.width * image.height > max_pixels:
            raise ImageTooLarge(f"{name}: {image.width}x{image.height} pixels is over the limit of {max_pixels:,}")
        return upright_rgb(image)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
            raise UsageError(f"{name}: arrays must be H x W x 3 (RGB) or H x W uint8, got {image.shape} {image.dtype}")
        if image.shape[0] * image.shape[1] > max_pixels or min(image.shape[:2]) == 0:
            raise ImageTooLarge(f"{name}: {image.shape[1]}x{image.shape[0]} pixels is empty or over the limit of {max_pixels:,}")
        return to_rgb(Image.fromarray(np.ascontiguousarray(image)))
    raise UsageError(f"{name}: a {type(image).__name__} is not an image; give a path, PIL image, uint8 array or file bytes")


def _default_name(image: ImageInput, i: int) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return getattr(image, "filename", "") or f"image {i}"


class Index:
    """A loaded index that answers queries: one inference copy of the model on `device`, kept for every call.

    Not thread-safe: call it from one thread at a time (`vpr serve` runs it in one worker thread).
    """

    def __init__(self, bundle: IndexBundle, device: str | torch.device = "auto", *, amp: bool = False,
                 batch_size: int = 32, options: AnswerOptions = AnswerOptions()) -> None:
        self.bundle = bundle
        self.device = resolve_device(device)
        self.amp = amp
        self.batch_size = whole_number(batch_size, "batch_size")
        self.options = options
        self._model: VPRModel | None = None

    @classmethod
    def load(cls, directory: str | os.PathLike, *, device: str | torch.device = "auto", amp: bool = False,
             batch_size: int = 32, nprobe: int | None = None, ef_search: int | None = None,
             options: AnswerOptions = AnswerOptions()) -> "Index":
        """Load and validate an index directory (`vpr build-index`); `nprobe` / `ef_search` tune ivfpq / hnsw
        search, `options` adds query expansion, sequence matching or re-ranking (`vpr.retrieval.answer`)."""
        bundle = load_index(Path(directory))
        bundle.set_search_params(nprobe=nprobe, ef_search=ef_search)
        return cls(bundle, device, amp=amp, batch_size=batch_size, options=options)

    def __len__(self) -> int:
        return len(self.bundle.database)

    @property
    def preprocessing(self) -> Preprocess:
        """How every query image becomes the model's input (the index's stored rule)."""
        return self.bundle.model.config.preprocess

    def info(self) -> dict:
        """What the index is: model configuration, descriptor size, database count, index kind, UTM zone."""
        manifest = self.bundle.manifest
        return {
            "index": str(self.bundle.directory), "model": manifest["model"], "dim": self.bundle.dim,
            "count": len(self), "index_kind": manifest["index_kind"], "zone": manifest.get("zone"),
            "positions": self.bundle.database.utm is not None, "device": str(self.device), "amp": self.amp,
            "vpr_version": manifest.get("vpr_version"),
        }

    def prepare(self, image: ImageInput, name: str = "image", max_pixels: int = MAX_PIXELS,
                max_input_pixels: int = MAX_INPUT_PIXELS) -> torch.Tensor:
        """Decode and resize one image to the model's input: a 3 x H x W tensor of 0..255 values (no model
        involved). `max_pixels` bounds the decoded image, `max_input_pixels` the model input after the
        index's resize rule (`ImageTooLarge` beyond either)."""
        return preprocess(_as_rgb(image, name, max_pixels), self.preprocessing, name, max_input_pixels)

    def describe_batch(self, batch: torch.Tensor | Sequence[torch.Tensor]) -> np.ndarray:
        """Descriptors in the index's space for images from `prepare` (an N x 3 x H x W batch, or a list):
        one forward pass per image size."""
        if self._model is None:
            self._model = inference_model(self.bundle.model, self.device)
        dtype = amp_dtype(self.device) if self.amp else None
        images = list(batch)
        out = np.zeros((len(images), self.bundle.model.config.descriptor_dim), dtype=np.float32)
        for rows in same_size_groups(images):
            stack = torch.stack([images[i] for i in rows]).to(self.device, non_blocking=True)
            out[rows] = forward_batch(self._model, stack, dtype).cpu().numpy()
        return self.bundle.project(out)

    def describe(self, images: Sequence[ImageInput], progress: Progress | None = None) -> np.ndarray:
        """Descriptors of `images` in the index's space, `batch_size` images per forward pass."""
        images = _as_list(images)
        rows = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            tensors = [self.prepare(image, _default_name(image, start + j)) for j, image in enumerate(chunk)]
            rows.append(self.describe_batch(tensors))
            if progress:
                progress(start + len(chunk), len(images))
        return np.concatenate(rows) if rows else np.zeros((0, self.bundle.dim), dtype=np.float32)

    def search(self, descriptors: np.ndarray, k: int = 5, names: Sequence[str] | None = None,
               query_paths: Sequence[Path] | None = None) -> list[QueryResult]:
        """Top-k matches and the position estimate for each descriptor row (from `describe`), through
        the same answering stages as `vpr query` (`options`; re-ranking needs `query_paths`)."""
        k = whole_number(k, "k")
        descriptors = self._checked_descriptors(descriptors)
        names = _names(names, len(descriptors), lambda i: f"query {i}")
        if len(descriptors) == 0:
            return []
        paths = None if query_paths is None else [Path(p) for p in query_paths]
        answers = answer(self.bundle, descriptors, k, self.options, query_paths=paths, device=str(self.device))
        distances = similarity_to_distance(answers.similarities)
        estimate = answers.estimate
        return [
            QueryResult(name, self._matches(answers, q, distances[q]),
                        self._position(estimate.utm[q], estimate.confidence[q], estimate.support[q]),
                        answers.pairs[q][0] if answers.pairs and answers.pairs[q] else None)
            for q, name in enumerate(names)
        ]

    def query(self, images: ImageInput | Sequence[ImageInput], k: int = 5,
              names: Sequence[str] | None = None) -> list[QueryResult]:
        """Where were these photos taken: the top-k database matches and a position per image."""
        images = _as_list(images)
        names = _names(names, len(images), lambda i: _default_name(images[i], i))
        paths = images if all(isinstance(image, (str, os.PathLike)) for image in images) else None
        return self.search(self.describe(images), k, names, query_paths=paths)

    def _checked_descriptors(self, descriptors: object) -> np.ndarray:
        """Query descriptors as an N x dim float32 array of finite values, or a `UsageError`."""
        try:
            array = np.asarray(descriptors, dtype=np.float32)
        except (TypeError, ValueError):
            raise UsageError(f"descriptors: a {type(descriptors).__name__} is not an N x {self.bundle.dim} array of numbers") from None
        if array.ndim != 2 or array.shape[1] != self.bundle.dim:
            raise UsageError(f"descriptors of shape {array.shape}: the index takes N x {self.bundle.dim} (from describe)")
        if not np.isfinite(array).all():
            raise UsageError("descriptors hold NaN or infinite values; describe the images again")
        return array

    def _matches(self, answers: Answers, q: int, distances: np.ndarray) -> list[Match]:
        db = self.bundle.database
        ranked_by_score = self.options.sequence is not None
        matches = []
        for r, i in enumerate(answers.indices[q]):
            if i < 0:
                continue
            east = north = lat = lon = None
            if db.utm is not None:
                east, north = float(db.utm[i, 0]), float(db.utm[i, 1])
                lat, lon = self._latlon(east, north)
            heading = None if db.heading is None or np.isnan(db.heading[i]) else float(db.heading[i])
            matches.append(Match(
                len(matches) + 1, int(i), db.paths[i], float(answers.similarities[q, r]), float(distances[r]),
                east, north, lat, lon, heading,
                score=float(answers.scores[q, r]) if ranked_by_score else None,
                inliers=None if answers.inliers is None else int(answers.inliers[q, r]),
            ))
        return matches

    def _position(self, utm: np.ndarray, confidence: float, support: int) -> Position | None:
        if not np.isfinite(utm).all():
            return None
        east, north = float(utm[0]), float(utm[1])
        return Position(east, north, *self._latlon(east, north), float(confidence), int(support))

    def _latlon(self, east: float, north: float) -> tuple[float | None, float | None]:
        zone = self.bundle.database.zone
        if zone is None:
            return None, None
        lat, lon = utm_to_latlon(east, north, zone[0], zone[1])
        return (lat, lon) if math.isfinite(lat) and math.isfinite(lon) else (None, None)


def _as_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One image or a sequence of them, as a list."""
    single = isinstance(images, (str, os.PathLike, Image.Image, bytes, bytearray, memoryview)) or (
        isinstance(images, np.ndarray) and images.ndim in (2, 3))
    if single:
        return [images]
    if not isinstance(images, Sequence) and not isinstance(images, np.ndarray):
        raise UsageError(f"images: a {type(images).__name__} is not an image or a list of images; give paths, PIL images, "
                         "uint8 arrays or file bytes")
    return list(images)


def _names(names: Sequence[str] | None, count: int, default: Callable[[int], str]) -> list[str]:
    """One name per query: `names` when given (as many as the queries), else `default(i)`."""
    if names is None:
        return [default(i) for i in range(count)]
    names = [str(name) for name in names]
    if len(names) != count:
        raise UsageError(f"names: {len(names)} names for {count} queries; give one name per query or none")
    return names


def load_model(checkpoint: str | os.PathLike | None = None, config: ModelConfig | None = None, *,
               pretrained: str | None = None, fmt: str | None = None) -> tuple[VPRModel, PCA | None]:
    """A model and its own PCA: a checkpoint (vpr's or a published layout; `fmt` forces one) when given,
    else `config` (default: ResNet18 + CosPlace 512-d) built from scratch, seeded."""
    if config is not None and not isinstance(config, ModelConfig):
        raise UsageError(f"config: a {type(config).__name__}, not a ModelConfig")
    return pipeline.load_model(None if checkpoint is None else Path(checkpoint), config or ModelConfig(), pretrained, fmt)


def build_index(
    database: str | os.PathLike | GeoImageSet, out: str | os.PathLike, *, model: VPRModel | None = None,
    model_pca: PCA | None = None, pca_dim: int | None = None, whiten: bool = False, kind: str = "flat",
    device: str | torch.device = "auto", batch_size: int = 32, workers: int = 2, amp: bool = False,
    cache: bool = True, skip_bad: bool = False, progress: Progress | None = None,
) -> BuildReport:
    """Index a folder, a CSV manifest or a `GeoImageSet` into the directory `out` (as `vpr build-index`):
    `model` defaults to `load_model()`; `cache` keeps descriptors in `OUT.cache` so a rerun resumes."""
    if not isinstance(database, (GeoImageSet, str, os.PathLike)):
        raise UsageError(f"database: a {type(database).__name__}, not a folder, a CSV manifest or a GeoImageSet")
    batch_size, workers = whole_number(batch_size, "batch_size"), whole_number(workers, "workers", minimum=0)
    images = database if isinstance(database, GeoImageSet) else load_image_set(Path(database))
    if model is None:
        model, model_pca = load_model()
    options = ExtractOptions(batch_size=batch_size, num_workers=workers, device=resolve_device(device), amp=amp,
                             skip_bad=skip_bad)
    out = Path(out)
    return pipeline.build_index(
        images, out, model=model, model_pca=model_pca, pca_dim=pca_dim, pca_whiten=whiten, kind=kind,
        options=options, cache=cache_dir_for(out) if cache else None, progress=progress,
    )
