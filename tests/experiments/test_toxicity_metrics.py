"""The bias metrics of experiments.metrics_text against hand-computed cases and, where
scikit-learn is installed, its roc_auc_score."""

import math

import numpy as np
import pytest

from attribution.record.errors import StagetraceError
from experiments.metrics_text import bias_metrics, false_positive_rate, power_mean, roc_auc


def test_auc_of_hand_counted_pairs():
    # positives 0.8, 0.4; negatives 0.5, 0.1: pairs (0.8>0.5, 0.8>0.1, 0.4<0.5, 0.4>0.1) = 3/4
    assert roc_auc([1, 1, 0, 0], [0.8, 0.4, 0.5, 0.1]) == pytest.approx(0.75)
    assert roc_auc([1, 0], [0.9, 0.1]) == 1.0 and roc_auc([1, 0], [0.1, 0.9]) == 0.0
    # ties count one half: positive 0.5 against negatives 0.5 and 0.2 -> (0.5 + 1) / 2
    assert roc_auc([1, 0, 0], [0.5, 0.5, 0.2]) == pytest.approx(0.75)
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3])) and math.isnan(roc_auc([0], [0.2]))


def test_auc_refuses_mismatched_or_non_binary_labels():
    with pytest.raises(StagetraceError, match="Fix:"):
        roc_auc([1, 0], [0.5])
    with pytest.raises(StagetraceError, match="binarise"):
        roc_auc([2, 0], [0.5, 0.1])


def test_auc_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.integers(0, 2, size=50)
        scores = rng.integers(0, 8, size=50) / 8  # many ties
        if labels.min() == labels.max():
            continue
        assert roc_auc(labels, scores) == pytest.approx(metrics.roc_auc_score(labels, scores))


def test_power_mean_by_hand():
    # M_-5(0.5, 1.0) = ((0.5^-5 + 1^-5) / 2)^(-1/5) = 16.5^(-1/5)
    assert power_mean([0.5, 1.0]) == pytest.approx(16.5 ** (-0.2))
    assert power_mean([0.7, 0.7, math.nan]) == pytest.approx(0.7)  # NaN left out
    assert power_mean([1.0, 3.0], p=1.0) == pytest.approx(2.0)
    assert math.isnan(power_mean([math.nan]))


def test_false_positive_rate_counts_scores_above_the_threshold():
    labels = np.array([0, 0, 0, 0, 1])
    scores = np.array([0.9, 0.5, 0.2, 0.6, 0.1])
    assert false_positive_rate(labels, scores) == pytest.approx(2 / 4)  # 0.5 is not above
    assert math.isnan(false_positive_rate(np.array([1]), np.array([0.3])))


def test_bias_metrics_by_hand():
    """Six examples: identity 0 (background only) and subgroup 1.

    idx  label score identity
    0    1     0.9   0
    1    0     0.2   0
    2    0     0.6   0
    3    1     0.7   1
    4    0     0.8   1
    5    0     0.3   1
    """
    labels = np.array([1, 0, 0, 1, 0, 0])
    scores = np.array([0.9, 0.2, 0.6, 0.7, 0.8, 0.3])
    identity = np.array([0, 0, 0, 1, 1, 1])
    m = bias_metrics(labels, scores, identity, {1: "g"})
    (g,) = m.subgroups
    assert g.name == "g" and g.size == 3
    assert g.subgroup_auc == pytest.approx(0.5)  # 0.7 vs 0.8 (lose), 0.3 (win)
    # BPSN: background toxic {0.9} against subgroup non-toxic {0.8, 0.3}: both won
    assert g.bpsn_auc == pytest.approx(1.0)
    # BNSP: subgroup toxic {0.7} against background non-toxic {0.2, 0.6}: both won
    assert g.bnsp_auc == pytest.approx(1.0)
    # overall: toxic {0.9, 0.7} vs non-toxic {0.2, 0.6, 0.8, 0.3}: 4 + 3 wins of 8
    assert m.auc == pytest.approx(7 / 8)
    assert m.fpr == pytest.approx(2 / 4)  # 0.6 and 0.8
    assert g.fpr == pytest.approx(1 / 2) and g.fpr_gap == pytest.approx(0.0)
    assert m.identity_fpr_gap == pytest.approx(1 / 2 - 1 / 2)
    # accuracy: predictions > 0.5 -> [1, 0, 1, 1, 1, 0]: correct 0, 1, 3, 5
    assert m.accuracy == pytest.approx(4 / 6) and m.clean_accuracy == pytest.approx(2 / 3)
    expected = 0.25 * (7 / 8) + 0.25 * (0.5 + 1.0 + 1.0)  # power means of one value
    assert m.final_score == pytest.approx(expected)
    assert m.to_json()["subgroups"][0]["bpsn_auc"] == pytest.approx(1.0)


def test_a_subgroup_of_one_class_has_nan_aucs_left_out_of_the_score():
    labels = np.array([1, 0, 0, 0])
    scores = np.array([0.9, 0.2, 0.4, 0.7])
    identity = np.array([0, 0, 1, 2])  # subgroups 1 and 2 hold one non-toxic comment each
    m = bias_metrics(labels, scores, identity, {1: "a", 2: "b"})
    a, b = m.subgroups
    assert math.isnan(a.subgroup_auc) and math.isnan(a.bnsp_auc)
    assert a.bpsn_auc == 1.0 and b.bpsn_auc == 1.0
    assert a.fpr == 0.0 and b.fpr == 1.0
    assert math.isnan(m.final_score)  # no subgroup AUC at all: the power mean is undefined
    # identity FPR gap: subgroups' non-toxic {0.4, 0.7} -> 1/2; background {0.2} -> 0
    assert m.identity_fpr_gap == pytest.approx(0.5)
