"""Weakly supervised tuples and hard-negative mining for NetVLAD (Arandjelovic et al. 2016, sec. 4).

GPS gives, per training query, potential positives (database images within 10 m) and definite
negatives (farther than 25 m). From a feature cache of the current model, the best positive is the
feature-nearest potential positive, and the negatives are the hardest among the query's remembered
hard negatives plus a fresh random sample that violate the margin: d^2(q, n) < d^2(q, p*) + m.
All of this runs in the main process, so the memory of hard negatives is never lost in
DataLoader workers (the workers only decode the images of already mined tuples).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vpr.data.ground_truth import positives_within


@dataclass
class TupleSets:
    """Per query: potential positives (within `pos_radius`) and non-negatives (within `neg_radius`)."""

    positives: list[np.ndarray]
    non_negatives: list[np.ndarray]

    @property
    def trainable(self) -> np.ndarray:
        """Queries with at least one potential positive (the others cannot form a tuple)."""
        return np.array([q for q, p in enumerate(self.positives) if len(p)], dtype=np.int64)


def tuple_sets(database_utm: np.ndarray, query_utm: np.ndarray, pos_radius: float = 10.0, neg_radius: float = 25.0) -> TupleSets:
    """Positives and non-negatives of each query from UTM coordinates (metres)."""
    return TupleSets(positives_within(database_utm, query_utm, pos_radius),
                     [np.sort(idx) for idx in positives_within(database_utm, query_utm, neg_radius)])


@dataclass
class MiningConfig:
    """Mining settings: margin on squared distances, negatives kept per query, random negatives drawn."""

    margin: float = 0.1
    num_negatives: int = 10
    neg_samples: int = 1000
    subset: int | None = None  # partial mining: cache only this many random database images


@dataclass
class FeatureCache:
    """Current-model descriptors of some database images and some queries, looked up by index."""

    database_ids: np.ndarray  # sorted database indices
    database: np.ndarray
    query_ids: np.ndarray
    queries: np.ndarray

    def database_rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of `database` holding database images `ids` (which must be cached)."""
        return np.searchsorted(self.database_ids, ids)

    def query(self, q: int) -> np.ndarray:
        return self.queries[int(np.flatnonzero(self.query_ids == q)[0])]


@dataclass(frozen=True)
class Triplet:
    """One training tuple: a query, its best positive and its violating hard negatives, hardest first."""

    query: int
    positive: int
    negatives: np.ndarray


def squared_distances(x: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """||x - y||^2 for each row y of `ys` (descriptors are unit vectors: 2 - 2 x.y)."""
    return np.maximum(2.0 - 2.0 * (ys @ x), 0.0)


class Miner:
    """Chooses what to cache and mines tuples; keeps per query its hardest negatives of last time."""

    def __init__(self, sets: TupleSets, num_database: int, config: MiningConfig) -> None:
        self.sets = sets
        self.num_database = num_database
        self.config = config
        self.memory = np.full((len(sets.positives), config.num_negatives), -1, dtype=np.int64)

    def remembered(self, q: int) -> np.ndarray:
        """The hard negatives of query `q` from its previous mining (possibly none)."""
        row = self.memory[q]
        return row[row >= 0]

    def cache_plan(self, queries: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Database images to describe for mining `queries`: all of them, or (partial mining) a random
        subset plus the queries' potential positives and remembered negatives."""
        subset = self.config.subset
        if subset is None or subset >= self.num_database:
            return np.arange(self.num_database)
        needed = [rng.choice(self.num_database, size=subset, replace=False)]
        for q in queries:
            needed += [self.sets.positives[q], self.remembered(q)]
        return np.unique(np.concatenate(needed)).astype(np.int64)

    def mine(self, cache: FeatureCache, queries: np.ndarray, rng: np.random.Generator) -> list[Triplet]:
        """Tuples for `queries` (queries with no violating negative are skipped); updates the memory."""
        cfg = self.config
        triplets = []
        for q in queries:
            q = int(q)
            positives = self.sets.positives[q]
            if len(positives) == 0:
                continue
            descriptor = cache.query(q)
            d_pos = squared_distances(descriptor, cache.database[cache.database_rows(positives)])
            best = int(np.argmin(d_pos))
            negatives = self._candidates(cache, q, rng)
            if len(negatives) == 0:
                continue
            d_neg = squared_distances(descriptor, cache.database[cache.database_rows(negatives)])
            order = np.argsort(d_neg, kind="stable")[: cfg.num_negatives]
            self.memory[q] = -1
            self.memory[q, : len(order)] = negatives[order]
            violating = order[d_neg[order] < d_pos[best] + cfg.margin]
            if len(violating):
                triplets.append(Triplet(q, int(positives[best]), negatives[violating]))
        return triplets

    def _candidates(self, cache: FeatureCache, q: int, rng: np.random.Generator) -> np.ndarray:
        """Remembered hard negatives plus up to `neg_samples` random cached negatives (beyond neg_radius)."""
        pool = cache.database_ids[~np.isin(cache.database_ids, self.sets.non_negatives[q], assume_unique=True)]
        sample = rng.choice(pool, size=min(self.config.neg_samples, len(pool)), replace=False) if len(pool) else pool
        return np.unique(np.concatenate([self.remembered(q), sample])).astype(np.int64)

    def state_dict(self) -> dict:
        """The memory as a tensor (weights-only checkpoint friendly)."""
        return {"memory": torch.from_numpy(self.memory.copy())}

    def load_state_dict(self, state: dict) -> None:
        memory = state["memory"].numpy().astype(np.int64)
        if memory.shape != self.memory.shape:
            raise ValueError(f"mining memory has shape {tuple(memory.shape)}, expected {self.memory.shape}")
        self.memory = memory
