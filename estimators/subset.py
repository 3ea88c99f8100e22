"""Single-arm subset replay: retrain the later stages on a random part of each recorded batch.

For every stage k before the last, the later stages k+1..K are replayed exactly as the
counterfactual retrains them (``retrain_after``: from stage k's ``start`` checkpoint, with the
optimizer state that existed when stage k began, every later stage's entry actions, optimizer,
hyperparameters, clipping and the recorded thread count), except that step t trains on a random
subset of n_t of its recorded batch's B_t examples, with its own recorded learning rate. The
embedding compares the end point directly with the recorded final state::

    SE_k = R_subset(theta_{t_{k-1}}, state at t_{k-1}) - theta_T

over the final model's parameters and floating-point buffers. There is one arm only: a second
(factual) arm replayed from stage k's end would sit far from the first in parameter space and
respond differently to the same subsampling, so subtracting it adds noise rather than removing
it. The last stage's embedding is its exact displacement, as for every estimator.

The budget is a fraction of the later steps' examples, ``n = round(budget * sum_t B_t)``, shared
by water-filling: ``n_t = min(B_t, c * w_t)`` with c set so that the n_t sum to n, rounded to
integers by largest remainder (``allocate``). ``allocation="sqrt_lr"`` takes
``w_t = sqrt(eta_t)`` (the step's learning rate, mean over parameter groups), so steps that move
the parameters most keep most of their batch; ``"uniform"`` takes ``w_t = B_t``, the same
fraction of every batch. Steps allotted no example are skipped entirely (no optimizer step, so
no momentum or Adam update either). A subset's mean-reduced loss has the batch's scale; only its
composition differs. ``budget = 1`` replays every example of every step: the truth, bit for bit.

``merge = m`` > 1 lets m consecutive kept steps of a stage share one gradient: it is computed
at the first of them on the union of their subsets, and the optimizer then takes each of the m
steps with it held fixed, with the step's own learning rate, momentum and weight decay
(``attribution.record.optim.steps_with_frozen_gradient``: SGD in closed form). The examples are
the same; the forward and backward passes are m times fewer, which is what a small budget cannot
cut (a step's optimizer update and per-operation overhead stay). Where the gradient changes
little over m steps this costs little fidelity; docs/results.md measures it.

``replicas = r`` > 1 averages r independent replays (subset seeds ``seed``, ``seed + 1``, ...):
the embedding is the mean of their displacements, which divides the subsampling's variance by
r, at r times the cost. Each replica is ``replica(i)``, a stored one-replica estimator, so that
the audit's reliability check, which compares the replicas, reuses them instead of replaying.

``exact`` names stages whose embedding is the truth instead (retraining without them,
``attribution.record.counterfactual.skip_stage``, stored and reused): the audit asks for it when
the budget covers retraining without the later stages, whose later steps are few, but not
without the earlier ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from attribution.record.counterfactual import retrain_after, skip_stage
from attribution.record.errors import SpecError
from attribution.record.trajectory import StageRecord, StepLog, Trajectory
from estimators.base import (
    EVIDENCE,
    Arguments,
    Estimator,
    Offsets,
    final_buffer_names,
    final_parameter_names,
    stage_displacement,
    stored_embeddings,
)

ALLOCATIONS = ("sqrt_lr", "uniform")


@dataclass(frozen=True)
class SubsetArguments(Arguments):
    """``budget``: fraction of the later steps' examples replayed (0 < budget <= 1; 1 is the
    truth); ``allocation``: how they are shared among steps (``sqrt_lr``: in proportion to the
    square root of the step's learning rate; ``uniform``: the same fraction of every batch);
    ``seed``: the random subsets; ``merge``: consecutive steps sharing one gradient (1: each
    step its own); ``replicas``: independent replays averaged; ``exact``: stages retrained
    exactly instead (the truth)."""

    budget: float = 0.25
    allocation: str = "sqrt_lr"
    seed: int = 0
    merge: int = 1
    replicas: int = 1
    exact: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        budget = self.budget
        if isinstance(budget, bool) or not isinstance(budget, int | float) or not 0 < budget <= 1:
            raise SpecError(
                "subset.budget",
                f"expected a fraction in (0, 1], got {budget!r}",
                "give a budget such as 0.25 (subset:0.25)",
            )
        if self.allocation not in ALLOCATIONS:
            raise SpecError(
                "subset.allocation",
                f"unknown allocation {self.allocation!r}",
                f"use one of {', '.join(ALLOCATIONS)}",
            )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise SpecError(
                "subset.seed", f"expected a non-negative integer, got {self.seed!r}", "give e.g. 0"
            )
        for field, example in (("merge", "2 (two steps to a gradient)"), ("replicas", "2")):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpecError(
                    f"subset.{field}",
                    f"expected a whole number >= 1, got {value!r}",
                    f"give e.g. {example}, or 1",
                )
        exact = self.exact
        if not isinstance(exact, list | tuple) or not all(isinstance(n, str) for n in exact):
            raise SpecError(
                "subset.exact",
                f"expected a list of stage names, got {exact!r}",
                "give e.g. [adapt]",
            )
        object.__setattr__(self, "exact", tuple(sorted(exact)))


class Subset(Estimator):
    name = "subset"
    requires = frozenset(EVIDENCE)
    Settings = SubsetArguments
    shorthand = "budget"
    version = 1

    def replica(self, i: int) -> Subset:
        """The i-th of the replays this estimator averages: one replica, subset seed
        ``seed + i``, the other settings the same."""
        settings = self.arguments.to_dict()
        return Subset(**{**settings, "replicas": 1, "seed": self.arguments.seed + i})

    def offsets(self, traj: Trajectory, counts: dict[str, int]) -> dict[str, Offsets]:
        if self.arguments.replicas > 1:
            return self._averaged(traj, counts)
        names = final_parameter_names(traj)
        state_names = [*names, *final_buffer_names(traj)]
        last = len(traj.stages) - 1
        final = traj.checkpoint(last, "end")
        unknown = sorted(set(self.arguments.exact) - set(traj.names))
        if unknown:
            raise SpecError(
                "subset.exact",
                f"{unknown} are not stages of this run",
                f"name stages among {', '.join(traj.names)}",
            )
        out = {}
        for k, record in enumerate(traj.stages[:-1]):
            if record.name in self.arguments.exact:
                skipped = skip_stage(traj, k).state
                out[record.name] = {n: skipped[n].double() - final[n].double() for n in state_names}
                counts["retrained_steps"] = counts.get("retrained_steps", 0) + sum(
                    r.num_steps for r in traj.stages[k + 1 :]
                )
                continue
            later = [(traj.stages[j], traj.steps(j)) for j in range(k + 1, len(traj.stages))]
            subsets = subset_schedule(later, self.arguments, k)
            carried = traj.optimizer_state(k - 1, "end") if k else {}
            start = traj.checkpoint(k, "start")
            replayed = retrain_after(
                traj, k, start, carried, later=subsets, merge=self.arguments.merge
            )
            out[record.name] = {n: replayed[n].double() - final[n].double() for n in state_names}
            counts["examples"] = counts.get("examples", 0) + sum(
                int(s.offsets[-1]) for _, s in subsets
            )
            counts["replayed_steps"] = counts.get("replayed_steps", 0) + sum(
                s.num_steps for _, s in subsets
            )
            counts["gradients"] = counts.get("gradients", 0) + sum(
                -(-s.num_steps // self.arguments.merge) for _, s in subsets
            )
        out[traj.stages[last].name] = stage_displacement(traj, last, names)
        return out

    def _averaged(self, traj: Trajectory, counts: dict[str, int]) -> dict[str, Offsets]:
        """The mean of the replicas' offsets (each stored, or computed and stored); the work
        counts are the replicas' together."""
        replicas = [
            stored_embeddings(self.replica(i), traj)[0] for i in range(self.arguments.replicas)
        ]
        for replica in replicas:
            for key, value in replica.counts.items():
                counts[key] = counts.get(key, 0) + value
        return {
            stage: {n: sum(r.offsets[stage][n] for r in replicas) / len(replicas) for n in offset}
            for stage, offset in replicas[0].offsets.items()
        }


def allocate(sizes: Sequence[int], weights: Sequence[float], total: int) -> list[int]:
    """Integer example counts n_t <= sizes[t] summing to ``total`` (at most ``sum(sizes)``):
    ``n_t = min(B_t, c * w_t)`` with c found by water-filling, then rounded by largest remainder
    (ties to the earlier step). ``total >= sum(sizes)`` gives every step its whole batch; a
    step of weight 0 gets nothing unless every positive-weight step is full."""
    sizes_a = np.asarray(sizes, dtype=np.int64)
    weights_a = np.asarray(weights, dtype=np.float64)
    if total >= int(sizes_a.sum()):
        return sizes_a.tolist()
    positive = weights_a > 0
    if total >= int(sizes_a[positive].sum()):
        counts = np.where(positive, sizes_a, 0)
        rest = total - int(counts.sum())
        for t in np.flatnonzero(~positive):
            take = min(rest, int(sizes_a[t]))
            counts[t], rest = take, rest - take
        return counts.tolist()
    target = np.zeros(len(sizes_a))
    order = sorted(np.flatnonzero(positive), key=lambda t: sizes_a[t] / weights_a[t])
    full, weight = 0.0, float(weights_a[positive].sum())
    for i, t in enumerate(order):
        level = (total - full) / weight
        if level * weights_a[t] < sizes_a[t]:  # no further step is saturated
            for u in order[i:]:
                target[u] = level * weights_a[u]
            break
        target[t], full, weight = sizes_a[t], full + sizes_a[t], weight - weights_a[t]
    counts = np.minimum(np.floor(target).astype(np.int64), sizes_a)
    remainder = target - counts
    rest = total - int(counts.sum())
    for t in sorted(range(len(counts)), key=lambda t: (-remainder[t], t)):
        if rest <= 0:
            break
        if counts[t] < sizes_a[t] and weights_a[t] > 0:
            counts[t], rest = counts[t] + 1, rest - 1
    return counts.tolist()


def step_weights(steps: StepLog, allocation: str) -> list[float]:
    """Each step's share weight: ``sqrt`` of its learning rate (mean over parameter groups), or
    its batch size (``uniform``)."""
    if allocation == "uniform":
        return (steps.offsets[1:] - steps.offsets[:-1]).double().tolist()
    return steps.lr.mean(1).clamp(min=0).sqrt().tolist()


def subset_schedule(
    later: Sequence[tuple[StageRecord, StepLog]], arguments: SubsetArguments, k: int
) -> list[tuple[StageRecord, StepLog]]:
    """The later stages with each step's batch cut to its allotted random subset (positions
    drawn without replacement, seeded by ``(seed, k)``, kept in recorded order) and steps
    allotted nothing dropped; learning rates stay those of the recorded steps."""
    sizes = [int(b) for _, s in later for b in (s.offsets[1:] - s.offsets[:-1]).tolist()]
    weights = [w for _, s in later for w in step_weights(s, arguments.allocation)]
    total = round(arguments.budget * sum(sizes))
    counts = iter(allocate(sizes, weights, total))
    rng = np.random.default_rng([arguments.seed, k])
    out = []
    for record, steps in later:
        kept, batches = [], []
        for t in range(steps.num_steps):
            n, batch = next(counts), steps.batch(t)
            if n == 0:
                continue
            if n < len(batch):
                chosen = np.sort(rng.choice(len(batch), size=n, replace=False))
                batch = batch[torch.from_numpy(chosen)]
            kept.append(t)
            batches.append(batch)
        sizes_t = torch.tensor([0, *(len(b) for b in batches)], dtype=torch.int64)
        indices = torch.cat(batches) if batches else steps.indices[:0]
        log = StepLog(steps.lr[kept], sizes_t.cumsum(0), indices)
        out.append((dataclasses.replace(record, num_steps=len(kept)), log))
    return out
