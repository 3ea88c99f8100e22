"""Stage TracIn, a baseline: a stage's effect as the first-order change along its own path.

    effect_k(f) ~= sum_c <grad f(theta_c), Delta_c>,    Delta_c = -m_c * g_c

summed over the recorded checkpoints c of stage k: its state before step 0 (``start`` with the
stage's ``reinit`` actions applied) and the inner checkpoints saved with ``checkpoint_every``.
``g_c`` is the gradient of the stage's training loss on the recorded batch of step c at
``theta_c``; ``m_c``, per parameter group, is that group's learning-rate mass over the steps c
stands for, ``[c, next checkpoint)``; frozen parameters do not move. The stage moved theta by
``Delta_c``, so with the project's sign convention, effect_k(f) = f(theta_T) - f(theta_T^(-k)),
the estimate is ``+<grad f, Delta_c>``: a stage that lowered a loss gets a negative effect.

It is a baseline, not an estimator to rely on: it takes every step as plain SGD (no momentum,
weight decay or Adam preconditioning), misses the jump of re-initialisations and the drift of
the gradient between checkpoints, and ignores everything later stages did. With plain SGD, every
step checkpointed and f linear in theta it equals f(end) - f(state after entry) exactly.

The gradient of the training loss is taken as training took it (train mode); ``grad f`` is the
one evaluator's (``attribution.record.evaluation``: eval mode, the checkpoint's buffers).

Cost per stage and checkpoint: one gradient of the training loss on one batch, and one
forward-mode jvp of the per-example quantities per batch of examples (never an N x p matrix).

Both run on the current compute's device: the gradient in the model's own precision, the jvp as
every read-out does (``ModelAt.placed``: in bfloat16 under a bfloat16 compute). States are loaded
and entry actions applied on the CPU (the recorded generator), and the effects come back as
float64 CPU tensors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attribution.record.compute import current
from attribution.record.errors import StagetraceError
from attribution.record.evaluation import ModelAt, directional
from attribution.record.pipeline import fetch_batch, reinitialise
from attribution.record.references import load_dataset, loss_function
from attribution.record.trajectory import StageRecord, StepLog, Trajectory, load_state, snapshot


@dataclass(frozen=True)
class TracInResult:
    """Per stage: [N] float64 per-example effects and the number of checkpoints summed over;
    ``seconds``: wall time of the whole computation."""

    effects: dict[str, Tensor]
    checkpoints: dict[str, int]
    seconds: float


def tracin_effects(
    traj: Trajectory, inputs: Tensor, targets: Tensor, quantity: str, batch_size: int = 512
) -> dict[str, Tensor]:
    """Stage name -> [N] float64 stage-TracIn effects of the per-example ``quantity``
    (``loss`` in nats or ``margin`` in logits), in the units and sign of the read-outs."""
    return stage_tracin(traj, inputs, targets, quantity, batch_size).effects


def stage_tracin(
    traj: Trajectory, inputs: Tensor, targets: Tensor, quantity: str, batch_size: int = 512
) -> TracInResult:
    """``tracin_effects`` with the checkpoints used per stage and the seconds taken."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise StagetraceError(
            f"batch_size {batch_size!r} is not a positive integer. Fix: give the number of "
            "examples per jvp, e.g. 512"
        )
    if not len(targets):
        raise StagetraceError("stage TracIn got no examples. Fix: pass at least one example")
    began = time.perf_counter()
    device = current().torch_device
    effects, used = {}, {}
    for k, record in enumerate(traj.stages):
        log = traj.steps(k)
        if not log.has_batch_order:
            raise StagetraceError(
                f"stage TracIn needs the batch of every step, and stage {record.name!r} recorded "
                "none. Fix: record the stage with stage.log_batch(indices) before every step"
            )
        model, evaluator = traj.build_model(k), traj.build_model(k)
        starts = [0, *traj.inner_steps(k)]
        total = torch.zeros(len(targets), dtype=torch.float64)
        for c, stop in zip(starts, [*starts[1:], log.num_steps], strict=True):
            _load_state_before(model, traj, k, c)
            at = ModelAt.of(evaluator, snapshot(model))  # before training mode moves buffers
            movement = _movement(model, record, log, c, stop, device)
            total += directional(at, movement, inputs, targets, quantity, batch_size)
        effects[record.name] = total
        used[record.name] = len(starts)
    return TracInResult(effects, used, time.perf_counter() - began)


def _load_state_before(model: nn.Module, traj: Trajectory, k: int, t: int) -> None:
    """Put the parameters and buffers that stage k's step t started from into ``model``."""
    name = traj.stages[k].name
    if t == 0:
        load_state(model, traj.checkpoint(k, "start"), f"stage {name} start")
        reinitialise(model, traj.stages[k].entry, name)
    else:
        load_state(model, traj.inner_checkpoint(k, t), f"stage {name} before step {t}")


def _movement(
    model: nn.Module,
    record: StageRecord,
    log: StepLog,
    c: int,
    stop: int,
    device: torch.device,
) -> dict[str, Tensor]:
    """``Delta_c = -m_c * g_c`` per trainable parameter (on ``device``): the stage's loss
    gradient on step c's batch at the model's current state, times minus its group's summed
    rate over [c, stop). The model runs on ``device`` and is handed back on the CPU."""
    model.to(device)
    try:
        params = dict(model.named_parameters())
        trainable = set(record.trainable)
        for name, p in params.items():
            p.requires_grad_(name in trainable)
        batch = fetch_batch(load_dataset(record.data), log.batch(c))
        inputs, targets = (t.to(device) for t in batch)
        loss = loss_function(record.loss)(model(inputs), targets)
        names = list(record.trainable)
        grads = torch.autograd.grad(loss, [params[n] for n in names])
    finally:
        model.to("cpu")
    by_name = dict(zip(names, grads, strict=True))
    mass = log.lr[c:stop].sum(0).tolist()
    return {n: -m * by_name[n] for g, m in zip(record.groups, mass, strict=True) for n in g.params}
