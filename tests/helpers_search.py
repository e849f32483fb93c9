"""Checks of top-k search results that hold on any CPU, BLAS and FAISS kernel.

Different kernels sum a dot product in different orders, so two exact searches can disagree in
the last bits of a similarity and, where two database rows are (nearly) tied, in which row they
return. Near-duplicate descriptors tie all the time (real descriptors replicated with noise: most
neighbouring similarities differ by less than 1e-5). So nothing here compares indices: a result is
checked by the similarities of the rows it returned, recomputed in float64, against the float64
truth. That catches a wrong row (its similarity is wrong) but accepts any tie-breaking.
"""

from __future__ import annotations

import numpy as np

TOL = 1e-5  # float32 inner products of unit-norm 64-d vectors lie within ~1e-6 of float64 on any kernel


def similarity_matrix(database: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """float64 inner products, queries x database."""
    return np.asarray(queries, dtype=np.float64) @ np.asarray(database, dtype=np.float64).T


def exact_top_similarities(database: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The k best float64 similarities of each query, best first (the ground truth; no indices)."""
    sims = similarity_matrix(database, queries)
    k = min(k, sims.shape[1])
    top = np.partition(sims, sims.shape[1] - k, axis=1)[:, sims.shape[1] - k:]
    return -np.sort(-top, axis=1)


def true_similarities(database: np.ndarray, queries: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """float64 inner product of each query with each row it returned; -inf where the index is -1."""
    valid = indices >= 0
    rows = np.asarray(database, dtype=np.float64)[np.where(valid, indices, 0)]
    sims = np.einsum("qd,qkd->qk", np.asarray(queries, dtype=np.float64), rows)
    return np.where(valid, sims, -np.inf)


def assert_valid_result(
    database: np.ndarray, queries: np.ndarray, sim: np.ndarray, idx: np.ndarray, k: int, *,
    tol: float = TOL, complete: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """What any top-k search over `database` guarantees by construction, approximate or not:
    k columns; distinct rows, then (only where fewer were found) -1 with a similarity of -inf
    (or FAISS's -FLT_MAX); each similarity is the inner product of the query with the row returned
    (within `tol`); best first; and rank by rank no better than exact search (the r-th best of any k
    distinct rows cannot beat the r-th best of all rows). Returns (true similarities of the
    returned rows, exact top-k similarities)."""
    n = len(database)
    assert sim.shape == idx.shape == (len(queries), k), (sim.shape, idx.shape)
    valid = idx >= 0
    assert np.all(idx < n) and np.all(idx >= -1)
    assert np.all(valid[:, :-1] | ~valid[:, 1:]), "a missing result (-1) before a found one"
    if complete:
        assert valid.all(), f"{int((~valid).sum())} missing results"
    assert np.all(sim[~valid] < -1e30), "a missing result with a finite similarity"
    rows = np.sort(np.where(valid, idx, -1 - np.arange(k)), axis=1)  # -1s made distinct
    assert np.all(rows[:, 1:] != rows[:, :-1]), "a row returned twice for one query"
    true = true_similarities(database, queries, idx)
    np.testing.assert_allclose(sim[valid], true[valid], rtol=0, atol=tol)
    ordered = np.where(valid, sim, -np.inf)
    assert np.all(ordered[:, 1:] <= ordered[:, :-1]), "results not best first"
    exact = exact_top_similarities(database, queries, k)
    assert np.all(-np.sort(-true, axis=1) <= exact + tol), "better than exact search: a similarity is wrong"
    return true, exact


def assert_exact_top_k(
    database: np.ndarray, queries: np.ndarray, sim: np.ndarray, idx: np.ndarray, k: int, *, tol: float = TOL,
) -> None:
    """`assert_valid_result`, and the rows are an exact top-k: rank by rank their similarities equal
    exact search's within `tol`. Where the k-th and (k+1)-th similarities are further apart than
    2 * tol this fixes the set of rows; within a tie any of the tied rows is right."""
    true, exact = assert_valid_result(database, queries, sim, idx, k, tol=tol)
    np.testing.assert_allclose(sim, exact, rtol=0, atol=tol)
    np.testing.assert_allclose(-np.sort(-true, axis=1), exact, rtol=0, atol=tol)


def assert_same_retrieval(reference: np.ndarray, candidate: np.ndarray, split: int, k: int, search, *, tol: float) -> None:
    """Descriptors from an optimised path (`candidate`) retrieve like the reference ones: searching
    rows `split:` against rows `:split`, every query-database similarity agrees within `tol` (the
    precision promised), and the top-k rows found with `candidate` are, scored on `reference`, an
    exact top-k within 2 * tol (guaranteed by the first property for an exact `search`: a near-tie
    may swap rows, but never for a clearly worse row). `search(db, queries, k)` -> (sim, idx)."""
    ref_db, ref_q, db, q = reference[:split], reference[split:], candidate[:split], candidate[split:]
    diff = np.abs(similarity_matrix(db, q) - similarity_matrix(ref_db, ref_q)).max()
    assert diff <= tol, f"similarities differ by {diff:.3g} > {tol:g}"
    sim, idx = search(db, q, k)
    assert_exact_top_k(db, q, sim, idx, k, tol=TOL)
    scored = -np.sort(-true_similarities(ref_db, ref_q, idx), axis=1)
    assert np.all(scored >= exact_top_similarities(ref_db, ref_q, k) - 2 * tol)
