"""Local features for geometric verification: OpenCV SIFT (default) or ORB keypoints per image.

Each image is read upright as greyscale and resized to its *working frame*: the longer side at most
`max_side`, and small images enlarged until the shorter side reaches `min_side` (within `max_side`),
since SIFT finds few keypoints on thumbnails. Keypoint coordinates are stored in that working frame
(RANSAC thresholds are in its pixels) with the per-image `scale` (working / original, x and y), so
original pixels are `xy / scale`. At most `max_keypoints` are kept, strongest first. Descriptors are
uint8: SIFT's 128 values rounded (RootSIFT is applied at matching time), ORB's 32 binary bytes.

A database's features live in one HDF5 file (`local_features.h5` in the index directory):
attrs `format`, `version`, `method`, `max_keypoints`, `max_side`, `min_side`; datasets `paths` (n),
`offsets` (n + 1, int64: image i owns rows offsets[i]:offsets[i+1]), `scales` (n x 2 float32),
`keypoints` (N x 2 float32, x y) and `descriptors` (N x D uint8), both chunked by rows so a query
reads only its candidates' rows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import h5py
import numpy as np
from PIL import Image

from vpr.data.images import load_rgb
from vpr.errors import DependencyError, IndexFormatError, UsageError
from vpr.fileio import atomic_file, h5_file
from vpr.retrieval.options import LOCAL_METHODS as DESCRIPTOR_BYTES, LocalFeatureConfig

log = logging.getLogger(__name__)

LOCAL_FEATURES_FILE = "local_features.h5"
FORMAT = "vpr-local-features"
FORMAT_VERSION = 1
CHUNK_ROWS = 256  # keypoint rows per HDF5 chunk: one image's read touches few small chunks
REBUILD = "rebuild the index with `local_features`"


def require_opencv():
    """Import OpenCV or explain how to install it."""
    try:
        import cv2
    except ImportError as exc:
        raise DependencyError("local features need OpenCV: pip install 'vpr[local]' (opencv-python-headless)") from exc
    return cv2


@dataclass
class ImageFeatures:
    """One image's keypoints (n x 2 float32, working frame), descriptors (n x D uint8) and scale (working / original)."""

    keypoints: np.ndarray
    descriptors: np.ndarray
    scale: np.ndarray

    def original_xy(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Keypoint coordinates in the original image's pixels (pixel centres at integers, as OpenCV's)."""
        return (self.keypoints[rows] + 0.5) / self.scale - 0.5

    def to_working(self) -> np.ndarray:
        """The 3 x 3 affine map from original to working-frame pixel coordinates."""
        sx, sy = (float(v) for v in self.scale)
        return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])


@dataclass
class LocalFeatures:
    """A database's features as extracted: `images` yields one `ImageFeatures` per path, once, lazily."""

    config: LocalFeatureConfig
    paths: list[Path]
    images: Iterable[ImageFeatures]


def working_size(width: int, height: int, config: LocalFeatureConfig) -> tuple[int, int]:
    """The (width, height) of the working frame for an image of `width` x `height`."""
    factor = min(config.max_side / max(width, height), max(1.0, config.min_side / min(width, height)))
    return max(1, round(width * factor)), max(1, round(height * factor))


def _detector(config: LocalFeatureConfig):
    cv2 = require_opencv()
    if config.method == "sift":
        return cv2.SIFT_create(nfeatures=config.max_keypoints)
    return cv2.ORB_create(nfeatures=config.max_keypoints)


def _grey_working(path: Path, config: LocalFeatureConfig) -> tuple[np.ndarray, np.ndarray]:
    """The image as a uint8 greyscale working-frame array, and its scale (working / original)."""
    img = load_rgb(path).convert("L")
    size = working_size(img.width, img.height, config)
    scale = np.array([size[0] / img.width, size[1] / img.height], dtype=np.float32)
    if size != img.size:
        img = img.resize(size, Image.BICUBIC if size[0] > img.width else Image.BOX)
    return np.asarray(img, dtype=np.uint8), scale


def _detect(detector, grey: np.ndarray, config: LocalFeatureConfig, scale: np.ndarray) -> ImageFeatures:
    keypoints, descriptors = detector.detectAndCompute(grey, None)
    dim = DESCRIPTOR_BYTES[config.method]
    if descriptors is None or not keypoints:
        return ImageFeatures(np.zeros((0, 2), np.float32), np.zeros((0, dim), np.uint8), scale)
    strongest = np.argsort([-k.response for k in keypoints], kind="stable")[: config.max_keypoints]
    xy = np.array([keypoints[i].pt for i in strongest], dtype=np.float32).reshape(-1, 2)
    desc = descriptors[strongest]
    if desc.dtype != np.uint8:  # SIFT's floats are already on a 0..255 scale
        desc = np.clip(np.rint(desc), 0, 255).astype(np.uint8)
    return ImageFeatures(xy, np.ascontiguousarray(desc), scale)


def extract_image_features(path: Path, config: LocalFeatureConfig, detector=None) -> ImageFeatures:
    """Local features of one image file; a missing or unreadable image raises `ImageError` naming it."""
    grey, scale = _grey_working(Path(path), config)
    return _detect(detector or _detector(config), grey, config, scale)


def extract_local_features(
    paths: Sequence[Path], config: LocalFeatureConfig, progress: Callable[[int, int], None] | None = None
) -> LocalFeatures:
    """Features of every image in `paths`, extracted lazily as `write_local_features` consumes them."""
    paths = [Path(p) for p in paths]
    detector = _detector(config)  # fails here, before any work, when OpenCV is missing

    def images() -> Iterator[ImageFeatures]:
        for done, path in enumerate(paths, start=1):
            yield extract_image_features(path, config, detector)
            if progress is not None:
                progress(done, len(paths))

    return LocalFeatures(config=config, paths=paths, images=images())


