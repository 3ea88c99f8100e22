"""E2, exact first-order propagation: linearised training through every later step.

One training step is the pure function ``(theta', s') = step(theta, s, grad L(theta; batch_t),
lr_t)`` (``estimators.functional``, equal to torch.optim). An offset ``(dtheta, ds)`` entering a
later stage is carried by the Jacobian of that step, computed by ``torch.func.jvp`` through the
step itself, so it contains the loss Hessian-vector product and, for Adam, the moments. One
replay of the later stages carries the offsets of every earlier stage at once (``vmap`` over the
tangents). This is the exact first-order answer, not a cheap one: it costs a replay of the later
stages plus a batched forward-over-reverse product per step, and first order is only as good as
the linearisation over a whole stage's offset (DESIGN.md section 2, E4).

``adjoint_effects`` is the backward form for a single behaviour: it pulls ``grad f(theta_T)``
back through the steps' vector-Jacobian products and pays per behaviour instead of per stage.

Approximations: optimizer state whose structure differs between the two worlds (an entry that
exists in one and not the other when a skipped stage changes what ``carry`` hands over) is
linearised around the recorded world with a zero offset; the Adam step count carries no offset.
Trainable parameters that receive no gradient are updated as if their gradient were zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from attribution.record.pipeline import carried_state, reinitialise
from attribution.record.references import load_dataset, loss_function
from attribution.record.trajectory import StageRecord, StepLog, Trajectory
from estimators.base import (
    EVIDENCE,
    Estimator,
    Offsets,
    final_parameter_names,
    reinitialised,
    stage_displacement,
)
from estimators.functional import Params, State, StepRule, step_lrs

Step = Callable[[Params, State], tuple[Params, State]]


class E2(Estimator):
    name = "e2"
    requires = frozenset(EVIDENCE)

    def offsets(self, traj: Trajectory, counts: dict[str, int]) -> dict[str, Offsets]:
        names = final_parameter_names(traj)
        carried: dict[str, tuple[Params, State]] = {}  # skipped stage -> offsets in flight
        for j in range(1, len(traj.stages)):
            k = j - 1
            carried[traj.stages[k].name] = (
                stage_displacement(traj, k, names),
                handed_state(traj, k),
            )
            stage = TrainingStart.of(traj, j)
            live = {s: stage.enter(dtheta, ds) for s, (dtheta, ds) in carried.items()}
            stacked = _stack(list(live.values()))
            params, state = stage.params, stage.state
            for step in stage.steps():
                (params, state), stacked = _batched_jvp(step, params, state, stacked)
                counts["jvp_steps"] = counts.get("jvp_steps", 0) + 1
                counts["tangent_steps"] = counts.get("tangent_steps", 0) + len(live)
            carried = dict(zip(live, _unstack(stacked, len(live)), strict=True))
        last = len(traj.stages) - 1
        out = {s: {n: v.double() for n, v in dtheta.items()} for s, (dtheta, _) in carried.items()}
        out[traj.stages[last].name] = stage_displacement(traj, last, names)
        return out


def handed_state(traj: Trajectory, k: int) -> State:
    """Offset of the optimizer state in hand after stage k when k is skipped: the state that
    existed when stage k began minus the state at its end (entries missing in one world are
    taken as zero there)."""
    factual = traj.optimizer_state(k, "end")
    skipped = traj.optimizer_state(k - 1, "end") if k else {}
    out: State = {}
    for name, slots in factual.items():
        other = skipped.get(name, {})
        out[name] = {
            slot: (other[slot] if slot in other else torch.zeros_like(v)) - v
            for slot, v in slots.items()
            if slot != "step"
        }
    return out


@dataclass
class TrainingStart:
    """Stage j as it starts training in the recorded run: model (as a function), parameters
    after its entry actions, complete optimizer state, and its recorded steps."""

    traj: Trajectory
    j: int
    model: nn.Module
    record: StageRecord
    rule: StepRule
    params: Params
    state: State
    fresh: frozenset[str]
    fresh_params: frozenset[str]

    @classmethod
    def of(cls, traj: Trajectory, j: int) -> TrainingStart:
        record = traj.stages[j]
        model = traj.load_model(j, "start")
        reinitialise(model, record.entry, record.name)
        params = {n: p.detach() for n, p in model.named_parameters()}
        recorded = traj.optimizer_state(j, "start")
        rule = StepRule.from_record(record)
        return cls(
            traj,
            j,
            model,
            record,
            rule,
            params,
            rule.init_state(params, recorded),
            rule.fresh(recorded),
            frozenset(reinitialised(traj, j)),
        )

    def enter(self, dtheta: Params, ds: State) -> tuple[Params, State]:
        """Offsets entering the stage: re-initialised and new parameters restart at offset 0;
        the state offset follows the stage's optimizer policy (zero under reset)."""
        tangent = {
            n: torch.zeros_like(p)
            if n in self.fresh_params or n not in dtheta
            else dtheta[n].to(p.dtype)
            for n, p in self.params.items()
        }
        handed = carried_state(ds, self.record, self.model)
        tangent_state = {
            n: {
                s: handed.get(n, {}).get(s, torch.zeros_like(v)).to(v.dtype)
                if s != "step"
                else torch.zeros_like(v)
                for s, v in slots.items()
            }
            for n, slots in self.state.items()
        }
        return tangent, tangent_state

    def steps(self) -> Iterator[Step]:
        """Each recorded step as a pure function of (params, state)."""
        log: StepLog = self.traj.steps(self.j)
        inputs, targets = load_dataset(self.record.data).tensors[:2]
        loss = loss_function(self.record.loss)
        trained = list(self.rule.hyper)
        for t in range(log.num_steps):
            batch = log.batch(t)
            x, y = inputs[batch], targets[batch]
            lrs = step_lrs(self.record, log, t)
            fresh = self.fresh if t == 0 else frozenset()

            def step(params: Params, state: State, x=x, y=y, lrs=lrs, fresh=fresh):
                def training_loss(part: Params) -> torch.Tensor:
                    return loss(functional_call(self.model, {**params, **part}, (x,)), y)

                grads = grad(training_loss)({n: params[n] for n in trained})
                return self.rule.step(params, state, grads, lrs, fresh)

            yield step


