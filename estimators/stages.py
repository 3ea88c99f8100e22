"""Stage machinery shared by the estimators that follow training step by step (E2, E3 and the
within-stage example scores): a later stage as it starts training, what a skipped stage hands
over, and the one reverse (adjoint) pass through a stage's recorded steps.

Adjoints follow the recorded world: re-initialised and newly added parameters take no adjoint
back across their stage's entry (their values did not come from earlier), and the optimizer
state's adjoint crosses a boundary only under the ``carry`` policy.

Device: a stage's steps run on the device of ``attribution.record.compute.current()`` (read
when ``TrainingStart.of`` builds the stage), in the recorded precision: the entry actions are
applied on the CPU first (they draw from the CPU generator, as in the recording), then the
module (parameters and buffers), the optimizer state and every batch are placed there. Adam's
step counts stay CPU scalars, as torch keeps them. Callers hand their results back on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp

from attribution.record.compute import current
from attribution.record.pipeline import carried_state, fetch_batch, reinitialise, reinitialised
from attribution.record.references import load_dataset, loss_function
from attribution.record.trajectory import StageRecord, StepLog, Trajectory
from estimators.base import final_parameter_names
from estimators.functional import Params, State, StepRule, step_lrs

Scorer = Callable[[int, Params, Tensor, Tensor, Params], None]
"""Called in the reverse pass with (step t, parameters before it, its batch's inputs and
targets, adjoint of its gradient g_t)."""


def handed_state(traj: Trajectory, k: int, device: torch.device | str = "cpu") -> State:
    """Offset (float64, on ``device``) of the optimizer state in hand after stage k when k is
    skipped: the state that existed when stage k began minus the state at its end (an entry
    missing in one world is zero there; step counts carry no offset). Whether stage k+1 receives
    it is its policy's business (``carried_state``)."""
    factual = traj.optimizer_state(k, "end")
    skipped = traj.optimizer_state(k - 1, "end") if k else {}
    out: State = {}
    for name, slots in factual.items():
        other = skipped.get(name, {})
        out[name] = {}
        for slot, v in slots.items():
            if slot == "step":
                continue
            end = v.to(device, torch.float64)
            before = other[slot].to(device, torch.float64) if slot in other else None
            out[name][slot] = (before if before is not None else torch.zeros_like(end)) - end
    return out


