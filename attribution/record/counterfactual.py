"""Ground truth: the final parameters had stage k never run, by actually retraining.

Skipping stage k removes its training steps and its re-initialisations: stage k+1 starts from the
parameters that entered stage k (its ``start`` checkpoint, in which adapters stage k added sit at
their function-preserving initial values) and stages k+1..K run with their recorded batches,
learning rates, hyperparameters and entry actions. Under the ``carry`` policy stage k+1 receives
the optimizer state that existed when stage k began (stage k-1's final state). This equals the
run declared without stage k. Results are stored in the trajectory's cache (by default the run
itself) in ``counterfactuals/skip-<stage>/`` and reused while the recorded run is unchanged; two
processes asking for the same one compute it once (the second waits, then reuses it).

``skip_stage_shuffled`` retrains the same way except that each later stage's recorded examples
are reshuffled across its steps (seeded): another draw of the later batch order, for the noise
ceiling of ``attribution.analysis.validate`` (how much the per-example effect of skipping a
stage depends on the exact later batches). Stored in ``counterfactuals/skip-<stage>-order-<seed>/``.

``skip_stages`` and ``skip_stages_shuffled`` run several of them; under torchrun they are shared
out among the ranks (``attribution.record.distributed``, docs/scale.md).

Retraining runs on the device of ``attribution.record.compute.current()`` (the GPU under the
default ``auto`` where there is one) and is stored as CPU tensors of the recorded dtype, with
the device and dtype in ``meta.json``: a stored result serves every device. Under a bfloat16
compute the retraining runs in bfloat16: an approximation of the truth, stored apart in
``counterfactuals/skip-<stage>-bfloat16/`` so that it never stands in for the exact one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from attribution.record import distributed
from attribution.record.artifacts import artifact_lock, load_artifact, save_artifact
from attribution.record.compute import current
from attribution.record.errors import StagetraceError, TrajectoryError
from attribution.record.optim import OptimizerState
from attribution.record.pipeline import (
    StepCallback,
    add_adapters,
    continue_stage,
    recorded_threads,
)
from attribution.record.store import DiskStore
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
    return _stored_or_computed(traj, k, folder_of(traj, k), on_step)


def skip_stage_shuffled(
    traj: Trajectory, stage: str | int, seed: int, on_step: StepCallback | None = None
) -> Counterfactual:
    """Retrain without ``stage`` as ``skip_stage`` does, but with every later stage j's recorded
    examples reshuffled across its steps (``shuffled_order``: the same examples, learning rates
    and batch sizes, another order), or reuse the result stored for this ``seed``. Two seeds
    give two draws of the later batch order; the last stage has no later stage, so there it
    equals ``skip_stage``."""
    k = check_skippable(traj, stage)
    folder = folder_of(traj, k, seed)
    later = [
        (traj.stages[j], shuffled_order(traj.steps(j), seed, j))
        for j in range(k + 1, len(traj.stages))
    ]
    return _stored_or_computed(traj, k, folder, on_step, later, {"order_seed": seed})


def skip_stages(
    traj: Trajectory, stages: Sequence[str | int] | None = None
) -> dict[str, Counterfactual]:
    """``skip_stage`` for each of ``stages`` (default: every stage), by stage name. Under a
    process group (torchrun, ``attribution.record.distributed``) the retrainings are shared out
    round-robin among the ranks, each computed once by its rank, and every rank gets every
    result: read back from a cache on disk, or broadcast and kept in its memory cache (so a
    later ``skip_stage`` of any rank reuses it). One process runs them one after another."""
    done = _shared(traj, [(k, None) for k in _indices(traj, stages)])
    return {traj.stages[k].name: cf for (k, _), cf in done.items()}


def skip_stages_shuffled(
    traj: Trajectory, seeds: Sequence[int], stages: Sequence[str | int] | None = None
) -> dict[tuple[str, int], Counterfactual]:
    """``skip_stage_shuffled`` for each of ``stages`` (default: every stage) and ``seeds``, by
    (stage name, seed), shared out among the ranks as ``skip_stages`` does."""
    indices = _indices(traj, stages)
    done = _shared(traj, [(k, seed) for k in indices for seed in seeds])
    return {(traj.stages[k].name, seed): done[(k, seed)] for k in indices for seed in seeds}


def _indices(traj: Trajectory, stages: Sequence[str | int] | None) -> list[int]:
    """The indices of ``stages`` (default: all), each once, in the order given; under torchrun
    the ranks agree on them before anything else."""
    if stages is None:
        return list(range(len(traj.stages)))
    return distributed.agreed(lambda: list(dict.fromkeys(traj.index(s) for s in stages)))


def folder_of(traj: Trajectory, k: int, order_seed: int | None = None) -> str:
    """The cache folder of the retraining without stage k (under later batch order
    ``order_seed``; None: as recorded), with ``-bfloat16`` for a bfloat16 retraining
    (``Compute.cache_suffix``)."""
    name = traj.stages[k].name
    order = "" if order_seed is None else f"-order-{order_seed}"
    return f"counterfactuals/skip-{name}{order}{current().cache_suffix}"


Job = tuple[int, int | None]
"""A retraining: the stage skipped and the later batch order's seed (None: as recorded)."""


