"""Geometric re-ranking of a global shortlist by spatial verification of local features.

As in DELG, Patch-NetVLAD and hloc: the query's local features are matched to each of the top-K
candidates' (nearest neighbours with Lowe's ratio test, optionally mutual), a homography (default)
or fundamental matrix is fitted to the matches with RANSAC (OpenCV's USAC MAGSAC++ where available),
and candidates are reordered by their inlier count, ties by global similarity. Only candidates with
at least `min_inliers` inliers count as verified; a query with none keeps the global order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from threadpoolctl import threadpool_limits

from vpr.data.images import load_rgb
from vpr.errors import UsageError
from vpr.retrieval.options import RerankOptions
from vpr.fileio import save_png
from vpr.retrieval.local_features import DESCRIPTOR_BYTES, ImageFeatures, LocalFeatureStore, require_opencv

log = logging.getLogger(__name__)

MODELS = {"homography": 4, "fundamental": 8}  # model -> fewest matches RANSAC can fit it to
ORB_BITS = 256
RANSAC_METHOD = "USAC_DEFAULT"  # OpenCV >= 4.5: LO-RANSAC + SPRT, ~4x faster than cv2.RANSAC (the fallback)
RANSAC_CONFIDENCE = 0.999
RANSAC_MAX_ITERS = 2000
DRAW_HEIGHT = 360
LINE_COLOURS = ((40, 220, 60), (250, 200, 30), (40, 160, 250), (250, 80, 200), (250, 120, 40))


@dataclass
class Verification:
    """One query-candidate pair: inlier count, inlier pairs (m x 4: query x y, candidate x y, original pixels), model."""

    inliers: int
    pairs: np.ndarray
    model: np.ndarray | None  # 3 x 3, maps query to candidate pixels (homography) or x_c^T F x_q = 0


@dataclass
class Reranked:
    """A re-ranked shortlist; `order` indexes the given candidates, the other fields follow the new order."""

    order: np.ndarray
    ids: np.ndarray
    inliers: np.ndarray
    pairs: list[np.ndarray]
    verified: bool  # whether some candidate reached `min_inliers` (otherwise the global order is kept)


def matching_vectors(descriptors: np.ndarray, method: str, root_sift: bool = True) -> np.ndarray:
    """Descriptors as float32 rows for inner-product matching: unit (Root)SIFT, or ORB bits as +-1."""
    if method == "orb":
        return np.unpackbits(descriptors, axis=1).astype(np.float32) * 2.0 - 1.0
    vectors = descriptors.astype(np.float32)
    if root_sift:
        vectors = np.sqrt(vectors / np.maximum(vectors.sum(axis=1, keepdims=True), 1e-12))
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _distances(similarity: np.ndarray, method: str) -> np.ndarray:
    """Inner products of matching vectors -> L2 distance (SIFT) or Hamming distance (ORB)."""
    if method == "orb":
        return (ORB_BITS - similarity) / 2.0
    return np.sqrt(np.maximum(2.0 - 2.0 * similarity, 0.0))


def match_vectors(
    query: np.ndarray, candidate: np.ndarray, method: str, ratio: float, mutual: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Tentative matches (query rows, candidate rows): nearest neighbours passing the ratio test (and mutual check)."""
    if len(query) == 0 or len(candidate) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    similarity = query @ candidate.T
    rows = np.arange(len(query))
    best = similarity.argmax(axis=1)
    keep = np.ones(len(query), bool)
    if mutual:
        keep = similarity.argmax(axis=0)[best] == rows
    first = similarity[rows, best]
    similarity[rows, best] = -np.inf
    second = similarity.max(axis=1)
    keep &= _distances(first, method) < ratio * _distances(second, method)
    return rows[keep], best[keep]


def _fit(cv2, src: np.ndarray, dst: np.ndarray, options: RerankOptions) -> tuple[np.ndarray | None, np.ndarray]:
    """RANSAC fit of the model to matched points; returns (3 x 3 model or None, inlier mask)."""
    method = getattr(cv2, RANSAC_METHOD, cv2.RANSAC)
    try:
        if options.model == "homography":
            model, mask = cv2.findHomography(
                src, dst, method, options.threshold, maxIters=RANSAC_MAX_ITERS, confidence=RANSAC_CONFIDENCE
            )
        else:
            model, mask = cv2.findFundamentalMat(src, dst, method, options.threshold, RANSAC_CONFIDENCE, RANSAC_MAX_ITERS)
    except cv2.error as exc:  # degenerate point sets (all collinear, repeated points)
        log.debug("RANSAC failed: %s", exc)
        return None, np.zeros(len(src), bool)
    if model is None or mask is None or model.shape != (3, 3):
        return None, np.zeros(len(src), bool)
    return model, mask.ravel().astype(bool)


