"""How an audit answers, and how far to trust each answer.

``plan`` chooses the method for ``--estimator auto``: the truth (retraining without each stage)
when the recording allows a replay and the retraining is predicted to fit the budget; else a
subset replay with its reliability check when that fits, with the truth for the later stages
whose retraining (few later steps) fits beside it; else the curvature-free E1 (or E0 when the
optimizer's record is missing). It says why, and what would make the answer better.

``labels`` puts one of ``LABELS`` on every stage's estimate, with the evidence behind it:

- ``exact``: the truth itself (also for the stages a subset replay retrained exactly), or the
  last stage with the evaluated read-out (every estimator's last-stage embedding is that
  stage's exact displacement);
- for a subset replay, its two independent replicas (``Subset.replica``; a one-replica estimate
  gets a second for the check) are compared per example: Pearson >= ``RELIABLE_AGREEMENT`` is
  ``reliable``, >= ``UNCERTAIN_AGREEMENT`` ``uncertain``, below ``unreliable`` (a replica that
  diverges: ``unreliable``). The thresholds are set on the calibration sweep's seeds 0-2 and the
  calibration table against the truth is published on other seeds (``docs/results.md``,
  ``experiments.calibration_report``);
- the other estimators on stages before the last are ``unreliable``: at full-strength later
  stages they rank stages wrongly or flip signs (``docs/results.md``), and nothing in one
  recording tells when they do not. Validate them on a run like yours (``stagetrace validate``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from attribution.analysis import metrics
from attribution.record.artifacts import load_artifact
from attribution.record.counterfactual import FINAL, SCHEMA, SCHEMA_VERSION, check_complete
from attribution.record.errors import StagetraceError, TrainingError
from attribution.record.pipeline import step_seconds
from attribution.record.trajectory import Trajectory
from estimators import EVIDENCE, Estimator, StageEmbeddings, build, stored_embeddings
from estimators.registry import available_evidence

LABELS = ("exact", "reliable", "uncertain", "unreliable")
UNKNOWN_START = "unknown start"
"""The label of a stage of an audit spec whose starting weights nobody kept: no number."""
RELIABLE_AGREEMENT = 0.9
UNCERTAIN_AGREEMENT = 0.7
DEFAULT_BUDGET = 300.0
"""Seconds the audit may spend by default (``--budget``)."""
SUBSET_BUDGET = 0.25
"""The share of the later steps' examples each replay of the audit's subset replay uses."""
SUBSET_MERGE = 2
"""Consecutive steps sharing one gradient in the audit's subset replay (``Subset``'s
``merge``)."""
SUBSET_REPLICAS = 2
"""Independent replays the audit's subset replay averages; their agreement is its label, so the
check costs nothing beyond the estimate (a one-replica estimate needs one more replay for it).
Their fidelity and seconds beside the one-replica replays: docs/results.md."""
SUBSET_SETTINGS = {"merge": SUBSET_MERGE, "replicas": SUBSET_REPLICAS}
SUBSET = f"subset:{SUBSET_BUDGET}"


def subset_replay() -> Estimator:
    """The audit's subset replay as ``auto`` builds it (before any ``exact`` stages)."""
    return build(SUBSET, SUBSET_SETTINGS)


Readout = Callable[..., dict[str, Tensor]]


@dataclass(frozen=True)
class Plan:
    """The method ``auto`` chose (a registry name: ``truth``, ``subset:0.25``, ``e1``), why,
    the predicted seconds it weighed (``truth``: retraining without every stage, 0 for stored
    ones), the budget, what would make the answer better, and the method's settings (a subset
    replay's ``SUBSET_SETTINGS``, and its ``exact``: the stages retrained exactly because their
    retraining fits)."""

    estimator: str
    reason: str
    predicted_seconds: Mapping[str, float]
    budget: float
    better: str
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Label:
    """How far to trust one stage's estimate: one of ``LABELS``, the evidence behind it, and
    the per-example agreement of a subset replay's independent replicas when one was measured."""

    label: str
    evidence: str
    agreement: float | None = None