@dataclass
class TrainingStart:
    """Stage j as it starts training in the recorded run: model (as a function), parameters
    after its entry actions, complete optimizer state, and its recorded steps, all on
    ``device`` (the compute's when built by ``of``; step counts excepted, CPU scalars)."""

    traj: Trajectory
    j: int
    model: nn.Module
    record: StageRecord
    rule: StepRule
    params: Params
    state: State
    fresh: frozenset[str]
    fresh_params: frozenset[str]
    device: torch.device

    @classmethod
    def of(cls, traj: Trajectory, j: int) -> TrainingStart:
        """Stage j on the current compute's device, in the recorded precision. The entry
        actions run on the CPU, before anything moves (they draw from the CPU generator, as in
        the recording); then the module's parameters and buffers (``gradient`` calls it with
        the parameters only) and the recorded optimizer state move to the device."""
        device = current().torch_device
        record = traj.stages[j]
        model = traj.load_model(j, "start")
        fresh_params = frozenset(reinitialised(model, record))
        reinitialise(model, record.entry, record.name)
        model.to(device)
        params = {n: p.detach() for n, p in model.named_parameters()}
        recorded = traj.optimizer_state(j, "start")
        placed = {
            n: {s: v if s == "step" else v.to(device) for s, v in slots.items()}
            for n, slots in recorded.items()
        }
        rule = StepRule.from_record(record, [n for n, _ in model.named_parameters()])
        state = rule.init_state(params, placed)
        fresh = rule.fresh(recorded)
        return cls(traj, j, model, record, rule, params, state, fresh, fresh_params, device)

    def enter(self, dtheta: Params, ds: State) -> tuple[Params, State]:
        """Offsets entering the stage (moved to its device and dtype): re-initialised and new
        parameters restart at offset 0; the state offset follows the stage's optimizer policy
        (zero under reset)."""
        tangent = {
            n: torch.zeros_like(p)
            if n in self.fresh_params or n not in dtheta
            else dtheta[n].to(p.device, p.dtype)
            for n, p in self.params.items()
        }
        handed = carried_state(ds, self.record, self.model)
        tangent_state = {
            n: {
                s: handed.get(n, {}).get(s, torch.zeros_like(v)).to(v.device, v.dtype)
                if s != "step"
                else torch.zeros_like(v)
                for s, v in slots.items()
            }
            for n, slots in self.state.items()
        }
        return tangent, tangent_state

    def gradient(self, params: Params, inputs: Tensor, targets: Tensor) -> Params:
        """The stage's loss gradient on one batch, over the parameters it trains."""
        loss = loss_function(self.record.loss)

        def training_loss(part: Params) -> Tensor:
            return loss(functional_call(self.model, {**params, **part}, (inputs,)), targets)

        return grad(training_loss)({n: params[n] for n in self.rule.hyper})

    def fresh_at(self, t: int) -> frozenset[str]:
        """State entries the optimizer creates at step t (only at the stage's first step)."""
        return self.fresh if t == 0 else frozenset()

    def batches(self) -> Iterator[tuple[int, Tensor, Tensor, dict[str, float]]]:
        """Each recorded step's ``(t, inputs, targets, learning rates)``, the batch on the
        stage's device."""
        log: StepLog = self.traj.steps(self.j)
        dataset = load_dataset(self.record.data)
        for t in range(log.num_steps):
            yield t, *self.batch(dataset, log, t), step_lrs(self.record, log, t)

    def batch(self, dataset: Any, log: StepLog, t: int) -> tuple[Any, Any]:
        """Step t's recorded ``(inputs, targets)`` on the stage's device (dtypes kept: token
        ids stay integers)."""
        inputs, targets = fetch_batch(dataset, log.batch(t))
        return _placed(inputs, self.device), _placed(targets, self.device)

    def entering(self, adjoint: Params, adjoint_state: State) -> tuple[Params, State]:
        """Adjoints at the stage's end in its structure: zero for parameters and state entries
        the later world did not depend on."""
        params = {n: adjoint.get(n, torch.zeros_like(p)) for n, p in self.params.items()}
        state = {
            n: {s: adjoint_state.get(n, {}).get(s, torch.zeros_like(v)) for s, v in slots.items()}
            for n, slots in self.state.items()
        }
        return params, state

    def across_entry(self, adjoint: Params, adjoint_state: State) -> tuple[Params, State]:
        """Adjoints at the stage's training start -> adjoints at the previous stage's end:
        re-initialised and newly added parameters drop out, and the state adjoint passes back
        only under the ``carry`` policy (step counts carry no adjoint)."""
        adjoint = {n: v for n, v in adjoint.items() if n not in self.fresh_params}
        if self.record.optimizer_policy != "carry":
            return adjoint, {}
        slots = {n: {s: v for s, v in sl.items() if s != "step"} for n, sl in adjoint_state.items()}
        return adjoint, carried_state(slots, self.record, self.model)

    def pull_back(
        self,
        adjoint: Params,
        adjoint_state: State,
        counts: dict[str, int],
        score: Scorer | None = None,
    ) -> tuple[Params, State]:
        """Adjoints at the stage's end -> adjoints at its start (after its entry actions).

        A forward replay stores the trained parameters and the state before every step; the
        reverse pass recomputes each step's gradient with its vjp (the Hessian-vector product).
        ``score``, if given, sees every step's gradient adjoint (within-stage scores)."""
        adjoint, adjoint_state = self.entering(adjoint, adjoint_state)
        log = self.traj.steps(self.j)
        dataset = load_dataset(self.record.data)
        trained = list(self.rule.hyper)
        frozen = {n: p for n, p in self.params.items() if n not in self.rule.hyper}
        history: list[tuple[Params, State]] = []
        params, state = self.params, self.state
        for t in range(log.num_steps):
            history.append(({n: params[n] for n in trained}, state))
            batch = self.batch(dataset, log, t)
            lrs = step_lrs(self.record, log, t)
            params, state = self.rule.step(
                params, state, self.gradient(params, *batch), lrs, self.fresh_at(t)
            )
            counts["steps"] = counts.get("steps", 0) + 1
        # vjp needs the cotangents' dicts in the order of the step's outputs (Adam reorders
        # slots; state read from disk may hold them in another order; the parameters come out
        # frozen first, then trained).
        adjoint_state = {n: {s: adjoint_state[n][s] for s in slots} for n, slots in state.items()}
        for t in reversed(range(log.num_steps)):
            part, state = history.pop()
            params = {**frozen, **part}
            inputs, targets = self.batch(dataset, log, t)
            grads, grad_pullback = vjp(
                partial(self.gradient, inputs=inputs, targets=targets), params
            )
            step = partial(
                self.rule.step, lrs=step_lrs(self.record, log, t), fresh=self.fresh_at(t)
            )
            _, step_pullback = vjp(step, params, state, grads)
            ordered = {n: adjoint[n] for n in params}
            direct, adjoint_state, adjoint_g = step_pullback((ordered, adjoint_state))
            (curvature,) = grad_pullback(adjoint_g)
            counts["hvps"] = counts.get("hvps", 0) + 1
            if score is not None:
                score(t, params, inputs, targets, adjoint_g)
            adjoint = {n: direct[n] + curvature[n] for n in direct}
        return adjoint, adjoint_state


def adjoints(
    traj: Trajectory,
    behaviour: Callable[[Params], Tensor],
    counts: dict[str, int],
    down_to: int = 0,
) -> Iterator[tuple[int, Params, State]]:
    """The gradient of ``behaviour`` (a 0-dim function of the final parameters, buffers
    excluded) pulled back through the recorded steps: ``(k, adjoint, state adjoint)`` at the end
    of each stage k, from the last stage down to ``down_to``. The state adjoint is that of the
    optimizer state stage k hands on (empty under ``reset``).

    ``behaviour`` is called with the final parameters as recorded, on the CPU (where a caller's
    module and data are), and its gradient is placed on the current compute's device, where the
    pass runs; the adjoints come back there."""
    last = len(traj.stages) - 1
    names = set(final_parameter_names(traj))
    final = {n: v for n, v in traj.checkpoint(last, "end").items() if n in names}
    device = current().torch_device
    adjoint: Params = {n: v.to(device) for n, v in grad(behaviour)(final).items()}
    adjoint_state: State = {}
    yield last, adjoint, adjoint_state
    for j in range(last, down_to, -1):
        start = TrainingStart.of(traj, j)
        adjoint, adjoint_state = start.pull_back(adjoint, adjoint_state, counts)
        adjoint, adjoint_state = start.across_entry(adjoint, adjoint_state)
        yield j - 1, adjoint, adjoint_state


def _placed(x: Any, device: torch.device) -> Any:
    """A batch tensor on ``device`` (anything else, as it is)."""
    return x.to(device) if isinstance(x, Tensor) else x
