"""The settings of each retrieval stage, one frozen dataclass per stage, in a module that imports nothing heavy:
the CLI reads its option defaults from these classes (so `vpr --help` needs neither torch nor numpy), and the
stages take them as given. Parameters are named as the dataclass fields; errors mark them in backticks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from vpr.errors import UsageError

DEFAULT_TOP_K = 10  # matches the position estimate looks at
DEFAULT_RADIUS = 25.0  # metres: the usual "same place" distance
GEOMETRIC_MODELS = ("homography", "fundamental")
LOCAL_METHODS = {"sift": 128, "orb": 32}  # descriptor bytes per keypoint
MAX_KEYPOINTS = 100_000
MAX_SIDE = 4096  # a local-feature working frame's longer side: SIFT's memory grows with its square


@dataclass(frozen=True)
class ExtractOptions:
    """How descriptors are computed: built once per command and taken by every extraction caller.

    `device`: a resolved device name ("cpu", "cuda:0"); `amp`: bf16/fp16 autocast
    (`vpr.models.inference.amp_dtype`); `compile`: torch.compile at one static batch shape (short batches
    padded, so it compiles once per call, tens of seconds); `decode_on_device`: JPEGs decoded on `device`
    (nvJPEG on CUDA) instead of PIL in the workers; `skip_bad`: unreadable images are recorded and left out
    instead of raising; `backend`: torch, onnxruntime or openvino (the model's exported graph), or an exported
    .onnx / .xml file of the same model (e.g. int8; `vpr.deploy`).
    """

    batch_size: int = 32
    num_workers: int = 2
    device: str = "cpu"
    amp: bool = False
    compile: bool = False
    decode_on_device: bool = False
    skip_bad: bool = False
    backend: str = "torch"

    def __post_init__(self) -> None:
        from vpr.deploy import check_backend

        object.__setattr__(self, "device", str(self.device))
        check_backend(self.backend)
        if self.backend != "torch" and (self.device != "cpu" or self.compile or self.decode_on_device):
            raise UsageError(f"`backend` {self.backend} runs on the CPU, without `compile` or `decode_on_device`; "
                             "give device cpu or use backend torch")
        for name, value, low in (("batch_size", self.batch_size, 1), ("workers", self.num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError(f"`{name}` {value!r}: must be a whole number of at least {low}")


@dataclass(frozen=True)
class Expansion:
    """Query expansion (or database-side augmentation): how many neighbours to average (0 = off) and the
    similarity exponent alpha (`vpr.retrieval.expansion`)."""

    n: int = 0
    alpha: float = 3.0

    def __post_init__(self) -> None:
        if self.n < 0:
            raise UsageError(f"expansion over {self.n} neighbours: must be 0 (off) or more")
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise UsageError(f"expansion alpha {self.alpha}: must be 0 or a positive number")


def speed_range(low: float, high: float, steps: int) -> tuple[float, ...]:
    """`steps` relative speeds evenly spaced from `low` to `high` (OpenSeqSLAM uses 0.8 to 1.25)."""
    if steps < 1 or low <= 0 or high < low:
        raise UsageError(f"speed range {low}:{high}:{steps} needs 0 < low <= high and at least one step")
    if steps == 1:
        return (float(low),)
    step = (high - low) / (steps - 1)  # as numpy.linspace computes them, its last value set to `high`
    return (*(float(i * step + low) for i in range(steps - 1)), float(high))


@dataclass(frozen=True)
class SequenceOptions:
    """SeqSLAM settings (`vpr.retrieval.sequence`): sequence length L (frames), relative speeds (database frames
    per query frame), contrast window (database frames, <= 1 for none), online (causal) or centred windows, top k."""

    length: int = 10
    speeds: tuple[float, ...] = (1.0,)
    window: int = 1  # off: it helps sharp matches (Nordland thumbnails) and ruins others (docs/benchmarks.md)
    causal: bool = False
    k: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "speeds", tuple(float(v) for v in self.speeds))  # a list from a caller is fine
        if self.length < 1 or self.k < 1 or self.window < 0:
            raise UsageError("sequence length and k must be at least 1, and the contrast window not negative")
        if not self.speeds or min(self.speeds) <= 0:
            raise UsageError("give at least one relative speed, each above 0")

    def offsets(self) -> range:
        """Query-frame offsets t of a path around the current frame (causal: the last L; else centred)."""
        first = -(self.length - 1) if self.causal else -(self.length // 2)
        return range(first, first + self.length)


@dataclass(frozen=True)
class RerankOptions:
    """Geometric re-ranking (`vpr.retrieval.rerank`): shortlist size, matching, the geometric model and the
    acceptance rule.

    `threshold`: RANSAC's reprojection (homography) or epipolar (fundamental) error in working-frame
    pixels (longer side <= 640); 16 px is loose, as in DELG (20 px) and Patch-NetVLAD (24 px), since a
    homography only approximates a 3-D scene across viewpoints. `min_inliers=12`: with the mutual check,
    different places keep at most 9 chance inliers (mean 2.6) over 1110 corridor pairs and 4 on
    Nordland, while 52% of true corridor pairs reach 12; a best candidate below it is not trusted.
    """

    k: int = 100
    ratio: float = 0.8
    mutual: bool = True
    model: str = "homography"
    threshold: float = 16.0
    min_inliers: int = 12
    root_sift: bool = True

    def __post_init__(self) -> None:
        if self.model not in GEOMETRIC_MODELS:
            raise UsageError(f"geometric model '{self.model}' is unknown; choose one of {', '.join(GEOMETRIC_MODELS)}")
        if not 0 < self.ratio <= 1 or self.threshold <= 0 or self.k < 1 or self.min_inliers < 1:
            raise UsageError("re-ranking needs 0 < ratio <= 1, threshold > 0, k >= 1 and min_inliers >= 1")


@dataclass(frozen=True)
class LocalFeatureConfig:
    """How local features are extracted (`vpr.retrieval.local_features`); stored with a database's features and
    reused for its queries."""

    method: str = "sift"
    max_keypoints: int = 1000
    max_side: int = 640
    min_side: int = 240

    def __post_init__(self) -> None:
        if self.method not in LOCAL_METHODS:
            raise UsageError(f"`local_method='{self.method}'` is unknown; choose one of {', '.join(LOCAL_METHODS)}")
        if not (1 <= self.max_keypoints <= MAX_KEYPOINTS and 1 <= self.min_side <= self.max_side <= MAX_SIDE):
            raise UsageError(
                f"local features need 1 <= max_keypoints <= {MAX_KEYPOINTS:,} and 1 <= min_side <= max_side <= {MAX_SIDE} "
                f"(got {self.max_keypoints}, {self.min_side}, {self.max_side})"
            )


@dataclass(frozen=True)
class AnswerOptions:
    """Everything beyond one nearest-neighbour search (`vpr.retrieval.answer`): each part is off by default."""

    qe: Expansion = field(default_factory=Expansion)
    sequence: SequenceOptions | None = None  # match ordered query frames against the ordered database
    rerank: RerankOptions | None = None  # verify the top K with local features and RANSAC
    position_k: int = DEFAULT_TOP_K
    position_radius: float = DEFAULT_RADIUS


INDEX_KINDS = ("flat", "ivfpq", "hnsw")


SPILL_BYTES = 1 << 30  # database descriptors past this size go to disk during build-index, not memory


@dataclass(frozen=True)
class BuildOptions:
    """How `build_index` makes an index from a database's descriptors (`vpr.retrieval.build`): the PCA (`pca_dim`
    dimensions, whitened or not), the index `kind`, database-side augmentation (`dba`), local features for
    geometric re-ranking, whether a descriptor cache resumes the build, how descriptors are extracted, and past how
    many bytes of descriptors they go to a file beside `out` instead of memory (`spill_bytes`)."""

    pca_dim: int | None = None
    whiten: bool = False
    kind: str = "flat"
    dba: Expansion = field(default_factory=Expansion)
    local_features: LocalFeatureConfig | None = None
    cache: bool = True
    extract: ExtractOptions = field(default_factory=ExtractOptions)
    spill_bytes: int = SPILL_BYTES

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise UsageError(f"`kind={self.kind}`: unknown index kind; choose one of {', '.join(INDEX_KINDS)}")
        if self.pca_dim is not None and (isinstance(self.pca_dim, bool) or self.pca_dim < 1):
            raise UsageError(f"`pca_dim={self.pca_dim}`: must be at least 1 (omit it to keep full descriptors)")
