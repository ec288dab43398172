"""GLUE's metric functions against values worked out by hand (the arithmetic is in each comment)."""

import math

import pytest

from encoder_train.finetune.metrics import accuracy, f1, macro_f1, matthews, pearson, score, spearman

PRED = [1, 1, 0, 1, 0]
REF = [1, 0, 0, 1, 1]  # tp 2 (0, 3), fp 1 (1), fn 1 (4), tn 1 (2)


def test_accuracy():
    assert accuracy(PRED, REF) == pytest.approx(3 / 5)
    assert accuracy([2, 0], [2, 0]) == 1.0


def test_binary_f1_is_that_of_label_one():
    assert f1(PRED, REF) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # 2tp / (2tp + fp + fn) = 4/6
    assert f1([0, 0], [0, 0]) == 0.0  # no positive anywhere: F1 of label 1 is 0 (as scikit-learn's, warned)
    # label 0 as the positive class: tp 1, fp 1, fn 1 -> 2/4; macro = mean(0.5, 4/6)
    assert macro_f1(PRED, REF) == pytest.approx((0.5 + 4 / 6) / 2)


def test_matthews_binary_and_multiclass():
    # (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (2 - 1) / sqrt(3 * 3 * 2 * 2) = 1/6
    assert matthews(PRED, REF) == pytest.approx(1 / 6)
    assert matthews([1, 1, 1], [0, 1, 0]) == 0.0  # constant predictions: 0, not a division by zero
    assert matthews(REF, REF) == pytest.approx(1.0)
    assert matthews([1 - r for r in REF], REF) == pytest.approx(-1.0)
    # Three classes: confusion (rows true) [[1,1,0],[0,2,0],[1,0,1]], n 6, correct 4, true counts (2,2,2),
    # predicted (2,3,1): (4*6 - 12) / sqrt((36 - 14) * (36 - 12)) = 12 / sqrt(528)
    assert matthews([0, 1, 1, 1, 2, 0], [0, 0, 1, 1, 2, 2]) == pytest.approx(12 / math.sqrt(528))


def test_pearson():
    # x - 2.5 = (-1.5, -.5, .5, 1.5), y - 3.75 = (-1.75, .25, 1.25, .25): 3.5 / sqrt(5 * 4.75)
    assert pearson([1, 2, 3, 4], [2, 4, 5, 4]) == pytest.approx(3.5 / math.sqrt(5 * 4.75))
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 1, 1], [2, 4, 6]) == 0.0  # a constant side


def test_spearman_gives_ties_their_average_rank():
    # ranks (1, 2.5, 2.5, 4) and (1, 3, 2, 4); centred (-1.5, 0, 0, 1.5), (-1.5, .5, -.5, 1.5): 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert spearman([10, 20, 30, 40], [1, 4, 9, 16]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([3, 3, 1], [2, 2, 1]) == pytest.approx(1.0)  # ties on both sides, same order


def test_task_score_is_the_mean_of_its_metrics():
    assert score({"f1": 0.8, "accuracy": 0.7}) == pytest.approx(0.75)
