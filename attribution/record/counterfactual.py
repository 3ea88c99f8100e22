"""Ground truth: the final parameters had stage k never run, by actually retraining.

Skipping stage k removes its training steps and its re-initialisations: stage k+1 starts from the
parameters that entered stage k (its ``start`` checkpoint, in which adapters stage k added sit at
their function-preserving initial values) and stages k+1..K run with their recorded batches,
learning rates, hyperparameters and entry actions. Under the ``carry`` policy stage k+1 receives
the optimizer state that existed when stage k began (stage k-1's final state). This equals the
run declared without stage k. Results are stored in the trajectory's cache (by default the run
itself) in ``counterfactuals/skip-<stage>/`` and reused while the recorded run is unchanged; two
processes asking for the same one compute it once (the second waits, then reuses it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from attribution.record.artifacts import artifact_lock, load_artifact, save_artifact
from attribution.record.errors import StagetraceError, TrajectoryError
from attribution.record.optim import OptimizerState
from attribution.record.pipeline import (
    StepCallback,
    add_adapters,
    continue_stage,
    recorded_threads,
)
from attribution.record.trajectory import StageRecord, StepLog, Trajectory, load_state, snapshot

SCHEMA = "stagetrace.counterfactual"
SCHEMA_VERSION = 1
FINAL = "final.safetensors"


@dataclass(frozen=True)
class Counterfactual:
    """Final parameters and buffers of the run with ``skipped`` removed, and what it cost."""

    skipped: str
    state: dict[str, torch.Tensor]
    seconds: float
    reused: bool


def skip_stage(
    traj: Trajectory, stage: str | int, on_step: StepCallback | None = None
) -> Counterfactual:
    """Retrain the stages after ``stage`` without it, or reuse the result stored in the
    trajectory's cache. While computing it holds the result's lock, so that another process
    asking for the same result waits and then reuses it instead of computing it again."""
    k = check_skippable(traj, stage)
    name = traj.stages[k].name
    folder = f"counterfactuals/skip-{name}"
    stored = load_artifact(traj, folder, FINAL, SCHEMA, SCHEMA_VERSION)
    if stored is None:
        for j in range(k + 1, len(traj.stages)):
            traj.check_replayable(j)  # refuse before the lock creates anything
        with artifact_lock(traj, folder):
            # another process may have stored it while this one waited for the lock
            stored = load_artifact(traj, folder, FINAL, SCHEMA, SCHEMA_VERSION)
            if stored is None:
                return _compute(traj, k, folder, on_step)
    return Counterfactual(name, stored.tensors, float(stored.meta["seconds"]), reused=True)


def _compute(traj: Trajectory, k: int, folder: str, on_step: StepCallback | None) -> Counterfactual:
    name = traj.stages[k].name
    began = time.perf_counter()
    skipped_state = traj.optimizer_state(k - 1, "end") if k else {}
    state = retrain_after(traj, k, traj.checkpoint(k, "start"), skipped_state, on_step)
    seconds = time.perf_counter() - began
    later = traj.stages[k + 1 :]
    meta = {
        "skipped_stage": name,
        "retrained_stages": [r.name for r in later],
        "retrained_steps": sum(r.num_steps for r in later),
        "seconds": seconds,
    }
    save_artifact(traj, folder, FINAL, SCHEMA, SCHEMA_VERSION, state, meta)
    return Counterfactual(name, state, seconds, reused=False)


def retrain_after(
    traj: Trajectory,
    k: int,
    state: dict[str, torch.Tensor],
    optimizer_state: OptimizerState,
    on_step: StepCallback | None = None,
    later: Sequence[tuple[StageRecord, StepLog]] | None = None,
) -> dict[str, torch.Tensor]:
    """Final parameters and buffers from running stages k+1..K as recorded, starting from
    ``state`` (in stage k's structure) and ``optimizer_state`` (the state in hand after k).

    ``later`` replaces the recorded (record, steps) of those stages, e.g. with a coarser
    schedule; by default they run exactly as recorded, with the recorded thread count
    (``recorded_threads``). Stages k+1..K known not to replay (``Trajectory.check_replayable``)
    are refused: their retraining would not be the run's.
    """
    for j in range(k + 1, len(traj.stages)):
        traj.check_replayable(j)
    if later is None:
        later = [(traj.stages[j], traj.steps(j)) for j in range(k + 1, len(traj.stages))]
    model = traj.build_model(k)
    load_state(model, state, f"start of the stages after {traj.stages[k].name}")
    with recorded_threads(traj):
        for record, steps in later:
            add_adapters(model, record.entry, record.name)
            optimizer_state = continue_stage(model, record, steps, optimizer_state, on_step)
    return snapshot(model)


def as_model(traj: Trajectory, state: dict[str, torch.Tensor]) -> nn.Module:
    """A model of the final stage's structure holding ``state`` (final or counterfactual)."""
    model = traj.build_model(len(traj.stages) - 1)
    load_state(model, state, "counterfactual state")
    return model


def check_skippable(traj: Trajectory, stage: str | int) -> int:
    """The index of ``stage`` if skipping it is well defined for this record; else an error
    saying why. Estimators refuse the same stages, so estimates and truth always pair up."""
    check_complete(traj, "a counterfactual")
    k = traj.index(stage)
    _check_carry(traj, k)
    return k


def check_complete(traj: Trajectory, what: str) -> None:
    """``what`` (a counterfactual, a rerun) of an unfinished run would miss its later stages."""
    if not traj.complete:
        raise TrajectoryError(
            traj.store.where("manifest.json"),
            f"the run is incomplete ({len(traj.stages)} stage(s) recorded), so {what} "
            "would miss its later stages",
            "resume the run (run the same pipeline again) or call Recorder.finish()",
            field="complete",
        )


def _check_carry(traj: Trajectory, k: int) -> None:
    """Skipping k must not hand one optimizer's state to a stage of another type."""
    if 0 < k < len(traj.stages) - 1:
        before, after = traj.stages[k - 1], traj.stages[k + 1]
        if after.optimizer_policy == "carry" and before.optimizer != after.optimizer:
            raise StagetraceError(
                f"skipping stage {traj.stages[k].name!r} would carry {before.optimizer} state "
                f"from {before.name!r} into the {after.optimizer} stage {after.name!r}. Fix: "
                f"skip a different stage, or record {after.name!r} with optimizer_policy reset"
            )
