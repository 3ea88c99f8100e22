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
- for a subset replay, two more independent replays at half its budget are compared, per
  example: Pearson >= ``RELIABLE_AGREEMENT`` is ``reliable``, >= ``UNCERTAIN_AGREEMENT``
  ``uncertain``, below ``unreliable`` (a half-budget replay that diverges: ``unreliable``). The
  thresholds come from measurements made before any calibration (two half-budget replays agreed
  at 0.11-0.56 where no cheap estimate was trustworthy and at >= 0.87 elsewhere); the
  calibration against the truth is in ``docs/results.md`` (``experiments.calibration_report``);
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
RELIABLE_AGREEMENT = 0.87
UNCERTAIN_AGREEMENT = 0.6
DEFAULT_BUDGET = 300.0
"""Seconds the audit may spend by default (``--budget``)."""
SUBSET_BUDGET = 0.25
"""The share of the later steps' examples a subset replay uses when the truth is too dear."""

Readout = Callable[..., dict[str, Tensor]]


@dataclass(frozen=True)
class Plan:
    """The method ``auto`` chose (a registry name: ``truth``, ``subset:0.25``, ``e1``), why,
    the predicted seconds it weighed (``truth``: retraining without every stage, 0 for stored
    ones), the budget, what would make the answer better, and the method's settings (a subset
    replay's ``exact``: the stages retrained exactly because their retraining fits)."""

    estimator: str
    reason: str
    predicted_seconds: Mapping[str, float]
    budget: float
    better: str
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Label:
    """How far to trust one stage's estimate: one of ``LABELS``, the evidence behind it, and
    the per-example agreement of two independent half-budget replays when one was measured."""

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


def subset_seconds_by_stage(traj: Trajectory, budget: float = SUBSET_BUDGET) -> dict[str, float]:
    """Per stage before the last, the seconds of its subset replay at ``budget`` and of its
    reliability check (two more at half the budget), from a few timed steps of each later stage
    on that share of their batches: every later step still runs, so a small share costs more
    than its share of the truth."""
    later = range(1, len(traj.stages))
    seconds = {
        share: {j: traj.stages[j].num_steps * step_seconds(traj, j, fraction=share) for j in later}
        for share in (budget, budget / 2)
    }
    return {
        record.name: sum(seconds[budget][j] + 2 * seconds[budget / 2][j] for j in later if j > k)
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
            f"retraining without each stage is predicted to take {truth:.1f} s, within the "
            f"budget of {budget:g} s: the answer is exact",
            predicted,
            budget,
            "nothing: this is the exact answer",
        )
    replaying = subset_seconds_by_stage(traj)
    subset = predicted[f"subset:{SUBSET_BUDGET}"] = sum(replaying.values())
    needed = math.ceil(truth)
    better = f"a budget of {needed} s would compute the truth (--budget {needed})"
    earlier = traj.names[:-1]  # the last stage's embedding is exact for every estimator
    for first in range(1, len(earlier) + 1):  # retrain without earlier[first:], replay the rest
        exact = earlier[first:]
        cost = sum(retraining[s] for s in exact) + sum(replaying[s] for s in earlier[:first])
        if cost > budget:
            continue
        name = f"subset:{SUBSET_BUDGET}"
        reason = (
            f"retraining is predicted to take {truth:.1f} s, over the budget of {budget:g} s; "
            f"a subset replay of {SUBSET_BUDGET:.0%} of the later examples with its reliability "
            f"check is predicted at {subset:.1f} s"
        )
        if exact:
            predicted[f"{name} with the truth for {', '.join(exact)}"] = cost
            reason += (
                f"; retraining without {', '.join(exact)} (whose later steps are few) and "
                f"replaying the rest, {cost:.1f} s, fits: {', '.join(exact)} exact"
            )
        return Plan(name, reason, predicted, budget, better, {"exact": list(exact)})
    return Plan(
        "e1",
        f"retraining ({truth:.1f} s) and a subset replay ({subset:.1f} s) are predicted over "
        f"the budget of {budget:g} s; E1 costs next to nothing",
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
    """Two independent replays at half the budget (other seeds), compared per example."""
    settings = estimator.settings()
    halves = [
        build("subset", {**settings, "budget": settings["budget"] / 2, "seed": seed})
        for seed in (settings["seed"] + 1, settings["seed"] + 2)
    ]
    try:
        first, second = (effects_of(stored_embeddings(h, traj)[0]) for h in halves)
    except TrainingError as exc:  # a coarser replay that diverges says the regime is unstable
        return {
            stage: Label("unreliable", f"a replay at half the budget diverged ({exc})")
            for stage in traj.names[:-1]
        }
    out = {}
    for stage in traj.names[:-1]:
        a, b = first[stage].numpy(), second[stage].numpy()
        if len(a) < 3:
            out[stage] = Label(
                "uncertain", f"only {len(a)} outputs: too few to measure the replays' agreement"
            )
            continue
        r = metrics.pearson(a, b)
        r = float(np.nan_to_num(r, nan=0.0))
        label = (
            "reliable"
            if r >= RELIABLE_AGREEMENT
            else "uncertain"
            if r >= UNCERTAIN_AGREEMENT
            else "unreliable"
        )
        out[stage] = Label(
            label,
            f"two independent replays at half the budget agree at Pearson {r:.2f} per example "
            f"(reliable >= {RELIABLE_AGREEMENT}, uncertain >= {UNCERTAIN_AGREEMENT})",
            r,
        )
    return out
