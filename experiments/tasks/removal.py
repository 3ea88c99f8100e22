"""What the shortcut studies (``spurious_image``, ``toxicity``) share: the true effects of the
behaviours they track, and the three interventions on a stage (docs/interventions.md).

Effects follow the project's sign convention: effect_k(f) = f(theta_T) - f(theta_T^(-k)).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

from attribution.analysis.behaviors import Behavior
from attribution.analysis.interventions import (
    Intervention,
    filter_and_rerun,
    most_harmful,
    random_drop,
    skip,
    undo,
)
from attribution.record.evaluation import ModelAt
from attribution.record.pipeline import StepCallback
from attribution.record.trajectory import Trajectory
from estimators import StageEmbeddings
from estimators.within_stage import example_scores

log = logging.getLogger(__name__)

Progress = Callable[[str], StepCallback | None]
"""Names a rerun ("without finetune") and returns its step callback (or None: silent)."""


def only(values: Mapping[str, float]) -> float:
    """The value of a one-output behaviour."""
    (value,) = values.values()
    return value


def true_effects(
    traj: Trajectory,
    behaviors: Mapping[str, Behavior],
    tracked: Sequence[str],
    model: ModelAt,
    batch_size: int,
    progress: Progress,
) -> dict[str, dict[str, float]]:
    """Per stage, the true effect on each tracked one-output behaviour (retraining without the
    stage, stored and reused) and the retraining's ``seconds``."""
    at_final = {name: only(behaviors[name].values(model, batch_size)) for name in tracked}
    truth = {}
    for stage in traj.names:
        skipped = skip(traj, stage, progress(f"without {stage}"))
        without = model.at(skipped.state)
        truth[stage] = {
            **{
                name: at_final[name] - only(behaviors[name].values(without, batch_size))
                for name in tracked
            },
            "seconds": skipped.seconds,
        }
    return truth


def intervene(
    traj: Trajectory,
    stage: str,
    embeddings: StageEmbeddings,
    behaviour: Callable[[Mapping[str, Tensor]], Tensor],
    fraction: float,
    seed: int,
    score: Callable[[Intervention], dict[str, Any]],
    carriers: Tensor | None,
    progress: Progress,
) -> list[dict[str, Any]]:
    """Undo, skip and filter on ``stage``, each ``score``'s row with its seconds (undo's include
    computing the embeddings; filter's include scoring the stage's examples). Filter drops the
    ``fraction`` of the stage's used examples that raised ``behaviour`` most; with ``carriers``
    (per example of the stage's data: does it carry the planted shortcut) its row gains the
    carriers' share among the dropped and among as many dropped at random (seeded)."""
    undone = score(undo(traj, embeddings, stage))
    undone["seconds"] += embeddings.seconds
    rows = [undone, score(skip(traj, stage, progress(f"without {stage}")))]
    log.info("filter: scoring the training examples of stage %s", stage)
    scores = example_scores(traj, stage, behaviour)
    drop = most_harmful(scores, fraction)
    log.info(
        "filter: rerunning stage %s without its %d most harmful examples (scored in %.1f s), "
        "then the stages after it",
        stage,
        len(drop),
        scores.seconds,
    )
    row = score(filter_and_rerun(traj, stage, drop, progress(f"filtered {stage}")))
    row["seconds"] += scores.seconds
    row["dropped"] = len(drop)
    row["dropped_carrier_share"] = row["random_carrier_share"] = None  # not known
    if carriers is not None:
        random = random_drop(scores.uses, fraction, seed)
        row["dropped_carrier_share"] = float(carriers[drop].double().mean())
        row["random_carrier_share"] = float(carriers[random].double().mean())
    return [*rows, row]
