"""SeqSLAM sequence matching: known matches on a synthetic route, causality, blocks, and the equations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vpr.errors import UsageError
from vpr.retrieval.sequence import sequence_search
from vpr.retrieval.options import SequenceOptions, speed_range


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny matrices: OpenMP hand-offs would dominate


def route(speed: float, *, noise: float = 2.0, n_q: int = 120, m: int = 200, offset: int = 20, seed: int = 0):
    """A database of m random unit frames; query i is a noisy copy of frame offset + round(speed * i)."""
    rng = np.random.default_rng(seed)
    d = 32
    database = rng.normal(size=(m, d))
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    truth = np.floor(offset + speed * np.arange(n_q) + 0.5).astype(int)
    queries = database[truth] + noise * rng.normal(size=(n_q, d)) / math.sqrt(d)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return queries.astype(np.float32), database.astype(np.float32), truth


def top1_recall(queries, database, truth, options: SequenceOptions) -> float:
    return float(np.mean(sequence_search(queries, database, options)[1][:, 0] == truth))


def plain_scores(queries, database, options: SequenceOptions) -> np.ndarray:
    """The module docstring's equations as plain loops: best-speed path score of every (query, frame)."""
    sim = queries.astype(np.float64) @ database.T.astype(np.float64)
    n, m = sim.shape
    half = options.window // 2
    z = sim.copy()
    if half:
        for i in range(n):
            for j in range(m):
                near = sim[i, max(0, j - half):j + half + 1]
                z[i, j] = (sim[i, j] - near.mean()) / (near.std() + 1e-6)
    first = -(options.length - 1) if options.causal else -(options.length // 2)
    best = np.full((n, m), -np.inf)
    for v in options.speeds:
        for i in range(n):
            for j in range(m):
                steps = [t for t in range(first, first + options.length) if 0 <= i + t < n]
                frames = [z[i + t, j + math.floor(v * t + 0.5)] for t in steps if 0 <= j + math.floor(v * t + 0.5) < m]
                best[i, j] = max(best[i, j], sum(frames) / len(steps))  # off the database: 0 for that frame
    return best


def test_sequences_recover_matches_single_frames_miss():
    queries, database, truth = route(1.0)
    single = top1_recall(queries, database, truth, SequenceOptions(length=1, window=0))
    assert single < 0.6
    assert top1_recall(queries, database, truth, SequenceOptions(length=10)) == 1.0
    assert top1_recall(queries, database, truth, SequenceOptions(length=10, causal=True)) >= 0.95


def test_speed_range_recovers_a_speed_that_speed_one_misses():
    queries, database, truth = route(1.2, n_q=140, offset=10)
    assert top1_recall(queries, database, truth, SequenceOptions(length=20)) < 0.3
    assert top1_recall(queries, database, truth, SequenceOptions(length=20, speeds=speed_range(0.8, 1.25, 10))) > 0.95


def test_causal_mode_ignores_future_frames():
    queries, database, _ = route(1.0, n_q=60, m=100)
    changed = queries.copy()
    changed[30:] = queries[::-1][:30]  # rewrite the future of frame 29
    for causal, same in ((True, True), (False, False)):
        options = SequenceOptions(length=8, speeds=speed_range(0.8, 1.25, 4), causal=causal, k=5)
        before, after = sequence_search(queries, database, options), sequence_search(changed, database, options)
        assert np.array_equal(before[1][:30], after[1][:30]) == same
        assert np.array_equal(before[0][:30], after[0][:30]) == same


@pytest.mark.parametrize("causal", [False, True])
def test_block_size_does_not_change_the_result(causal):
    queries, database, _ = route(1.1, n_q=24, m=60, offset=5)
    options = SequenceOptions(length=6, speeds=speed_range(0.8, 1.25, 3), causal=causal, k=4)
    scores, indices = sequence_search(queries, database, options, block=len(queries))
    for block in (1, 7):
        other_scores, other_indices = sequence_search(queries, database, options, block=block)
        assert np.array_equal(other_indices, indices)
        np.testing.assert_allclose(other_scores, scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("window", [0, 1])
def test_length_one_without_contrast_window_is_nearest_neighbour(window):
    queries, database, _ = route(1.0, n_q=40, m=80)
    scores, indices = sequence_search(queries, database, SequenceOptions(length=1, window=window, k=5))
    sim = queries @ database.T
    expected = np.argsort(-sim, axis=1)[:, :5]
    assert np.array_equal(indices, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(sim, expected, axis=1), atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_scores_follow_the_equations_including_paths_off_either_end(causal):
    queries, database, _ = route(1.0, n_q=9, m=12, noise=1.0, offset=2)
    options = SequenceOptions(length=4, speeds=(0.8, 1.0, 1.3), window=5, causal=causal, k=12)
    scores, indices = sequence_search(queries, database, options)
    expected = plain_scores(queries, database, options)
    np.testing.assert_allclose(scores, np.take_along_axis(expected, indices, axis=1), atol=1e-4)
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first


def test_k_is_capped_at_the_database_size():
    queries, database, _ = route(1.0, n_q=5, m=30, offset=0)
    scores, indices = sequence_search(queries, database, SequenceOptions(length=3, k=50))
    assert scores.shape == indices.shape == (5, 30)
    assert all(sorted(row) == list(range(30)) for row in indices.tolist())


def test_bad_options_are_usage_errors():
    with pytest.raises(UsageError):
        SequenceOptions(length=0)
    with pytest.raises(UsageError):
        SequenceOptions(speeds=())
    with pytest.raises(UsageError):
        speed_range(1.2, 0.8, 3)
    assert speed_range(0.8, 1.2, 5) == pytest.approx((0.8, 0.9, 1.0, 1.1, 1.2))
    queries, database, _ = route(1.0, n_q=5, m=30, offset=0)
    with pytest.raises(UsageError):
        sequence_search(queries, database[:, :8], SequenceOptions())