def _shared(traj: Trajectory, jobs: list[Job]) -> dict[Job, Counterfactual]:
    """Every job's counterfactual on every rank, each computed (or found stored) by its owner,
    rank ``i % size`` of job i. Every job is checked on every rank before anything is computed;
    ranks agree on success before each collective (``distributed.agreed``)."""

    def one(job: Job) -> Counterfactual:
        k, seed = job
        return skip_stage(traj, k) if seed is None else skip_stage_shuffled(traj, k, seed)

    at = distributed.world()
    if at.size == 1:
        return {job: one(job) for job in jobs}

    def mine() -> dict[Job, Counterfactual]:
        for k, _ in jobs:
            check_skippable(traj, k)
            for j in range(k + 1, len(traj.stages)):
                traj.check_replayable(j)
        return {job: one(job) for job in distributed.shard(jobs)}

    computed = distributed.agreed(mine)
    owners = {job: i % at.size for i, job in enumerate(jobs)}
    costs: dict[Job, tuple[float, bool]] = {}  # the owner's seconds and whether it reused
    for part in distributed.all_gather({j: (c.seconds, c.reused) for j, c in computed.items()}):
        costs.update(part)
    if isinstance(traj.cache, DiskStore):  # stored by the owners: read back (all_gather synced)
        states = distributed.agreed(
            lambda: {j: computed[j].state if j in computed else one(j).state for j in jobs}
        )
    else:  # in memory: the owner broadcasts it, the others keep it in their memory cache
        states = {}
        for job in jobs:
            states[job] = distributed.broadcast_state(
                computed[job].state if job in computed else None, owners[job]
            )
            if job not in computed:
                k, seed = job
                extra = {} if seed is None else {"order_seed": seed}
                meta = _meta(traj, k, costs[job][0], extra)
                save_artifact(
                    traj, folder_of(traj, k, seed), FINAL, SCHEMA, SCHEMA_VERSION, states[job], meta
                )
    return {job: Counterfactual(traj.stages[job[0]].name, states[job], *costs[job]) for job in jobs}


def shuffled_order(steps: StepLog, seed: int, j: int) -> StepLog:
    """``steps`` with its batch indices permuted across the steps (batch sizes and learning
    rates kept), by a generator seeded with ``1_000_003 * seed + j`` (stage j's own draw)."""
    generator = torch.Generator().manual_seed(1_000_003 * seed + j)
    order = torch.randperm(len(steps.indices), generator=generator)
    return StepLog(steps.lr, steps.offsets, steps.indices[order])


def _stored_or_computed(
    traj: Trajectory,
    k: int,
    folder: str,
    on_step: StepCallback | None,
    later: Sequence[tuple[StageRecord, StepLog]] | None = None,
    meta: dict[str, Any] | None = None,
) -> Counterfactual:
    """The retraining after skipping k stored in ``folder``, or computed (``later`` replacing
    the recorded later stages) and stored there. While computing it holds the result's lock, so
    that another process asking for the same result waits and then reuses it."""
    name = traj.stages[k].name
    stored = load_artifact(traj, folder, FINAL, SCHEMA, SCHEMA_VERSION)
    if stored is None:
        for j in range(k + 1, len(traj.stages)):
            traj.check_replayable(j)  # refuse before the lock creates anything
        with artifact_lock(traj, folder):
            # another process may have stored it while this one waited for the lock
            stored = load_artifact(traj, folder, FINAL, SCHEMA, SCHEMA_VERSION)
            if stored is None:
                return _compute(traj, k, folder, on_step, later, meta or {})
    return Counterfactual(name, stored.tensors, float(stored.meta["seconds"]), reused=True)


def _compute(
    traj: Trajectory,
    k: int,
    folder: str,
    on_step: StepCallback | None,
    later: Sequence[tuple[StageRecord, StepLog]] | None,
    extra: dict[str, Any],
) -> Counterfactual:
    name = traj.stages[k].name
    began = time.perf_counter()
    skipped_state = traj.optimizer_state(k - 1, "end") if k else {}
    state = retrain_after(traj, k, traj.checkpoint(k, "start"), skipped_state, on_step, later)
    seconds = time.perf_counter() - began
    save_artifact(
        traj, folder, FINAL, SCHEMA, SCHEMA_VERSION, state, _meta(traj, k, seconds, extra)
    )
    return Counterfactual(name, state, seconds, reused=False)


def _meta(traj: Trajectory, k: int, seconds: float, extra: dict[str, Any]) -> dict[str, Any]:
    """What ``meta.json`` says of the retraining after skipping k (besides the schema)."""
    retrained = traj.stages[k + 1 :]
    return {
        "skipped_stage": traj.stages[k].name,
        "retrained_stages": [r.name for r in retrained],
        "retrained_steps": sum(r.num_steps for r in retrained),
        "seconds": seconds,
        "device": str(current().torch_device),
        "training_dtype": "recorded" if current().training_dtype is None else current().dtype,
        **extra,
    }


def retrain_after(
    traj: Trajectory,
    k: int,
    state: dict[str, torch.Tensor],
    optimizer_state: OptimizerState,
    on_step: StepCallback | None = None,
    later: Sequence[tuple[StageRecord, StepLog]] | None = None,
    merge: int = 1,
) -> dict[str, torch.Tensor]:
    """Final parameters and buffers from running stages k+1..K as recorded, starting from
    ``state`` (in stage k's structure) and ``optimizer_state`` (the state in hand after k).

    ``later`` replaces the recorded (record, steps) of those stages, e.g. with a coarser
    schedule, and ``merge`` > 1 lets consecutive steps share a gradient (``train_stage``); by
    default they run exactly as recorded, with the recorded thread count
    (``recorded_threads``), on the current compute (``train_stage``); the result is on the CPU
    in the recorded dtype. Stages k+1..K known not to replay (``Trajectory.check_replayable``)
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
            optimizer_state = continue_stage(
                model, record, steps, optimizer_state, on_step, merge=merge
            )
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
