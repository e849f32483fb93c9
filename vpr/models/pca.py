"""PCA (optionally whitened) that compresses descriptors, then re-normalises them.

NetVLAD's WPCA: y = L2( diag(lambda)^-1/2 U^T (x - mu) ). Fitted with scikit-learn, applied with
numpy so an index or a checkpoint can carry it as plain arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vpr.errors import UsageError

RANK_TOLERANCE = 1e-6  # variance relative to the largest below which a direction counts as not spanned
MAX_SAMPLES = 200_000  # descriptors a PCA is fitted on; more add nothing measurable and cost memory


@dataclass(frozen=True)
class PCA:
    """A fitted projection: mean (D,), components (d, D), scale (d,) (1/sqrt(var) when whitened)."""

    mean: np.ndarray
    components: np.ndarray
    scale: np.ndarray
    whiten: bool

    @property
    def in_dim(self) -> int:
        return int(self.components.shape[1])

    @property
    def out_dim(self) -> int:
        return int(self.components.shape[0])

    def transform(self, x: np.ndarray, chunk: int = 4096) -> np.ndarray:
        """Project descriptors (N x D) to L2-normalised float32 (N x d), `chunk` rows at a time so the
        temporaries stay bounded whatever N."""
        if x.shape[1] != self.in_dim:
            raise UsageError(f"PCA expects {self.in_dim}-d descriptors, got {x.shape[1]}-d")
        out = np.empty((len(x), self.out_dim), dtype=np.float32)
        for start in range(0, len(x), chunk):
            y = (np.asarray(x[start:start + chunk], dtype=np.float32) - self.mean) @ self.components.T
            y *= self.scale
            y /= np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
            out[start:start + chunk] = y
        return out

    def to_state(self) -> dict:
        """Tensors only, so it can live in a weights-only checkpoint."""
        return {
            "mean": torch.from_numpy(self.mean), "components": torch.from_numpy(self.components),
            "scale": torch.from_numpy(self.scale), "whiten": torch.tensor(self.whiten),
        }

    @classmethod
    def from_state(cls, state: dict) -> "PCA":
        return cls(
            mean=np.asarray(state["mean"], dtype=np.float32),
            components=np.asarray(state["components"], dtype=np.float32),
            scale=np.asarray(state["scale"], dtype=np.float32),
            whiten=bool(state["whiten"]),
        )


def fit_pca(descriptors: np.ndarray, dim: int, whiten: bool = False, seed: int = 0,
            max_samples: int = MAX_SAMPLES) -> PCA:
    """Fit a `dim`-component PCA on database descriptors (N x D), in memory bounded by `max_samples` x D.

    Past `max_samples` rows it fits on a seeded random sample. With at least as many rows as
    dimensions it eigendecomposes the D x D covariance (`_covariance_pca`); with fewer it takes
    scikit-learn's full SVD of the rows.
    """
    n, d = descriptors.shape
    if not 1 <= dim <= min(n, d):
        raise UsageError(
            f"`pca_dim` {dim} is impossible with {n} descriptors of size {d}; use at most {min(n, d)}"
        )
    if n > max_samples:  # rows read from an on-disk reader too: only the sample is ever in memory
        x = np.asarray(descriptors[np.sort(np.random.default_rng(seed).choice(n, max_samples, replace=False))], dtype=np.float32)
    else:
        x = np.asarray(descriptors[:], dtype=np.float32)
    if len(x) >= d:
        mean, components, variance = _covariance_pca(x, dim)
    else:
        from sklearn.decomposition import PCA as SklearnPCA  # fitting only: scikit-learn takes ~0.7 s to import

        pca = SklearnPCA(n_components=dim, whiten=whiten, svd_solver="full", random_state=seed).fit(x)
        mean, components, variance = pca.mean_, pca.components_, pca.explained_variance_
    variance = variance.astype(np.float32)
    if whiten:
        spanned = int((variance > RANK_TOLERANCE * max(float(variance.max(initial=0.0)), 1e-30)).sum())
        if spanned < dim:  # whitening would scale a direction the data does not span by ~1e6
            raise UsageError(f"`pca_dim` {dim} with `whiten`: the {len(x)} descriptors span only {spanned} dimensions "
                             f"(centred, n descriptors span at most n - 1); use `pca_dim` {max(spanned, 1)} or fewer, or drop `whiten`")
    scale = 1.0 / np.sqrt(np.maximum(variance, 1e-12)) if whiten else np.ones(dim, dtype=np.float32)
    return PCA(
        mean=mean.astype(np.float32), components=components.astype(np.float32),
        scale=scale.astype(np.float32), whiten=whiten,
    )


def _covariance_pca(x: np.ndarray, dim: int, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, top-`dim` components, their variances) of the rows of `x`, as scikit-learn's PCA gives
    them (variance with n - 1, each component's largest entry positive), from the float64 covariance
    summed over row chunks and only its top eigenpairs: one D x D matrix, not several (8448-d: 0.6 GB)."""
    from scipy.linalg import eigh

    n, d = x.shape
    mean = x.mean(axis=0, dtype=np.float64)
    covariance = np.zeros((d, d), dtype=np.float64)
    for start in range(0, n, chunk):
        block = x[start:start + chunk].astype(np.float64) - mean
        covariance += block.T @ block
    covariance /= max(n - 1, 1)
    values, vectors = eigh(covariance, subset_by_index=[d - dim, d - 1], overwrite_a=True, check_finite=False)
    order = np.argsort(values)[::-1]
    components = vectors[:, order].T  # dim x D
    signs = np.sign(components[np.arange(dim), np.abs(components).argmax(axis=1)])
    return mean, components * signs[:, None], np.maximum(values[order], 0.0)
