"""Three ways to remove a stage's contribution from the final model (docs/interventions.md).

- ``undo``: deploy theta_T + SE_k, the final parameters moved by a stage embedding (no training);
- ``skip``: the counterfactual itself, stages k+1..K retrained without stage k;
- ``filter_and_rerun``: stage k rerun without some of its examples (e.g. the most harmful by
  ``estimators.within_stage.example_scores``), then every later stage as recorded.

Each returns the final parameters and buffers of the intervened model, in the final model's
structure (load them with ``attribution.record.counterfactual.as_model``), and the seconds it took.
``most_harmful`` and ``random_drop`` choose what ``filter_and_rerun`` drops.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from attribution.record.counterfactual import check_complete, retrain_after, skip_stage
from attribution.record.errors import SpecError, StagetraceError
from attribution.record.pipeline import (
    StepCallback,
    continue_stage,
    recorded_threads,
    require_batch_order,
)
from attribution.record.references import load_dataset
from attribution.record.trajectory import StepLog, Trajectory, load_state, snapshot
from estimators.base import StageEmbeddings
from estimators.within_stage import ExampleScores


@dataclass(frozen=True)
class Intervention:
    """The final parameters and buffers after intervention ``kind`` on ``stage``.

    ``seconds``: wall time (for a reused stored skip, the time it took when computed);
    ``counts``: what was done (steps retrained, examples dropped, steps left without a batch).
    """

    kind: str
    stage: str
    state: dict[str, torch.Tensor]
    seconds: float
    counts: Mapping[str, int] = field(default_factory=dict)


def undo(traj: Trajectory, embeddings: StageEmbeddings, stage: str | int) -> Intervention:
    """theta_T + SE_k: the final parameters moved by the embedding of ``stage`` (computed in
    float64, stored in each parameter's dtype); buffers and parameters the embedding omits stay
    as they are. Exact when the embedding is (e.g. E0 for the last stage)."""
    began = time.perf_counter()
    name = traj.stages[traj.index(stage)].name
    if name not in embeddings.offsets:
        raise StagetraceError(
            f"the {embeddings.estimator} embeddings hold no offset for stage {name!r} (they "
            f"cover {', '.join(embeddings.offsets) or 'none'}). Fix: embed this trajectory "
            "with the estimator, e.g. E2().embed(traj)"
        )
    offsets = embeddings.offsets[name]
    final = traj.checkpoint(len(traj.stages) - 1, "end")
    misfit = sorted(n for n, v in offsets.items() if n not in final or v.shape != final[n].shape)
    if misfit:
        raise StagetraceError(
            f"the {embeddings.estimator} offsets of stage {name!r} do not fit the final model "
            f"(unknown names or wrong shapes: {misfit[:5]}). Fix: use embeddings computed from "
            "this trajectory"
        )
    state = {
        n: (v.double() + offsets[n].double()).to(v.dtype) if n in offsets else v.clone()
        for n, v in final.items()
    }
    return Intervention("undo", name, state, time.perf_counter() - began)


def skip(traj: Trajectory, stage: str | int, on_step: StepCallback | None = None) -> Intervention:
    """The counterfactual: stages k+1..K retrained without stage k
    (``attribution.record.counterfactual.skip_stage``, stored and reused); ``on_step`` sees
    each retrained step."""
    result = skip_stage(traj, stage, on_step)
    k = traj.index(stage)
    retrained = sum(r.num_steps for r in traj.stages[k + 1 :])
    return Intervention(
        "skip",
        result.skipped,
        result.state,
        result.seconds,
        {"retrained_steps": retrained, "reused": int(result.reused)},
    )


def filter_and_rerun(
    traj: Trajectory,
    stage: str | int,
    drop: Sequence[int] | torch.Tensor,
    on_step: StepCallback | None = None,
) -> Intervention:
    """Rerun stage k without the dataset indices ``drop``, then every later stage as recorded.

    Each recorded batch of stage k loses the dropped examples (its loss is the mean over the
    rest, at the step's recorded learning rate); a batch that loses all of them is skipped: no
    optimizer step, so the optimizer's step count and momentum see one step fewer. Stage k
    starts from its recorded start with its entry actions and the optimizer state its policy
    takes (empty for stage 0); the later stages keep their batches, rates and entry actions.
    With nothing dropped this reproduces theta_T bit for bit (the replay is deterministic).
    ``on_step`` sees each step rerun.
    """
    began = time.perf_counter()
    k = traj.index(stage)
    record = traj.stages[k]
    check_complete(traj, "a rerun")
    log = traj.steps(k)
    require_batch_order(record, log, "filtering")
    traj.check_replayable(k)
    dropped = _indices(drop, len(load_dataset(record.data)), record.name)
    lrs, batches = [], []
    for t in range(log.num_steps):
        batch = log.batch(t)
        kept = batch[~torch.isin(batch, dropped)]
        if kept.numel():
            lrs.append(log.lr[t].tolist())
            batches.append(kept)
    filtered = StepLog.from_batches(lrs, batches)
    model = traj.build_model(k)
    load_state(model, traj.checkpoint(k, "start"), f"start of stage {record.name}")
    previous = traj.optimizer_state(k - 1, "end") if k else {}
    with recorded_threads(traj):
        optimizer_state = continue_stage(model, record, filtered, previous, on_step)
    state = retrain_after(traj, k, snapshot(model), optimizer_state, on_step)
    counts = {
        "dropped_examples": len(dropped),
        "removed_occurrences": int(torch.isin(log.indices, dropped).sum()),
        "skipped_steps": log.num_steps - len(batches),
        "retrained_steps": len(batches) + sum(r.num_steps for r in traj.stages[k + 1 :]),
    }
    return Intervention("filter", record.name, state, time.perf_counter() - began, counts)


def most_harmful(scores: ExampleScores, fraction: float) -> torch.Tensor:
    """Indices (int64) of the top ``fraction`` of the used examples by score, highest first
    (scores > 0 raised f: for a loss or a gap, the most harmful); ``round(fraction * used)``
    of them, at least one."""
    used = _used(scores.uses, scores.stage)
    order = torch.argsort(scores.scores[used], descending=True, stable=True)
    return used[order[: _count(fraction, len(used))]]


def random_drop(uses: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """The random control for ``most_harmful``: as many used examples (``uses`` > 0, e.g.
    ``ExampleScores.uses``), drawn uniformly without replacement with ``seed``; ascending."""
    used = _used(uses, "the stage")
    count = _count(fraction, len(used))
    generator = torch.Generator().manual_seed(seed)
    return used[torch.randperm(len(used), generator=generator)[:count]].sort().values


def _used(uses: torch.Tensor, stage: str) -> torch.Tensor:
    used = torch.nonzero(uses > 0).flatten()
    if not len(used):
        raise StagetraceError(
            f"no example of {stage} was used by any batch. Fix: score a stage that recorded its "
            "batch order"
        )
    return used


def _count(fraction: float, used: int) -> int:
    """How many of ``used`` examples a fraction in (0, 1] selects: rounded, at least one."""
    valid = isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
    if not valid or not 0 < fraction <= 1:
        raise SpecError(
            "fraction", f"{fraction!r} is not in (0, 1]", "give e.g. 0.05 to drop 5 percent"
        )
    return max(1, round(fraction * used))


def _indices(drop: Sequence[int] | torch.Tensor, size: int, stage: str) -> torch.Tensor:
    """``drop`` as unique int64 dataset indices, each in [0, size)."""
    values = torch.as_tensor(drop)
    if values.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise SpecError(
            "drop", f"expected integer dataset indices, got {values.dtype}", "pass a list of ints"
        )
    values = values.flatten().to(torch.int64)
    bad = values[(values < 0) | (values >= size)]
    if bad.numel():
        raise SpecError(
            "drop",
            f"index {int(bad[0])} is outside stage {stage!r}'s {size} examples",
            f"give dataset indices in [0, {size})",
        )
    return values.unique()