def write_local_features(path: Path, features: LocalFeatures, generation: str | None = None) -> None:
    """Write a database's features to one HDF5 file atomically, streaming image by image; `generation`
    binds the file to the index build it belongs to."""
    config, count = features.config, len(features.paths)
    dim = DESCRIPTOR_BYTES[config.method]
    with atomic_file(path) as tmp, h5_file(tmp) as f:
        f.attrs.update(
            format=FORMAT, version=FORMAT_VERSION, method=config.method, max_keypoints=config.max_keypoints,
            max_side=config.max_side, min_side=config.min_side, **({"generation": generation} if generation else {}),
        )
        f.create_dataset("paths", data=[str(p) for p in features.paths], dtype=h5py.string_dtype())
        xy = f.create_dataset("keypoints", shape=(0, 2), maxshape=(None, 2), dtype=np.float32, chunks=(CHUNK_ROWS, 2))
        desc = f.create_dataset("descriptors", shape=(0, dim), maxshape=(None, dim), dtype=np.uint8, chunks=(CHUNK_ROWS, dim))
        offsets = np.zeros(count + 1, dtype=np.int64)
        scales = np.zeros((count, 2), dtype=np.float32)
        written = seen = 0
        for image in features.images:
            if seen == count:
                raise ValueError(f"more feature sets than the {count} paths")
            n = len(image.keypoints)
            xy.resize(written + n, axis=0)
            desc.resize(written + n, axis=0)
            xy[written:] = image.keypoints
            desc[written:] = image.descriptors
            written += n
            offsets[seen + 1], scales[seen] = written, image.scale
            seen += 1
        if seen != count:
            raise ValueError(f"{seen} feature sets for {count} paths")
        f.create_dataset("offsets", data=offsets)
        f.create_dataset("scales", data=scales)
    log.info("wrote %s: %d images, %d keypoints", path, count, written)


class LocalFeatureStore:
    """A database's features file, open for lazy per-image reads (only the requested rows leave the disk).

    `source` is the file's path or an open handle on it (`path` then names it in errors); `generation`,
    when given, must be the one the file was written with."""

    def __init__(self, path: Path, count: int | None = None, source: Path | BinaryIO | None = None,
                 generation: str | None = None):
        self.path = Path(path)
        try:
            self._file = h5py.File(source if source is not None else self.path, "r")
        except OSError as exc:
            if source is None and not self.path.exists():
                raise IndexFormatError(f"{self.path}: no local features here; {REBUILD}") from None
            raise IndexFormatError(f"{self.path}: unreadable local features file ({exc}); {REBUILD}") from exc
        try:
            self._load(count, generation)
        except BaseException:
            self._file.close()
            raise

    def _load(self, count: int | None, generation: str | None) -> None:
        f = self._file
        try:
            attrs = dict(f.attrs)
            if attrs.get("format") != FORMAT or attrs.get("version") != FORMAT_VERSION:
                raise IndexFormatError(
                    f"{self.path}: not a vpr local features file of version {FORMAT_VERSION}; {REBUILD}"
                )
            if generation is not None and attrs.get("generation") != generation:
                raise IndexFormatError(f"{self.path}: belongs to another build of the index than manifest.json; {REBUILD}")
            self.config = LocalFeatureConfig(
                method=str(attrs["method"]), max_keypoints=int(attrs["max_keypoints"]),
                max_side=int(attrs["max_side"]), min_side=int(attrs["min_side"]),
            )
            self.paths = [Path(p) for p in f["paths"][:].astype(str)]
            self._offsets = f["offsets"][:]
            self._scales = f["scales"][:]
            self._xy, self._desc = f["keypoints"], f["descriptors"]
        except (OSError, KeyError, ValueError, TypeError, UsageError) as exc:
            raise IndexFormatError(f"{self.path}: unreadable or missing local feature data ({str(exc)[:100]}); {REBUILD}") from None
        n = len(self.paths)
        rows = self._xy.shape[0]
        consistent = (
            self._offsets.shape == (n + 1,) and self._scales.shape == (n, 2) and self._offsets[0] == 0
            and bool(np.all(np.diff(self._offsets) >= 0)) and self._offsets[-1] == rows
            and self._xy.shape == (rows, 2) and self._desc.shape == (rows, DESCRIPTOR_BYTES[self.config.method])
            and self._desc.dtype == np.uint8
        )
        if not consistent:
            raise IndexFormatError(f"{self.path}: local feature arrays do not fit together; {REBUILD}")
        if count is not None and n != count:
            raise IndexFormatError(f"{self.path}: features for {n} images, the index holds {count}; {REBUILD}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> ImageFeatures:
        start, stop = int(self._offsets[index]), int(self._offsets[index + 1])
        try:
            return ImageFeatures(self._xy[start:stop], self._desc[start:stop], self._scales[index])
        except OSError as exc:
            raise IndexFormatError(f"{self.path}: corrupt local features of image {index} ({exc}); {REBUILD}") from exc

    def close(self) -> None:
        """Close the HDF5 file."""
        self._file.close()

    def __enter__(self) -> LocalFeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_local_features(path: Path, count: int | None = None, source: Path | BinaryIO | None = None,
                        generation: str | None = None) -> LocalFeatureStore:
    """Open a features file for lazy reads; a wrong, corrupt or mismatched (`count` images, another
    `generation`) file is an `IndexFormatError`."""
    return LocalFeatureStore(path, count, source, generation)
