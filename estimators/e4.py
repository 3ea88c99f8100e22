"""E4, reduced replay: keep the later dynamics nonlinear at a fraction of retraining's cost.

First-order estimators (E1, E2) linearise every later step, which fails when a skipped stage
moves the parameters far or when later stages re-learn what it taught. E4 instead replays every
later stage with every ``stride``-th recorded batch, each coarse step carrying the learning-rate
mass of the ``stride`` steps it stands for, once from the parameters that entered stage k and
once from those that left it, and takes the difference::

    SE_k = R(theta_{t_{k-1}}, state at t_{k-1}) - R(theta_{t_k}, state at t_k)

so that the error of the coarse schedule cancels to first order, over the final model's
parameters and floating-point buffers (the replays re-estimate running statistics as the later
stages did). ``stride = 1`` is the ground truth exactly; the cost is about ``2 / stride`` of
retraining the later stages.

Each coarse step takes the summed learning rate of the steps it stands for. SGD keeps its
momentum: under a constant gradient a coarse step then moves exactly as far as the fine steps
(``sum(lr) * g / (1 - mu)``), and it stays stable for larger strides than rescaling the momentum
to ``mu**stride`` would (that needs a larger rate for the same distance). Adam's steps are
normalised, so there the moments' horizon is kept instead: ``beta -> beta**stride``. Decoupled
weight decay keeps its total shrinkage (to first order) through the summed rate. A coarse replay
that diverges is reported with the advice to lower the stride.

The replays run on the current compute (``retrain_after``: its device, in bfloat16 under a
bfloat16 compute) and come back on the CPU; embeddings computed in bfloat16 are stored apart
(``Estimator.trains``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from attribution.record.counterfactual import retrain_after
from attribution.record.errors import SpecError, StagetraceError, TrainingError
from attribution.record.trajectory import ParamGroup, StageRecord, StepLog, Trajectory
from estimators.base import (
    EVIDENCE,
    Arguments,
    Estimator,
    Offsets,
    final_buffer_names,
    final_parameter_names,
    stage_displacement,
)


@dataclass(frozen=True)
class E4Arguments(Arguments):
    """``stride``: replay every stride-th recorded batch (1 is the truth; cost ~ 2 / stride)."""

    stride: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.stride, int) or isinstance(self.stride, bool) or self.stride < 1:
            raise SpecError(
                "e4.stride",
                f"expected a positive integer, got {self.stride!r}",
                "give a stride such as 2 (e4:2)",
            )


class E4(Estimator):
    name = "e4"
    requires = frozenset(EVIDENCE)
    Settings = E4Arguments
    shorthand = "stride"
    version = 2  # embeddings hold floating-point buffers
    trains = True  # the replays follow Compute.training_dtype

    @property
    def stride(self) -> int:
        return self.arguments.stride

    def offsets(self, traj: Trajectory, counts: dict[str, int]) -> dict[str, Offsets]:
        names = final_parameter_names(traj)
        state_names = [*names, *final_buffer_names(traj)]
        coarse = [
            coarsen(traj.stages[j], traj.steps(j), self.stride) for j in range(len(traj.stages))
        ]
        out = {}
        for k, record in enumerate(traj.stages[:-1]):
            later = coarse[k + 1 :]
            entered = (traj.checkpoint(k, "start"), traj.optimizer_state(k - 1, "end") if k else {})
            left = (traj.checkpoint(k, "end"), traj.optimizer_state(k, "end"))
            try:
                skipped, factual = (
                    retrain_after(traj, k, *s, later=later) for s in (entered, left)
                )
            except TrainingError as exc:
                raise StagetraceError(
                    f"E4 at stride {self.stride} diverged ({exc}). Fix: use a smaller stride"
                ) from exc
            out[record.name] = {n: skipped[n].double() - factual[n].double() for n in state_names}
            counts["replayed_steps"] = counts.get("replayed_steps", 0) + 2 * sum(
                s.num_steps for _, s in later
            )
        last = len(traj.stages) - 1
        out[traj.stages[last].name] = stage_displacement(traj, last, names)
        return out


def coarsen(record: StageRecord, steps: StepLog, stride: int) -> tuple[StageRecord, StepLog]:
    """The stage with every ``stride``-th batch and coarse rates and hyperparameters."""
    if stride == 1:
        return record, steps
    starts = list(range(0, steps.num_steps, stride))
    mass = torch.stack([steps.lr[t : t + stride].sum(0) for t in starts])  # [coarse, groups]
    groups = record.groups
    if record.optimizer in ("adam", "adamw"):
        groups = tuple(
            ParamGroup(g.params, {**g.hyper, "betas": [b**stride for b in g.hyper["betas"]]})
            for g in groups
        )
    coarse = StepLog.from_batches(mass.tolist(), [steps.batch(t) for t in starts])
    return dataclasses.replace(record, groups=groups, num_steps=len(starts)), coarse
