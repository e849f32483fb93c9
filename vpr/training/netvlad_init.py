"""NetVLAD initialisation: k-means on sampled local features, then the soft-assignment sharpness alpha.

The head assigns a local feature x (L2-normalised) to cluster k with the paper's tied form
    a_k(x) = softmax_k(-alpha ||x - c_k||^2),  i.e.  w_k = 2 alpha c_k,  b_k = -alpha ||c_k||^2
(`NetVLAD.set_centroids`). alpha is chosen so that, on average over the sampled features, the
second-nearest cluster gets 1/100 of the nearest one's weight:
    alpha = -ln(0.01) / mean_x( ||x - c_(2)||^2 - ||x - c_(1)||^2 ).
This is the paper's tied form (its section 3) with the raw k-means centroids.
The reference code's default (`vladv1`, also the VG benchmark's) assigns by the cosine to
L2-normalised centroids, logits alpha' c_k.x / ||c_k|| without bias, with alpha' from the same
1/100 rule on those cosines. The two agree only for unit centroids (then alpha' = 2 alpha); k-means
centroids of unit features are shorter (0.93-0.97 measured), and the bias -alpha ||c_k||^2 then
differs between clusters, so vpr's initial assignment is not the reference default's. Both use the
raw centroids for the residuals.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from vpr.data.images import normalize_batch
from vpr.errors import ImageError, UsageError
from vpr.fileio import atomic_file, check_replaceable_file, h5_file
from vpr.models.heads import NetVLAD
from vpr.models.model import VPRModel
from vpr.data.loading import ImageFiles
from vpr.retrieval.extract import Progress
from vpr.retrieval.options import ExtractOptions
from vpr.retrieval.search import require_faiss

log = logging.getLogger(__name__)
SECOND_TO_FIRST = 0.01  # target a_(2) / a_(1), from the reference code
CLUSTERS_FORMAT = "vpr-netvlad-clusters"
INIT_OPTIONS = ExtractOptions(batch_size=16, num_workers=0)


@dataclass
class Clusters:
    """K-means centroids (K x C, float32) of local features and the matching assignment alpha."""

    centroids: np.ndarray
    alpha: float
    num_features: int
    reused: bool = False


def sample_local_features(
    model: VPRModel, paths: list[Path], *, num_images: int = 500, per_image: int = 100, seed: int = 0,
    options: ExtractOptions = INIT_OPTIONS, progress: Progress | None = None,
) -> np.ndarray:
    """L2-normalised backbone features (N x C): `per_image` random positions of `num_images` random images.

    An image has only as many positions as its feature map (ResNet18 layer4 at 240x320: 8 x 10 = 80):
    a larger `per_image` takes all of them and logs a warning saying so."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(paths), size=min(num_images, len(paths)), replace=False))
    dev = torch.device(options.device)
    was_training = model.training
    backbone = model.backbone.to(dev).eval()  # outside inference mode, or the weights could not be trained later
    loader = DataLoader(ImageFiles([paths[i] for i in chosen], model.config.input_size),
                        batch_size=options.batch_size, shuffle=False, num_workers=options.num_workers)
    features: list[np.ndarray] = []
    done = 0
    for images, _, errors, _ in loader:
        for error in errors:
            if error:
                raise ImageError(error)
        with torch.inference_mode():
            batch = normalize_batch(images.to(dev), model.config.mean, model.config.std)
            maps = F.normalize(backbone(batch).float(), dim=1).flatten(2).cpu().numpy()  # B x C x HW
        if per_image > maps.shape[2] and not features:
            log.warning(
                "init_per_image %d: the %dx%d input gives only %d feature-map positions per image; taking all %d "
                "(raise init_images for more features)", per_image, *model.config.input_size, maps.shape[2], maps.shape[2])
        for fmap in maps:
            take = rng.choice(fmap.shape[1], size=min(per_image, fmap.shape[1]), replace=False)
            features.append(fmap[:, take].T)
        done += len(images)
        if progress:
            progress(done, len(chosen))
    model.train(was_training)
    return np.ascontiguousarray(np.concatenate(features), dtype=np.float32)


def fit_centroids(features: np.ndarray, num_clusters: int, *, seed: int = 0, iterations: int = 100) -> np.ndarray:
    """K-means (FAISS, Euclidean) centroids of `features`, K x C float32."""
    if len(features) < num_clusters:
        raise UsageError(
            f"only {len(features)} local features for {num_clusters} clusters; "
            "use more `init_images` / `init_per_image` or fewer `clusters`"
        )
    faiss = require_faiss()
    kmeans = faiss.Kmeans(features.shape[1], num_clusters, niter=iterations, seed=seed, verbose=False,
                          min_points_per_centroid=1)
    kmeans.train(np.ascontiguousarray(features, dtype=np.float32))
    return np.asarray(kmeans.centroids, dtype=np.float32).copy()


