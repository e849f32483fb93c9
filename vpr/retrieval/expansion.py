"""Query expansion and database-side augmentation: the classic retrieval boosts on global descriptors.

Both replace a descriptor by a weighted mean of itself and its n nearest database neighbours,
re-normalised (Radenovic et al. 2018, "alpha-QE"):

    x' = normalise( x + sum_{i=1..n} max(s_i, 0)^alpha * d_i )

with d_i the i-th neighbour of x in the database and s_i = x . d_i. alpha = 0 weighs the
neighbours equally (average query expansion, Chum et al. 2007). Query expansion (QE) applies
it to each query before a second search; database-side augmentation (DBA, Arandjelovic &
Zisserman 2012) applies it once to every database descriptor at build time (the first neighbour
of a database descriptor, itself, is skipped).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from vpr.retrieval.search import exact_search
from vpr.retrieval.options import Expansion

if TYPE_CHECKING:
    from vpr.retrieval.rows import RowReader

Search = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
DBA_CHUNK = 4096  # database rows augmented per exact search


def expand(vectors: np.ndarray, similarities: np.ndarray, neighbours: np.ndarray, database: np.ndarray | RowReader,
           alpha: float) -> np.ndarray:
    """x' = normalise(x + sum_i max(s_i, 0)^alpha d_i) per row; neighbours marked -1 are left out (a lazy
    database reads only the neighbours' rows)."""
    valid = neighbours >= 0
    weights = np.where(valid, np.maximum(similarities, 0.0) ** alpha, 0.0).astype(np.float32)
    gathered = database[np.where(valid, neighbours, 0)]  # rows x n x d
    expanded = vectors + np.einsum("rn,rnd->rd", weights, gathered)
    norms = np.linalg.norm(expanded, axis=1, keepdims=True)
    return np.ascontiguousarray(expanded / np.maximum(norms, 1e-12), dtype=np.float32)


def expand_queries(queries: np.ndarray, database: np.ndarray | RowReader, search: Search,
                   expansion: Expansion) -> np.ndarray:
    """alpha-QE: each query averaged with its top-n database matches (found by `search`)."""
    if expansion.n == 0:
        return queries
    similarities, neighbours = search(queries, min(expansion.n, len(database)))
    return expand(queries, similarities, neighbours, database, expansion.alpha)


def augment_database(database: np.ndarray, expansion: Expansion) -> np.ndarray:
    """DBA: every database descriptor averaged with its top-n other database descriptors (exact search)."""
    if expansion.n == 0 or len(database) < 2:
        return database
    n = min(expansion.n, len(database) - 1)
    out = np.empty_like(database)
    for start in range(0, len(database), DBA_CHUNK):
        rows = database[start:start + DBA_CHUNK]
        similarities, neighbours = exact_search(database, rows, n + 1)
        own = np.arange(start, start + len(rows))[:, None]
        similarities, neighbours = _drop_self(similarities, neighbours, own, n)
        out[start:start + len(rows)] = expand(rows, similarities, neighbours, database, expansion.alpha)
    return out


def _drop_self(similarities: np.ndarray, neighbours: np.ndarray, own: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The n best neighbours other than the row itself (which may sit anywhere among exact ties)."""
    others = neighbours != own
    order = np.argsort(~others, axis=1, kind="stable")[:, :n]
    return np.take_along_axis(similarities, order, axis=1), np.take_along_axis(neighbours, order, axis=1)
