"""Retrieval metrics beyond recall@N on tiny hand-computed cases: MSLS mAP@k, VPR-Bench's precision-recall curve,
AUC-PR, recall at 100% precision and extended precision. Every hand value below was also confirmed with the
authors' own code (mapillary/mapillary_sls@b6c4e43f utils/eval.py; MubarizZaffar/VPR-Bench@77ad30f3
performance_comparison.py) by /work/scratch/metrics/run.sh."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vpr.errors import OutputError, UsageError
from vpr.evaluation.metrics import (
    auc_pr, extended_precision, map_at_k, precision_recall, recall_at_100_precision, retrieval_metrics, save_pr_curve,
    top1_correct,
)
from vpr.fileio import is_vpr_png, to_json


def curve(confidence, correct):
    return precision_recall(np.array(confidence, float), np.array(correct, bool))


def test_map_at_k_hand_computed():
    # q0 hits at ranks 2, 3: k=2 (1/2)/2, k=3 (1/2 + 2/3)/2; q1 repeats id 1 (counted once): k=3 (1 + 2/3)/2;
    # q2 never hits; q3 has 5 positives, a hit at rank 1 only: divided by min(5, k)
    predictions = np.array([[3, 1, 2], [1, 1, 2], [0, 3, 4], [7, 8, 9]])
    positives = [np.array([1, 2]), np.array([1, 2]), np.array([1]), np.array([7, 1, 2, 3, 4])]
    got = map_at_k(predictions, positives, (1, 2, 3))
    assert got[1] == pytest.approx(100 * (0 + 1 + 0 + 1) / 4)
    assert got[2] == pytest.approx(100 * (0.25 + 0.5 + 0 + 0.5) / 4)
    assert got[3] == pytest.approx(100 * ((0.5 + 2 / 3) / 2 + (1 + 2 / 3) / 2 + 0 + 1 / 3) / 4)
    assert got[3] == pytest.approx(43.75)  # mapillary_sls mapk on the same input: 0.4375


def test_map_at_k_msls_readme_example():
    # mapillary_sls utils/eval.py __main__ (keys DBk -> k; its typo "BD5" -> 99): map@1,2,3 = 0.5, 0.25, 0.25
    predictions = np.array([[0, 1, 2, 3, 4, 99], [0, 5, 4, 1, 3, 2]])
    assert map_at_k(predictions, [np.array([4, 5]), np.array([0, 1])], (1, 2, 3)) == {1: 50.0, 2: 25.0, 3: 25.0}


def test_map_at_k_perfect_worst_padding_and_no_positives():
    assert map_at_k(np.array([[1, 2, 0]]), [np.array([2, 1])], (1, 2, 3, 10)) == {1: 100.0, 2: 100.0, 3: 100.0, 10: 100.0}
    assert map_at_k(np.array([[0, 3, 4]]), [np.array([1])], (1, 3)) == {1: 0.0, 3: 0.0}
    assert map_at_k(np.array([[5, -1, -1]]), [np.array([5, 6])], (3,)) == {3: 50.0}  # -1: no answer
    # a query without positives scores 0 and stays in the mean (MSLS drops such queries before evaluating)
    assert map_at_k(np.array([[1, 2], [1, 2]]), [np.array([1]), np.array([], int)], (1,)) == {1: 50.0}
    assert map_at_k(np.zeros((0, 3), int), [], (1, 5)) == {1: 0.0, 5: 0.0}


def test_map_at_k_refuses_bad_input():
    with pytest.raises(UsageError, match="predictions has 2 rows for 1 queries"):
        map_at_k(np.zeros((2, 3), int), [np.array([0])])
    with pytest.raises(UsageError, match="ks 0"):
        map_at_k(np.zeros((1, 3), int), [np.array([0])], (0, 5))


def test_precision_recall_curve_hand_computed():
    precision, recall, thresholds = curve([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0])
    np.testing.assert_allclose(precision, [0.5, 2 / 3, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(recall, [1.0, 1.0, 0.5, 0.5, 0.0])
    np.testing.assert_allclose(thresholds, [0.6, 0.7, 0.8, 0.9])
    assert auc_pr(precision, recall) == pytest.approx(0.5 * (2 / 3 + 0.5) / 2 + 0.5)  # 0.791667, as VPR-Bench
    assert recall_at_100_precision(precision, recall) == 0.5
    assert extended_precision(precision, recall) == pytest.approx(0.75)


def test_tied_confidences_are_one_threshold_whatever_their_order():
    for confidence, correct in (([0.9, 0.9, 0.5], [1, 0, 1]), ([0.9, 0.9, 0.5], [0, 1, 1])):
        precision, recall, thresholds = curve(confidence, correct)
        np.testing.assert_allclose(precision, [2 / 3, 0.5, 1.0])
        np.testing.assert_allclose(recall, [1.0, 0.5, 0.0])
        np.testing.assert_allclose(thresholds, [0.5, 0.9])
        assert auc_pr(precision, recall) == pytest.approx(2 / 3)
        assert recall_at_100_precision(precision, recall) == 0.0  # the most confident group holds a wrong answer
        assert extended_precision(precision, recall) == pytest.approx(0.25)


def test_perfect_and_worst_rankings():
    precision, recall, _ = curve([0.9, 0.8, 0.1], [1, 1, 0])
    assert (auc_pr(precision, recall), recall_at_100_precision(precision, recall), extended_precision(precision, recall)) == (1.0, 1.0, 1.0)
    precision, recall, _ = curve([0.9, 0.8, 0.1], [0, 0, 1])
    np.testing.assert_allclose(precision, [1 / 3, 0.0, 0.0, 1.0])
    assert auc_pr(precision, recall) == pytest.approx(1 / 6)
    assert recall_at_100_precision(precision, recall) == 0.0 and extended_precision(precision, recall) == 0.0


def test_no_correct_answer_gives_zero_not_sklearns_half():
    precision, recall, _ = curve([0.9, 0.5], [0, 0])
    np.testing.assert_array_equal(recall, [0.0, 0.0, 0.0])
    assert auc_pr(precision, recall) == 0.0 and extended_precision(precision, recall) == 0.0


def test_empty_curve_is_undefined():
    precision, recall, thresholds = curve([], [])
    assert precision.tolist() == [1.0] and recall.tolist() == [0.0] and len(thresholds) == 0
    assert np.isnan(auc_pr(precision, recall)) and np.isnan(extended_precision(precision, recall))


def test_precision_recall_refuses_bad_input():
    with pytest.raises(UsageError, match="confidence has 2 values for 3 answers"):
        curve([0.1, 0.2], [1, 0, 1])
    with pytest.raises(UsageError, match="NaN"):
        curve([0.1, float("nan")], [1, 0])


def test_queries_without_positives_count_as_wrong_top1():
    predictions = np.array([[4, 1], [2, 3], [-1, -1]])
    positives = [np.array([4]), np.array([], int), np.array([0])]
    assert top1_correct(predictions, positives).tolist() == [True, False, False]
    metrics = retrieval_metrics(predictions, positives, np.array([0.3, 0.9, 0.1]), ks=(1, 2))
    assert metrics["mAP@k"] == {1: pytest.approx(100 / 3), 2: pytest.approx(100 / 3)}
    assert metrics["recall_at_100_precision"] == 0.0  # the most confident answer has no true match: wrong
    assert metrics["extended_precision"] == 0.0
    assert metrics["pr_curve"] == {"precision": [0.333333, 0.5, 0.0, 1.0], "recall": [1.0, 1.0, 0.0, 0.0]}


def test_retrieval_metrics_is_json_ready_and_subsamples_the_curve():
    rng = np.random.default_rng(0)
    predictions = rng.integers(0, 50, size=(1000, 5))
    positives = [rng.choice(50, 3, replace=False) for _ in range(1000)]
    metrics = retrieval_metrics(predictions, positives, rng.uniform(size=1000))
    assert set(metrics) == {"mAP@k", "auc_pr", "recall_at_100_precision", "extended_precision", "pr_curve"}
    assert set(metrics["mAP@k"]) == {1, 5, 10, 20}
    curve_points = metrics["pr_curve"]
    assert 2 <= len(curve_points["precision"]) == len(curve_points["recall"]) <= 200
    assert curve_points["recall"][-1] == 0.0 and curve_points["precision"][-1] == 1.0  # the last point is kept
    assert json.loads(to_json(metrics))["mAP@k"]["1"] == pytest.approx(metrics["mAP@k"][1])
    empty = retrieval_metrics(np.zeros((0, 5), int), [], np.zeros(0))
    assert empty["auc_pr"] is None and empty["extended_precision"] is None and empty["recall_at_100_precision"] is None
    to_json(empty)


def test_save_pr_curve_writes_a_vpr_png_and_never_replaces_a_users_file(tmp_path):
    precision, recall, _ = curve([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0])
    path = save_pr_curve(precision, recall, tmp_path / "pr.png")
    assert is_vpr_png(path)
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert (pixels == (30, 90, 200)).all(axis=2).sum() > 100  # the curve is drawn
    save_pr_curve(precision, recall, path)  # vpr's own PNG is replaced
    (tmp_path / "mine.png").write_bytes(b"not vpr's")
    with pytest.raises(OutputError):
        save_pr_curve(precision, recall, tmp_path / "mine.png")
    assert (tmp_path / "mine.png").read_bytes() == b"not vpr's"
    with pytest.raises(UsageError):
        save_pr_curve(np.array([1.0]), np.array([0.0]), tmp_path / "one.png")
