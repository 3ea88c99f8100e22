"""Ground truth: the final parameters had stage k never run, by actually retraining.

Skipping stage k removes its training steps and its re-initialisations: stage k+1 starts from the
parameters that entered stage k (its ``start`` checkpoint, in which adapters stage k added sit at
their function-preserving initial values) and stages k+1..K run with their recorded batches,
learning rates, hyperparameters and entry actions. Under the ``carry`` policy stage k+1 receives
the optimizer state that existed when stage k began (stage k-1's final state). This equals the
run declared without stage k. Results are stored under the run in
``counterfactuals/skip-<stage>/`` and reused while the recorded run is unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from attribution import SIGN_CONVENTION
from attribution.errors import TrajectoryError
from attribution.pipeline import StepCallback, add_adapters, continue_stage
from attribution.trajectory import Trajectory, load_state, snapshot

SCHEMA = "stagetrace.counterfactual"
SCHEMA_VERSION = 1


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
    """Retrain the stages after ``stage`` without it (or reuse a stored result)."""
    k = traj.index(stage)
    name = traj.stages[k].name
    folder = f"counterfactuals/skip-{name}"
    meta_name, final_name = f"{folder}/meta.json", f"{folder}/final.safetensors"
    fingerprint = traj.fingerprint()
    if traj.store.exists(meta_name):
        meta = traj.store.get_json(meta_name)
        if meta.get("trajectory_fingerprint") != fingerprint:
            raise TrajectoryError(
                traj.store.where(meta_name),
                "was computed from a different recording of this run",
                f"delete {traj.store.where(folder)} to recompute it",
                field="trajectory_fingerprint",
            )
        state = traj.store.get_tensors(final_name, meta.get("sha256"))
        return Counterfactual(name, state, float(meta["seconds"]), reused=True)

    began = time.perf_counter()
    model = traj.load_model(k, "start")
    optimizer_state = traj.optimizer_state(k - 1, "end") if k else {}
    later = traj.stages[k + 1 :]
    for j, record in enumerate(later, start=k + 1):
        add_adapters(model, record.entry, record.name)
        optimizer_state = continue_stage(model, record, traj.steps(j), optimizer_state, on_step)
    state = snapshot(model)
    seconds = time.perf_counter() - began
    sha = traj.store.put_tensors(final_name, state, {"schema": SCHEMA, "skipped_stage": name})
    traj.store.put_json(
        meta_name,
        {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "skipped_stage": name,
            "sign_convention": SIGN_CONVENTION,
            "trajectory_fingerprint": fingerprint,
            "retrained_stages": [r.name for r in later],
            "retrained_steps": sum(r.num_steps for r in later),
            "seconds": seconds,
            "sha256": sha,
        },
    )
    return Counterfactual(name, state, seconds, reused=False)


def as_model(traj: Trajectory, state: dict[str, torch.Tensor]) -> nn.Module:
    """A model of the final stage's structure holding ``state`` (final or counterfactual)."""
    model = traj.build_model(len(traj.stages) - 1)
    load_state(model, state, "counterfactual state")
    return model