def replay_problem(traj: Trajectory, evidence: AbstractSet[str] | None = None) -> str | None:
    """Why the recording cannot be replayed (so no truth and no replay estimate), or None.
    ``evidence`` replaces what the trajectory says it holds (an audit spec knows better)."""
    held = available_evidence(traj) if evidence is None else evidence
    missing = sorted({"batch_order", "stage_data"} - held)
    if missing:
        return "it lacks " + " and ".join(EVIDENCE[m] for m in missing)
    try:
        check_complete(traj, "a replay")
        for k in range(len(traj.stages)):
            traj.check_replayable(k)
    except StagetraceError as exc:
        return str(exc).split(". Fix:")[0]
    return None


def truth_seconds_by_stage(traj: Trajectory) -> dict[str, float]:
    """Per stage, the seconds to retrain without it, from a few timed steps of each later stage
    (``step_seconds``); 0 where that counterfactual is stored."""
    later = {j: r.num_steps * step_seconds(traj, j) for j, r in enumerate(traj.stages) if j}
    out = {}
    for k, record in enumerate(traj.stages):
        folder = f"counterfactuals/skip-{record.name}"
        stored = load_artifact(traj, folder, FINAL, SCHEMA, SCHEMA_VERSION) is not None
        out[record.name] = 0.0 if stored else sum(s for j, s in later.items() if j > k)
    return out


def subset_seconds_by_stage(traj: Trajectory) -> dict[str, float]:
    """Per stage before the last, the seconds of the audit's subset replay (``SUBSET_REPLICAS``
    replays at ``SUBSET_BUDGET``, ``SUBSET_MERGE`` steps to a gradient), from a few timed runs
    of merged steps of each later stage on that share of their batches: every later step still
    updates, so a small share costs more than its share of the truth."""
    later = {
        j: r.num_steps * step_seconds(traj, j, fraction=SUBSET_BUDGET, merge=SUBSET_MERGE)
        for j, r in enumerate(traj.stages)
        if j
    }
    return {
        record.name: SUBSET_REPLICAS * sum(s for j, s in later.items() if j > k)
        for k, record in enumerate(traj.stages[:-1])
    }


def plan(
    traj: Trajectory, budget: float = DEFAULT_BUDGET, evidence: AbstractSet[str] | None = None
) -> Plan:
    """The most faithful method whose evidence is present and whose predicted cost fits
    ``budget`` seconds (see the module docstring). ``evidence`` replaces what the trajectory
    says it holds (``EVIDENCE`` keys; an audit spec's checkpoints hold less than a recording)."""
    if not budget >= 0:
        raise StagetraceError(f"budget {budget!r} is not >= 0 seconds. Fix: give e.g. --budget 300")
    held = available_evidence(traj) if evidence is None else evidence
    problem = replay_problem(traj, held)
    if problem is not None:
        name = "e1" if build("e1").requires <= held else "e0"
        return Plan(
            name,
            f"no replay is possible: {problem}",
            {},
            budget,
            "record the batch order and an importable data reference of every stage (a "
            "replayable recording), so that the truth or a replay estimate can be computed",
        )
    retraining = truth_seconds_by_stage(traj)
    truth = sum(retraining.values())
    predicted = {"truth": truth}
    if truth <= budget:
        return Plan(
            "truth",
            f"retraining without each stage is predicted to take {truth:.3g} s, within the "
            f"budget of {budget:g} s: the answer is exact",
            predicted,
            budget,
            "nothing: this is the exact answer",
        )
    replaying = subset_seconds_by_stage(traj)
    subset = predicted[SUBSET] = sum(replaying.values())
    needed = math.ceil(truth)
    better = f"a budget of {needed} s would compute the truth (--budget {needed})"
    earlier = traj.names[:-1]  # the last stage's embedding is exact for every estimator
    for first in range(1, len(earlier) + 1):  # retrain without earlier[first:], replay the rest
        exact = earlier[first:]
        cost = sum(retraining[s] for s in exact) + sum(replaying[s] for s in earlier[:first])
        if cost > budget:
            continue
        reason = (
            f"retraining is predicted to take {truth:.3g} s, over the budget of {budget:g} s; "
            f"{SUBSET_REPLICAS} subset replays of {SUBSET_BUDGET:.0%} of the later examples, "
            f"{SUBSET_MERGE} steps to a gradient, averaged and checked against each other, are "
            f"predicted at {subset:.3g} s"
        )
        if exact:
            predicted[f"{SUBSET} with the truth for {', '.join(exact)}"] = cost
            reason += (
                f"; retraining without {', '.join(exact)} (whose later steps are few) and "
                f"replaying the rest, {cost:.3g} s, fits: {', '.join(exact)} exact"
            )
        settings = {**SUBSET_SETTINGS, "exact": list(exact)}
        return Plan(SUBSET, reason, predicted, budget, better, settings)
    return Plan(
        "e1",
        f"retraining ({truth:.3g} s) and {SUBSET_REPLICAS} subset replays ({subset:.3g} s) are "
        f"predicted over the budget of {budget:g} s; E1 costs next to nothing",
        predicted,
        budget,
        better,
    )


