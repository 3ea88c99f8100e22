"""Bias metrics of a toxicity classifier (docs/toxicity.md): ROC AUC overall and per identity
subgroup (Subgroup, BPSN, BNSP AUC), false-positive rates, and the Jigsaw final score.

Notation: D+ / D- the toxic / non-toxic examples, g the examples of an identity subgroup, b the
background (every example not in g). Scores are the predicted probability of the toxic class.

- ``roc_auc``: the probability that a random toxic example scores above a random non-toxic one,
  ties counting one half (the Mann-Whitney statistic; equal to the area under the ROC curve);
  NaN when the set holds one class only.
- Subgroup AUC = AUC(D_g+ ∪ D_g-), BPSN AUC = AUC(D_b+ ∪ D_g-), BNSP AUC = AUC(D_g+ ∪ D_b-).
- FPR at ``threshold``: the share of non-toxic examples scored above it (predicted toxic).
- Final score = 0.25 AUC_overall + 0.25 (M_-5(Subgroup AUC) + M_-5(BPSN) + M_-5(BNSP)), with the
  power mean ``M_p(m) = (mean of m^p)^(1/p)`` over the subgroups whose AUC is defined.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

from attribution.record.errors import StagetraceError

POWER = -5.0
THRESHOLD = 0.5


def roc_auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (1 positive); ties count
    one half; NaN when the labels hold one class."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise StagetraceError(
            f"labels {y.shape} and scores {s.shape} differ. Fix: give one score per label"
        )
    positives, negatives = int((y == 1).sum()), int((y == 0).sum())
    if positives + negatives != len(y):
        raise StagetraceError("labels must be 0 or 1. Fix: binarise them first")
    if not positives or not negatives:
        return math.nan
    ranks = rankdata(s)  # average ranks of ties
    above = ranks[y == 1].sum() - positives * (positives + 1) / 2
    return float(above / (positives * negatives))


def power_mean(values: Sequence[float] | np.ndarray, p: float = POWER) -> float:
    """``(mean of v^p)^(1/p)`` over the values that are not NaN (NaN if none; p != 0)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if not len(v):
        return math.nan
    return float(np.mean(v**p) ** (1.0 / p))


def false_positive_rate(
    labels: np.ndarray, scores: np.ndarray, threshold: float = THRESHOLD
) -> float:
    """Share of the non-toxic examples (label 0) scored above ``threshold``; NaN if none."""
    negative = labels == 0
    return float((scores[negative] > threshold).mean()) if negative.any() else math.nan


@dataclass(frozen=True)
class SubgroupMetrics:
    """One identity subgroup: its size, the three AUCs, its FPR and the FPR minus the overall."""

    name: str
    size: int
    subgroup_auc: float
    bpsn_auc: float
    bnsp_auc: float
    fpr: float
    fpr_gap: float


@dataclass(frozen=True)
class BiasMetrics:
    """A classifier's scores on a test set with identity subgroups.

    ``accuracy``: share of examples whose score is on the side of ``threshold`` their label is;
    ``clean_accuracy``: the same over the examples in no subgroup; ``fpr``: over all examples;
    ``identity_fpr_gap``: FPR of the non-toxic examples in some subgroup minus that of those in
    none (the bias the toxicity experiment plants); ``final_score``: the Jigsaw score."""

    accuracy: float
    clean_accuracy: float
    auc: float
    fpr: float
    identity_fpr_gap: float
    final_score: float
    subgroups: list[SubgroupMetrics]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def bias_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    identity: np.ndarray,
    names: Mapping[int, str],
    threshold: float = THRESHOLD,
) -> BiasMetrics:
    """Every metric of the module for binary ``labels``, toxic-class probabilities ``scores``
    and ``identity`` (0: no subgroup; ``i``: subgroup ``names[i]``)."""
    labels, scores, identity = np.asarray(labels), np.asarray(scores), np.asarray(identity)
    overall_fpr = false_positive_rate(labels, scores, threshold)
    rows = []
    for i, name in names.items():
        g = identity == i
        toxic, clean = labels == 1, labels == 0
        fpr = false_positive_rate(labels[g], scores[g], threshold)
        rows.append(
            SubgroupMetrics(
                name=name,
                size=int(g.sum()),
                subgroup_auc=roc_auc(labels[g], scores[g]),
                bpsn_auc=_auc(labels, scores, (~g & toxic) | (g & clean)),
                bnsp_auc=_auc(labels, scores, (g & toxic) | (~g & clean)),
                fpr=fpr,
                fpr_gap=fpr - overall_fpr,
            )
        )
    auc = roc_auc(labels, scores)
    final = 0.25 * auc + 0.25 * sum(
        power_mean([getattr(r, m) for r in rows]) for m in ("subgroup_auc", "bpsn_auc", "bnsp_auc")
    )
    correct = (scores > threshold) == (labels == 1)
    none = identity == 0
    return BiasMetrics(
        accuracy=float(correct.mean()),
        clean_accuracy=float(correct[none].mean()) if none.any() else math.nan,
        auc=auc,
        fpr=overall_fpr,
        identity_fpr_gap=false_positive_rate(labels[~none], scores[~none], threshold)
        - false_positive_rate(labels[none], scores[none], threshold),
        final_score=final,
        subgroups=rows,
    )


def _auc(labels: np.ndarray, scores: np.ndarray, mask: np.ndarray) -> float:
    return roc_auc(labels[mask], scores[mask])
