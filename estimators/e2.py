"""E2, exact first-order propagation: linearised training through every later step.

One training step is the pure function ``(theta', s') = step(theta, s, grad L(theta; batch_t),
lr_t)`` (``estimators.functional``, equal to torch.optim). An offset ``(dtheta, ds)`` entering a
later stage is carried by the Jacobian of that step, computed by ``torch.func.jvp`` through the
step itself, so it contains the loss Hessian-vector product and, for Adam, the moments. One
replay of the later stages carries the offsets of every earlier stage at once, stacked: the
gradient's jvp under ``vmap`` over the offsets (one primal forward and backward for all) and the
optimizer update's derivative written out on the stack (``StepRule.tangent``). This is the
exact first-order answer, not a cheap one: it costs a replay of the later stages plus a batched
forward-over-reverse product per step (docs/scale.md, "Estimator cost"), and first order is only
as good as the linearisation over a whole stage's offset (docs/estimators.md).

``adjoint_effects`` is the backward form for a single behaviour: it pulls ``grad f(theta_T)``
back through the steps' vector-Jacobian products and pays per behaviour instead of per stage.

Approximations: optimizer state whose structure differs between the two worlds (an entry that
exists in one and not the other when a skipped stage changes what ``carry`` hands over) is
linearised around the recorded world with a zero offset; the Adam step count carries no offset.
Trainable parameters that receive no gradient are updated as if their gradient were zero.

Device: the replays and tangents run on the current compute's device (``estimators.stages``),
in the recorded precision whatever the compute's dtype (E2 differentiates the recorded
computation, it does not retrain: ``trains`` is False, its embeddings are shared by every
dtype); the embeddings come back as float64 CPU tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch.func import jvp, vmap

from attribution.record.compute import current, to_cpu
from attribution.record.trajectory import Trajectory
from estimators.base import EVIDENCE, Estimator, Offsets, final_parameter_names, stage_displacement
from estimators.functional import Params, State
from estimators.stages import TrainingStart, adjoints, handed_state


class E2(Estimator):
    name = "e2"
    version = 3  # offsets batched through a written-out optimizer tangent (round-off changes)
    requires = frozenset(EVIDENCE)
    trains = False

    def offsets(self, traj: Trajectory, counts: dict[str, int]) -> dict[str, Offsets]:
        return propagate(traj, counts, batched=True)


def propagate(traj: Trajectory, counts: dict[str, int], batched: bool = True) -> dict[str, Offsets]:
    """E2's embeddings: every earlier stage's offset carried through each later stage.

    ``batched``: one step's forward and backward shared by every offset in flight (``vmap``
    over the offsets of the jvp of the gradient, and the optimizer update written out on the
    stacked offsets, ``StepRule.tangent``); otherwise one jvp per offset and step, the
    per-stage reference. A model that ``vmap`` cannot run (random operations in its forward)
    falls back to the per-offset jvps, counted as ``unbatched_steps``."""
    names, device = final_parameter_names(traj), current().torch_device
    carried: dict[str, tuple[Params, State]] = {}  # skipped stage -> offsets in flight
    for j in range(1, len(traj.stages)):
        k = j - 1
        carried[traj.stages[k].name] = (
            stage_displacement(traj, k, names, device=device),
            handed_state(traj, k, device),
        )
        stage = TrainingStart.of(traj, j)
        live = {s: stage.enter(dtheta, ds) for s, (dtheta, ds) in carried.items()}
        tangents = _stack(list(live.values()))
        params, state = stage.params, stage.state
        for t, inputs, targets, lrs in stage.batches():
            grads, grad_tangents = _gradient_tangents(
                stage, params, inputs, targets, tangents[0], batched, counts
            )
            batched = batched and not counts.get("unbatched_steps")  # once refused, for good
            fresh = stage.fresh_at(t)
            after = stage.rule.step(params, state, grads, lrs, fresh)
            tangents = stage.rule.tangent(
                params, grads, lrs, fresh, after[1], tangents, grad_tangents
            )
            params, state = after
            counts["jvp_steps"] = counts.get("jvp_steps", 0) + 1
            counts["tangent_steps"] = counts.get("tangent_steps", 0) + len(live)
        carried = dict(zip(live, _unstack(tangents, len(live)), strict=True))
    last = len(traj.stages) - 1
    out = {
        s: to_cpu({n: v.double() for n, v in dtheta.items()}) for s, (dtheta, _) in carried.items()
    }
    out[traj.stages[last].name] = to_cpu(stage_displacement(traj, last, names, device=device))
    return out


def _gradient_tangents(
    stage: TrainingStart,
    params: Params,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    tangents: Params,
    batched: bool,
    counts: dict[str, int],
) -> tuple[Params, Params]:
    """The loss gradient at ``params`` and its jvp along each stacked parameter tangent
    (forward-over-reverse: the loss Hessian times the tangent), the forward and backward
    shared by every tangent when ``batched``."""

    def gradient(point: Params) -> Params:
        return stage.gradient(point, inputs, targets)

    if batched:
        try:
            return vmap(lambda d: jvp(gradient, (params,), (d,)), out_dims=(None, 0))(tangents)
        except RuntimeError as error:  # vmap refuses random operations (dropout)
            if "vmap" not in str(error):
                raise
    counts["unbatched_steps"] = counts.get("unbatched_steps", 0) + 1
    rows = next(iter(tangents.values())).shape[0]
    parts = [
        jvp(gradient, (params,), ({n: v[i] for n, v in tangents.items()},)) for i in range(rows)
    ]
    return parts[0][0], {n: torch.stack([d[n] for _, d in parts]) for n in parts[0][1]}


def adjoint_effects(
    traj: Trajectory, behaviour: Callable[[Params], torch.Tensor]
) -> dict[str, float]:
    """Linear read-out of E2 for one scalar behaviour, by pulling its gradient back through
    every later step (vjp): effect_k = -<adjoint at stage k's end, (delta_k, ds_k)>.

    ``behaviour`` maps the final parameters (dict, on the CPU as recorded) to a 0-dim tensor;
    the pass runs on the current compute's device (``estimators.stages.adjoints``).
    """
    names, device = final_parameter_names(traj), current().torch_device
    effects = {}
    for k, adjoint, adjoint_state in adjoints(traj, behaviour, counts={}):
        state_offset = handed_state(traj, k, device)  # meets an empty adjoint unless k+1 carries
        effects[traj.stages[k].name] = -(
            _dot(adjoint, stage_displacement(traj, k, names, device=device))
            + sum(_dot(adjoint_state.get(n, {}), slots) for n, slots in state_offset.items())
        )
    return effects


def _dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return float(sum((a[n].double() * b[n].double()).sum() for n in a.keys() & b.keys()))


def _stack(items: list[tuple[Params, State]]) -> tuple[Params, State]:
    """Tangents of several stages as one batch (leading dimension: stage)."""
    params = {n: torch.stack([p[n] for p, _ in items]) for n in items[0][0]}
    state = {
        n: {s: torch.stack([st[n][s] for _, st in items]) for s in slots}
        for n, slots in items[0][1].items()
    }
    return params, state


def _unstack(stacked: tuple[Params, State], count: int) -> list[tuple[Params, State]]:
    params, state = stacked
    return [
        (
            {n: v[i] for n, v in params.items()},
            {n: {s: v[i] for s, v in slots.items()} for n, slots in state.items()},
        )
        for i in range(count)
    ]