def labels(
    traj: Trajectory,
    embeddings: StageEmbeddings,
    readout: str,
    effects_of: Callable[[StageEmbeddings], dict[str, Tensor]],
) -> dict[str, Label]:
    """A label for every stage's estimate. ``effects_of(embeddings)`` gives the per-example
    effects [N] per stage under the audit's read-out and behaviours (all outputs concatenated);
    it is used to compare the independent replays of the subset check."""
    last = traj.names[-1]
    estimator = build(embeddings.estimator, embeddings.settings)
    checked = _agreement(traj, estimator, effects_of) if estimator.name == "subset" else {}
    out = {}
    retrained = set(estimator.settings().get("exact", ())) if estimator.name == "subset" else set()
    for stage in traj.names:
        exact_embedding = estimator.name == "truth" or stage == last or stage in retrained
        if exact_embedding and readout == "evaluated":
            out[stage] = _exact(estimator, readout, stage in retrained)
        elif exact_embedding:
            out[stage] = Label(
                "uncertain",
                "the embedding is exact but the linear read-out is first order in it; use the "
                "evaluated read-out for the exact effect",
            )
        elif estimator.name == "subset":
            out[stage] = checked[stage]
        else:
            out[stage] = Label(
                "unreliable",
                f"{estimator.label} does not replay the later stages; at full-strength later "
                "stages such estimates rank stages wrongly or flip signs (docs/results.md), and "
                "nothing in this recording says whether they do here",
            )
    return out


def _exact(estimator: Estimator, readout: str, retrained: bool = False) -> Label:
    if estimator.name == "truth" or retrained:
        return Label("exact", "retrained without the stage (the truth), evaluated read-out")
    return Label(
        "exact",
        f"the last stage: every estimator's embedding is its exact displacement, and the "
        f"{readout} read-out evaluates it",
    )


def _agreement(
    traj: Trajectory,
    estimator: Estimator,
    effects_of: Callable[[StageEmbeddings], dict[str, Tensor]],
) -> dict[str, Label]:
    """A subset replay's replicas (two at least), compared per example: the mean Pearson over
    their pairs."""
    count = max(2, estimator.settings()["replicas"])
    try:
        effects = [
            effects_of(stored_embeddings(estimator.replica(i), traj)[0]) for i in range(count)
        ]
    except TrainingError as exc:  # a replay that diverges says the regime is unstable
        return {
            stage: Label("unreliable", f"an independent replay diverged ({exc})")
            for stage in traj.names[:-1]
        }
    out = {}
    for stage in traj.names[:-1]:
        values = [e[stage].numpy() for e in effects]
        if len(values[0]) < 3:
            out[stage] = Label(
                "uncertain",
                f"only {len(values[0])} outputs: too few to measure the replays' agreement",
            )
            continue
        pairs = [(a, b) for i, a in enumerate(values) for b in values[i + 1 :]]
        r = float(np.mean([np.nan_to_num(metrics.pearson(a, b), nan=0.0) for a, b in pairs]))
        label = (
            "reliable"
            if r >= RELIABLE_AGREEMENT
            else "uncertain"
            if r >= UNCERTAIN_AGREEMENT
            else "unreliable"
        )
        out[stage] = Label(
            label,
            f"{count} independent replays at this budget agree at Pearson {r:.2f} per example "
            f"(reliable >= {RELIABLE_AGREEMENT}, uncertain >= {UNCERTAIN_AGREEMENT})",
            r,
        )
    return out
