"""Fidelity of estimated stage effects against true ones: pure functions of (estimate, truth).

Effects follow the project's sign convention (effect = f(with stage) - f(without stage)).
Per-stage metrics take [N] vectors of per-example effects; ``top_stage_agreement`` takes
[stages, N] matrices; ``same_ranking`` takes one effect per stage.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def pearson(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant (correlation undefined)."""
    if np.ptp(estimate) == 0 or np.ptp(truth) == 0:
        return float("nan")
    return float(stats.pearsonr(estimate, truth).statistic)


def spearman(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Spearman rank correlation; NaN when either side is constant."""
    if np.ptp(estimate) == 0 or np.ptp(truth) == 0:
        return float("nan")
    return float(stats.spearmanr(estimate, truth).statistic)


def sign_agreement(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of examples whose estimated effect has the sign of the true one."""
    return float(np.mean(np.sign(estimate) == np.sign(truth)))


def mean_effect_error(estimate: np.ndarray, truth: np.ndarray) -> float:
    """mean(estimate) - mean(truth): the signed error of the average effect."""
    return float(np.mean(estimate) - np.mean(truth))


def top_stage_agreement(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of examples for which both name the same most accountable stage (the stage of
    largest absolute effect); rows are stages, columns examples."""
    return float(np.mean(np.abs(estimate).argmax(0) == np.abs(truth).argmax(0)))


def same_ranking(estimate: np.ndarray, truth: np.ndarray) -> bool:
    """Whether both order the stages alike by effect, largest (signed) first: ``estimate`` and
    ``truth`` hold one effect per stage. Ties keep the stages' order."""
    order = np.argsort(-np.asarray(estimate), kind="stable")
    return bool(np.array_equal(order, np.argsort(-np.asarray(truth), kind="stable")))