def adjoint_effects(
    traj: Trajectory, behaviour: Callable[[Params], torch.Tensor]
) -> dict[str, float]:
    """Linear read-out of E2 for one scalar behaviour, by pulling its gradient back through
    every later step (vjp): effect_k = -<adjoint at stage k's end, (delta_k, ds_k)>.

    ``behaviour`` maps the final parameters (dict) to a 0-dim tensor.
    """
    last = len(traj.stages) - 1
    names = final_parameter_names(traj)
    final = {n: v for n, v in traj.checkpoint(last, "end").items() if n in names}
    adjoint = grad(behaviour)(final)
    adjoint_state: State = {}
    effects = {traj.stages[last].name: -_dot(adjoint, stage_displacement(traj, last, names))}
    for j in range(last, 0, -1):
        stage = TrainingStart.of(traj, j)
        adjoint_state = {
            n: {s: adjoint_state.get(n, {}).get(s, torch.zeros_like(v)) for s, v in slots.items()}
            for n, slots in stage.state.items()
        }
        adjoint = {n: adjoint.get(n, torch.zeros_like(p)) for n, p in stage.params.items()}
        params, state, pullbacks = stage.params, stage.state, []
        for step in stage.steps():
            (params, state), pullback = vjp(step, params, state)
            pullbacks.append(pullback)
        # vjp wants the cotangents' dicts in the order of the step's outputs (state read back
        # from disk may hold its slots in another order).
        adjoint = {n: adjoint[n] for n in params}
        adjoint_state = {n: {s: adjoint_state[n][s] for s in slots} for n, slots in state.items()}
        for pullback in reversed(pullbacks):
            adjoint, adjoint_state = pullback((adjoint, adjoint_state))
        adjoint, handed = across_entry(stage, adjoint, adjoint_state)
        k = j - 1
        state_offset = handed_state(traj, k)
        effects[traj.stages[k].name] = -(
            _dot(adjoint, stage_displacement(traj, k, names))
            + sum(_dot(handed.get(n, {}), slots) for n, slots in state_offset.items())
        )
        adjoint_state = handed
    return effects


def across_entry(
    stage: TrainingStart, adjoint: Params, adjoint_state: State
) -> tuple[Params, State]:
    """Adjoints at a stage's training start -> adjoints at the previous stage's end: re-initialised
    and newly added parameters drop out (their values did not come from earlier), and the state
    adjoint passes back only under the ``carry`` policy (step counts carry no adjoint)."""
    adjoint = {n: v for n, v in adjoint.items() if n not in stage.fresh_params}
    if stage.record.optimizer_policy != "carry":
        return adjoint, {}
    slots = {n: {s: v for s, v in sl.items() if s != "step"} for n, sl in adjoint_state.items()}
    return adjoint, carried_state(slots, stage.record, stage.model)


def _dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return float(sum((a[n].double() * b[n].double()).sum() for n in a.keys() & b.keys()))


def _batched_jvp(
    step: Step, params: Params, state: State, tangents: tuple[Params, State]
) -> tuple[tuple[Params, State], tuple[Params, State]]:
    def one(dtheta: Params, ds: State) -> tuple:
        return jvp(step, (params, state), (dtheta, ds))

    (new_params, new_state), new_tangents = vmap(one, out_dims=(None, 0))(*tangents)
    return (new_params, new_state), new_tangents


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