def assignment_alpha(features: np.ndarray, centroids: np.ndarray) -> float:
    """alpha = -ln(0.01) / mean(second-smallest minus smallest squared distance to a centroid)."""
    x = torch.from_numpy(np.asarray(features, dtype=np.float32))
    c = torch.from_numpy(np.asarray(centroids, dtype=np.float32))
    squared = torch.cdist(x.double(), c.double()).pow(2)
    nearest = squared.topk(2, dim=1, largest=False).values
    gap = float((nearest[:, 1] - nearest[:, 0]).mean())
    if gap <= 0.0:
        raise UsageError("local features are all equidistant from two clusters; use fewer `clusters`")
    return -math.log(SECOND_TO_FIRST) / gap


def _backbone_hash(model: VPRModel) -> str:
    """SHA-256 of the backbone weights and preprocessing: what the sampled features depend on."""
    cfg = model.config
    digest = hashlib.sha256(repr((cfg.backbone, cfg.layer, cfg.input_size, cfg.mean, cfg.std)).encode())
    for name, tensor in model.backbone.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def clusters_key(model: VPRModel, paths: list[Path], *, num_images: int, per_image: int, seed: int, iterations: int) -> str:
    """Identity of a clustering: backbone, images and sampling settings; a cache with another key is redone."""
    settings = {
        "backbone": _backbone_hash(model), "num_clusters": model.config.num_clusters,
        "paths": hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest(),
        "num_images": num_images, "per_image": per_image, "seed": seed, "iterations": iterations,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def load_clusters(path: Path, key: str) -> Clusters | None:
    """The clusters cached in `path` when it was made with `key`, else None."""
    if not Path(path).is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            if f.attrs["key"] != key:
                log.info("cluster cache %s was made with other settings; recomputing it", path)
                return None
            return Clusters(np.asarray(f["centroids"], dtype=np.float32), float(f.attrs["alpha"]),
                            int(f.attrs["num_features"]), reused=True)
    except (OSError, KeyError) as exc:
        log.warning("cluster cache %s unreadable (%s); recomputing it", path, exc)
        return None


def is_clusters_file(path: Path) -> bool:
    """Whether `path` is an HDF5 cluster cache written by vpr (earlier versions wrote no format tag)."""
    try:
        with h5py.File(path, "r") as f:
            tagged = f.attrs.get("format") == CLUSTERS_FORMAT
            return tagged or ({"key", "alpha", "num_features"} <= set(f.attrs) and set(f) == {"centroids"})
    except (OSError, ValueError):
        return False


def save_clusters(path: Path, clusters: Clusters, key: str) -> None:
    """Write the centroids and alpha to HDF5 atomically."""
    with atomic_file(Path(path)) as tmp:
        with h5_file(tmp) as f:
            f.create_dataset("centroids", data=clusters.centroids)
            f.attrs["alpha"] = clusters.alpha
            f.attrs["num_features"] = clusters.num_features
            f.attrs["key"] = key
            f.attrs["format"] = CLUSTERS_FORMAT


def init_netvlad(
    model: VPRModel, paths: list[Path], *, cache: Path | None = None, num_images: int = 500, per_image: int = 100,
    seed: int = 0, iterations: int = 100, options: ExtractOptions = INIT_OPTIONS, progress: Progress | None = None,
) -> Clusters:
    """Cluster local features of `paths` (or reuse `cache`) and set the model's NetVLAD centroids and alpha."""
    if not isinstance(model.head, NetVLAD):
        raise UsageError(f"NetVLAD initialisation needs a netvlad head, not '{model.config.head}'")
    if cache is not None:
        check_replaceable_file(cache, is_clusters_file, "NetVLAD cluster cache", "`clusters_cache`")
    key = clusters_key(model, paths, num_images=num_images, per_image=per_image, seed=seed, iterations=iterations)
    clusters = load_clusters(cache, key) if cache is not None else None
    if clusters is None:
        features = sample_local_features(model, paths, num_images=num_images, per_image=per_image, seed=seed,
                                          options=options, progress=progress)
        centroids = fit_centroids(features, model.config.num_clusters, seed=seed, iterations=iterations)
        clusters = Clusters(centroids, assignment_alpha(features, centroids), len(features))
        if cache is not None:
            save_clusters(cache, clusters, key)
    head = model.head
    head.set_centroids(torch.from_numpy(clusters.centroids).to(head.centroids.device), clusters.alpha)
    return clusters
