"""Fidelity metrics against independent truth: numpy, scipy and examples worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from attribution.analysis import metrics


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# Pearson.


@pytest.mark.parametrize("seed", range(5))
def test_pearson_equals_numpy_corrcoef(seed):
    g = rng(seed)
    truth = g.normal(size=50)
    estimate = 0.7 * truth + g.normal(scale=0.5, size=50)
    expected = np.corrcoef(estimate, truth)[0, 1]
    assert metrics.pearson(estimate, truth) == pytest.approx(expected, abs=1e-12)
    assert isinstance(metrics.pearson(estimate, truth), float)


def test_pearson_of_exact_and_negated_estimates():
    truth = np.array([0.3, -1.2, 2.5, 0.0, 4.0])
    assert metrics.pearson(2.0 * truth + 1.0, truth) == pytest.approx(1.0, abs=1e-12)
    assert metrics.pearson(-truth, truth) == pytest.approx(-1.0, abs=1e-12)


def test_pearson_by_hand():
    # x = [1, 2, 3], y = [1, 3, 2]: centred (-1, 0, 1) and (-1, 1, 0); r = 1 / (sqrt2 * sqrt2).
    assert metrics.pearson(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])) == pytest.approx(
        0.5, abs=1e-12
    )


# Spearman.


def test_spearman_by_hand():
    # estimate ranks [1, 2, 3, 4, 5], truth ranks [2, 1, 4, 3, 5]: d^2 = 1+1+1+1+0 = 4,
    # rho = 1 - 6 * 4 / (5 * (25 - 1)) = 1 - 24 / 120 = 0.8.
    estimate = np.array([0.1, 0.5, 2.0, 7.0, 9.0])
    truth = np.array([-3.0, -4.0, 10.0, 1.0, 11.0])
    assert metrics.spearman(estimate, truth) == pytest.approx(0.8, abs=1e-12)


def test_spearman_depends_only_on_ranks():
    truth = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    monotone = np.exp(truth) ** 3  # same order, far from linear
    assert metrics.spearman(monotone, truth) == pytest.approx(1.0, abs=1e-12)
    assert metrics.pearson(monotone, truth) < 0.9
    assert metrics.spearman(-monotone, truth) == pytest.approx(-1.0, abs=1e-12)


def test_spearman_with_ties_uses_average_ranks():
    # estimate ranks [1.5, 1.5, 3, 4] (a tie), truth ranks [1, 2, 3, 4]: Pearson of the ranks.
    estimate = np.array([5.0, 5.0, 6.0, 8.0])
    truth = np.array([0.0, 1.0, 2.0, 3.0])
    expected = np.corrcoef([1.5, 1.5, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0])[0, 1]
    assert metrics.spearman(estimate, truth) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_spearman_equals_scipy_on_random_data(seed):
    g = rng(seed)
    truth = g.normal(size=40)
    estimate = truth**3 + g.normal(scale=0.3, size=40)
    expected = stats.spearmanr(estimate, truth)[0]
    assert metrics.spearman(estimate, truth) == pytest.approx(float(expected), abs=1e-12)
    # ... which is the Pearson correlation of the ranks.
    ranks = np.corrcoef(stats.rankdata(estimate), stats.rankdata(truth))[0, 1]
    assert metrics.spearman(estimate, truth) == pytest.approx(ranks, abs=1e-12)


# Constant inputs: the correlation is undefined.


@pytest.mark.parametrize("metric", [metrics.pearson, metrics.spearman], ids=["pearson", "spearman"])
@pytest.mark.parametrize("constant_side", ["estimate", "truth", "both"])
def test_correlation_with_a_constant_input_is_nan(metric, constant_side):
    varied = np.array([0.5, -1.0, 2.0, 3.0])
    constant = np.full(4, 0.25)
    estimate = constant if constant_side in ("estimate", "both") else varied
    truth = constant if constant_side in ("truth", "both") else varied
    value = metric(estimate, truth)
    assert isinstance(value, float) and math.isnan(value)


def test_correlation_of_all_zero_effects_is_nan():
    zeros = np.zeros(6)
    assert math.isnan(metrics.pearson(zeros, np.arange(6.0)))
    assert math.isnan(metrics.spearman(np.arange(6.0), zeros))


# Sign agreement.


def test_sign_agreement_by_hand():
    estimate = np.array([0.5, -0.2, 3.0, -1.0, 0.1])
    truth = np.array([2.0, -0.1, -4.0, -0.3, -0.1])
    # agree, agree, disagree, agree, disagree -> 3 / 5
    assert metrics.sign_agreement(estimate, truth) == pytest.approx(0.6, abs=1e-15)
    assert metrics.sign_agreement(truth, truth) == 1.0
    assert metrics.sign_agreement(-truth, truth) == 0.0


def test_sign_agreement_ignores_magnitude():
    truth = np.array([1e-9, -5.0, 7.0])
    assert metrics.sign_agreement(np.array([100.0, -1e-12, 0.3]), truth) == 1.0


# Mean-effect error.


def test_mean_effect_error_by_hand():
    estimate = np.array([1.0, 2.0, 6.0])  # mean 3
    truth = np.array([0.5, 0.5, 2.0])  # mean 1
    assert metrics.mean_effect_error(estimate, truth) == pytest.approx(2.0, abs=1e-15)
    # Signed: estimate - truth, so swapping the arguments flips it.
    assert metrics.mean_effect_error(truth, estimate) == pytest.approx(-2.0, abs=1e-15)
    assert metrics.mean_effect_error(truth, truth) == 0.0


def test_mean_effect_error_is_blind_to_errors_that_cancel():
    truth = np.array([1.0, -1.0, 3.0])
    assert metrics.mean_effect_error(truth + np.array([0.5, -0.5, 0.0]), truth) == pytest.approx(
        0.0, abs=1e-15
    )


# Top-stage agreement: rows are stages, columns examples; the top stage has the largest |effect|.


def test_top_stage_agreement_by_hand():
    estimate = np.array(
        [
            [0.9, -0.1, 0.2, 0.0],
            [0.1, -2.0, 0.3, -0.5],
            [-0.5, 0.4, -0.9, 0.4],
        ]
    )
    truth = np.array(
        [
            [-3.0, 0.1, 0.1, 0.2],
            [1.0, 0.2, 0.0, 0.1],
            [0.5, -0.8, 0.4, 0.3],
        ]
    )
    # |estimate| argmax per column: [0, 1, 2, 1]; |truth| argmax: [0, 2, 2, 2]
    # -> agreement on columns 0 and 2 = 2 / 4. (Raw argmax would give [0, 2, 1, 2] and
    # [1, 1, 2, 2], agreeing on column 3 only = 1 / 4.)
    assert metrics.top_stage_agreement(estimate, truth) == pytest.approx(0.5, abs=1e-15)
    assert metrics.top_stage_agreement(truth, truth) == 1.0
    assert metrics.top_stage_agreement(-truth, truth) == 1.0  # sign does not matter


def test_top_stage_agreement_uses_absolute_values_not_raw_values():
    # Stage 0 lowers the quantity the most: it is the most accountable stage.
    truth = np.array([[-5.0], [1.0], [2.0]])
    assert metrics.top_stage_agreement(np.array([[-4.0], [0.0], [0.1]]), truth) == 1.0
    assert metrics.top_stage_agreement(np.array([[0.0], [0.0], [3.0]]), truth) == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_top_stage_agreement_matches_a_loop_over_examples(seed):
    g = rng(seed)
    estimate, truth = g.normal(size=(3, 30)), g.normal(size=(3, 30))
    hits = [
        max(range(3), key=lambda s, i=i: abs(estimate[s, i]))
        == max(range(3), key=lambda s, i=i: abs(truth[s, i]))
        for i in range(30)
    ]
    assert metrics.top_stage_agreement(estimate, truth) == pytest.approx(np.mean(hits), abs=1e-15)


# Stage ranking: the order of the stages by effect, largest (signed) first.


def test_same_ranking_by_hand():
    truth = np.array([0.3, -1.0, 0.1])  # order: stage 0, 2, 1
    assert metrics.same_ranking(np.array([5.0, -2.0, 0.0]), truth) is True
    assert metrics.same_ranking(np.array([0.1, -1.0, 0.3]), truth) is False  # 2 before 0
    # signed, not by magnitude: stage 1 has the largest |effect| but the smallest effect
    assert metrics.same_ranking(np.array([0.3, 1.0, 0.1]), truth) is False
    assert metrics.same_ranking(np.array([1.0, 1.0, 0.5]), np.array([2.0, 1.0, 0.0])) is True