def _to_original(model: np.ndarray, query: ImageFeatures, candidate: ImageFeatures, kind: str) -> np.ndarray:
    """A model fitted in working-frame pixels, expressed in original pixels."""
    to_query, to_candidate = query.to_working(), candidate.to_working()
    if kind == "homography":
        return np.linalg.inv(to_candidate) @ model @ to_query
    return to_candidate.T @ model @ to_query


def verify_pair(
    query: ImageFeatures, candidate: ImageFeatures, method: str, options: RerankOptions,
    query_vectors: np.ndarray | None = None,
) -> Verification:
    """Match two images' features and count the RANSAC inliers of the geometric model (`query_vectors`: precomputed)."""
    cv2 = require_opencv()
    if query_vectors is None:
        query_vectors = matching_vectors(query.descriptors, method, options.root_sift)
    candidate_vectors = matching_vectors(candidate.descriptors, method, options.root_sift)
    q_rows, c_rows = match_vectors(query_vectors, candidate_vectors, method, options.ratio, options.mutual)
    if len(q_rows) < MODELS[options.model]:
        return Verification(0, np.zeros((0, 4), np.float32), None)
    model, mask = _fit(cv2, query.keypoints[q_rows], candidate.keypoints[c_rows], options)
    pairs = np.hstack([query.original_xy(q_rows[mask]), candidate.original_xy(c_rows[mask])]).astype(np.float32)
    original = None if model is None else _to_original(model, query, candidate, options.model)
    return Verification(int(mask.sum()), pairs, original)


def rerank_shortlist(
    query_features: ImageFeatures, candidate_ids: Sequence[int], candidate_similarities: Sequence[float],
    store: LocalFeatureStore, options: RerankOptions,
) -> Reranked:
    """Reorder a shortlist (database rows, global similarities) by verified inliers, ties by similarity."""
    ids = np.asarray(candidate_ids, dtype=np.int64)
    similarities = np.asarray(candidate_similarities, dtype=np.float64)
    method = store.config.method
    if ids.shape != similarities.shape:
        raise ValueError(f"{len(ids)} candidate ids but {len(similarities)} similarities")
    if query_features.descriptors.shape[1:] != (DESCRIPTOR_BYTES[method],):
        raise UsageError(
            f"the query's local features are not {method} features like {store.path}'s; extract them with store.config"
        )
    query_vectors = matching_vectors(query_features.descriptors, method, options.root_sift)
    with threadpool_limits(1, user_api="blas"):  # small products: threads only add overhead (20x under load)
        checks = [verify_pair(query_features, store[int(i)], method, options, query_vectors) for i in ids]
    inliers = np.array([c.inliers for c in checks], dtype=np.int64)
    counted = np.where(inliers >= options.min_inliers, inliers, 0)
    order = np.lexsort((-similarities, -counted))
    return Reranked(
        order=order, ids=ids[order], inliers=inliers[order], pairs=[checks[i].pairs for i in order],
        verified=bool(counted.any()),
    )


def draw_inlier_matches(query_path: Path, db_path: Path, pairs: np.ndarray, out_png: Path, option: str = "`viz`") -> Path:
    """Draw the query beside a database image with a line per inlier pair (original pixels) into a vpr PNG."""
    images = [load_rgb(query_path), load_rgb(db_path)]
    factors = [DRAW_HEIGHT / img.height for img in images]
    images = [img.resize((max(1, round(img.width * f)), DRAW_HEIGHT), Image.BICUBIC) for img, f in zip(images, factors)]
    gap = 8
    canvas = Image.new("RGB", (images[0].width + gap + images[1].width, DRAW_HEIGHT + 20), (255, 255, 255))
    canvas.paste(images[0], (0, 20))
    canvas.paste(images[1], (images[0].width + gap, 20))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), f"{len(pairs)} inliers: {Path(query_path).name} -> {Path(db_path).name}", fill=(0, 0, 0))
    offset = images[0].width + gap
    for n, (xq, yq, xd, yd) in enumerate(np.asarray(pairs, dtype=np.float64).reshape(-1, 4)):
        colour = LINE_COLOURS[n % len(LINE_COLOURS)]
        start = (xq * factors[0], yq * factors[0] + 20)
        end = (offset + xd * factors[1], yd * factors[1] + 20)
        draw.line((*start, *end), fill=colour, width=1)
        for x, y in (start, end):
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), outline=colour)
    save_png(canvas, Path(out_png), option)
    return Path(out_png)
