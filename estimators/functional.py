"""Pure functional optimizer steps that match ``torch.optim`` and work under ``torch.func``.

E2 (docs/estimators.md) carries a parameter offset through later stages with the Jacobian of the
training step. ``StepRule.step`` re-implements the single-tensor (CPU default) update of each
recorded optimizer (``sgd``, ``sgdw``, ``adam``, ``adamw``) with the same operations in the same
order, so its numbers equal ``torch.optim`` (``attribution.record.optim.SGDW`` for ``sgdw``)
to round-off.
It never modifies its inputs, calls ``.item()``/``.detach()`` or branches on tensor values, so
``torch.func.jvp``/``vjp``/``vmap`` work through it with respect to parameters, optimizer state
and gradients (forward-over-reverse included: the gradients may come from ``torch.func.grad``).

State uses torch's slot names: ``momentum_buffer`` (SGD/SGDW with momentum != 0), and ``step``
(0-dim float32, a count: give it a zero tangent), ``exp_avg``, ``exp_avg_sq`` (Adam/AdamW).
Torch creates an SGD momentum buffer on a parameter's first step as a copy of the gradient; here
the buffer always exists (zeros, from ``init_state``) so the state is a fixed pytree, and the
names whose buffer is new are passed to that first step as ``fresh``.

Replaying stage ``i`` of a trajectory (either optimizer policy: the record holds the state the
stage started from, empty under ``reset`` and the carried entries under ``carry``)::

    record, log = traj.stages[i], traj.steps(i)
    rule = StepRule.from_record(record, [n for n, _ in model.named_parameters()])
    recorded = traj.optimizer_state(i, "start")
    fresh = rule.fresh(recorded)
    state = rule.init_state(params, recorded)
    for t in range(log.num_steps):
        grads = grad_of_loss(params, batch_t)  # exactly the names in rule.hyper (trained)
        params, state = rule.step(
            params, state, grads, step_lrs(record, log, t), fresh if t == 0 else frozenset()
        )

``params`` must be the parameters after the stage's ``reinit`` entry actions (the ``start``
checkpoint is taken before them). One difference from torch: torch skips a parameter whose
gradient is ``None`` (unused by the loss), while ``torch.func.grad`` returns zeros for it, which
``step`` applies (decay, moment decay, step count); leave such names out of ``grads``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from attribution.record.optim import HYPERPARAMETERS
from attribution.record.trajectory import StageRecord, StepLog

Params = dict[str, torch.Tensor]
State = dict[str, dict[str, torch.Tensor]]

_ADAM_SLOTS = ("step", "exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class StepRule:
    """One optimizer's update rule with per-parameter hyperparameters (from the recorded groups).

    ``hyper`` maps each trained parameter name to the hyperparameters of its group, keyed as in
    ``attribution.record.optim.HYPERPARAMETERS[kind]`` (no ``lr``: learning rates are given per
    step). ``clip_grad_norm`` (None: off) clips the gradients to that total 2-norm first, as
    ``torch.nn.utils.clip_grad_norm_`` does; the total sums the per-tensor norms in the order of
    ``hyper``, which must be the order of the parameters given to torch (``train_stage``: model
    order) for the last bit to agree.
    """

    kind: str
    hyper: Mapping[str, Mapping[str, Any]]
    clip_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in HYPERPARAMETERS:
            raise ValueError(f"optimizer {self.kind!r} is not one of {list(HYPERPARAMETERS)}")

    @classmethod
    def from_record(cls, record: StageRecord, order: Sequence[str] = ()) -> StepRule:
        """The rule of a recorded stage: its optimizer, each group's hyperparameters and its
        gradient clipping. ``order``: the model's parameter names in ``named_parameters()``
        order, the order in which ``train_stage`` clips; without it the record's group order
        is used, which agrees when the groups list the parameters in model order."""
        keys = HYPERPARAMETERS[record.optimizer]
        hyper = {name: {k: g.hyper[k] for k in keys} for g in record.groups for name in g.params}
        ranked = {name: i for i, name in enumerate(order)}
        ordered = sorted(hyper, key=lambda n: ranked.get(n, len(ranked)))
        return cls(record.optimizer, {n: hyper[n] for n in ordered}, record.clip_grad_norm)

    def slots(self, name: str) -> tuple[str, ...]:
        """The state slots torch keeps for trained parameter ``name`` (none for plain SGD)."""
        if self.kind in ("adam", "adamw"):
            return _ADAM_SLOTS
        return ("momentum_buffer",) if self.hyper[name]["momentum"] != 0 else ()

    def fresh(self, state: State) -> frozenset[str]:
        """Names whose momentum buffer torch would create at the first step from ``state``."""
        return frozenset(
            n for n in self.hyper if "momentum_buffer" in self.slots(n) and n not in state
        )

    def init_state(self, params: Params, state: State) -> State:
        """Complete state of every trained parameter that has slots: its entry in ``state`` if
        there is one (as it is), else zeros like the parameter (its device and dtype; ``step`` a
        float32 CPU 0, where torch keeps the count), which is where torch starts Adam and, with
        ``fresh``, SGD momentum. Entries of untrained parameters are dropped."""
        out: State = {}
        for name in self.hyper:
            slots = self.slots(name)
            if not slots:
                continue
            if name not in state:
                out[name] = {
                    s: torch.zeros((), dtype=torch.float32)
                    if s == "step"
                    else torch.zeros_like(params[name])
                    for s in slots
                }
            elif set(state[name]) == set(slots):
                out[name] = dict(state[name])
            else:
                raise ValueError(
                    f"state of {name!r} holds slots {sorted(state[name])}, "
                    f"{self.kind} needs {sorted(slots)}"
                )
        return out

    def step(
        self,
        params: Params,
        state: State,
        grads: Params,
        lrs: Mapping[str, float],
        fresh: Collection[str] = frozenset(),
    ) -> tuple[Params, State]:
        """One optimizer step on the parameters in ``grads``; returns new (params, state) dicts.

        ``state`` must be complete for them (see ``init_state``); ``lrs`` is the learning rate
        of each at this step; ``fresh`` names the momentum buffers torch would create now (the
        buffer becomes the gradient, undampened). Other parameters and entries pass unchanged.
        With ``clip_grad_norm`` the gradients are clipped first (over those in ``grads``).
        """
        unknown = sorted(set(grads) - set(self.hyper))
        if unknown:
            raise ValueError(f"gradients given for parameters this rule does not train: {unknown}")
        if self.clip_grad_norm is not None:
            grads = self.clipped(grads)
        new_params, new_state = dict(params), dict(state)
        for name, grad in grads.items():
            hyper, lr, slots = self.hyper[name], lrs[name], state.get(name, {})
            if self.kind in ("adam", "adamw"):
                p, s = _adam(params[name], slots, grad, lr, hyper, self.kind == "adamw")
            else:
                p, s = _sgd(
                    params[name], slots, grad, lr, hyper, self.kind == "sgdw", name in fresh
                )
            new_params[name] = p
            if s:
                new_state[name] = s
        return new_params, new_state

    def tangent(
        self,
        params: Params,
        grads: Params,
        lrs: Mapping[str, float],
        fresh: Collection[str],
        after: State,
        tangents: tuple[Params, State],
        grad_tangents: Params,
    ) -> tuple[Params, State]:
        """The step's Jacobian-vector product, for tangents stacked along a leading dimension
        (one row per offset carried): what ``torch.func.jvp`` of ``step`` at (``params``,
        state, ``grads``) gives, row by row, written out with plain tensor operations so that
        the rows share each operation (E2: one step's update for every skipped stage at once).

        ``after``: the state ``step`` returned (Adam's new moments enter the derivative);
        ``tangents``: (parameter, state) tangents of every entry of ``params`` and the state;
        ``grad_tangents``: the tangents of ``grads`` (the loss Hessian applied to the parameter
        tangents). Entries not in ``grads`` pass unchanged; step counts keep their tangent."""
        dparams, dstate = tangents
        if self.clip_grad_norm is not None:
            grad_tangents = self._clipped_tangent(grads, grad_tangents)
            grads = self.clipped(grads)
        new_dparams, new_dstate = dict(dparams), dict(dstate)
        for name, dg in grad_tangents.items():
            hyper, lr = self.hyper[name], lrs[name]
            if self.kind in ("adam", "adamw"):
                dp, ds = _adam_tangent(
                    params[name], grads[name], after[name], lr, hyper, self.kind == "adamw",
                    dparams[name], dstate[name], dg,
                )  # fmt: skip
            else:
                dp, ds = _sgd_tangent(
                    lr, hyper, self.kind == "sgdw", name in fresh,
                    dparams[name], dstate.get(name, {}), dg,
                )  # fmt: skip
            new_dparams[name] = dp
            if ds:
                new_dstate[name] = ds
        return new_dparams, new_dstate

    def _clipped_tangent(self, grads: Params, grad_tangents: Params) -> Params:
        """Tangents of ``clipped(grads)`` (rows stacked): ``dg * c + g * dc`` with c the
        clipping coefficient and dc its derivative (0 where clamped, as torch's clamp has it)."""
        names = [n for n in self.hyper if n in grads]
        if not names:
            return dict(grad_tangents)
        total = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(grads[n]) for n in names])
        )
        rows = next(iter(grad_tangents.values())).shape[0]
        inner = sum(
            (grad_tangents[n] * grads[n]).reshape(rows, -1).sum(1) for n in names
        )  # <g, dg> per row
        dtotal = torch.where(total > 0, inner / torch.where(total > 0, total, 1.0), 0.0)
        raw = self.clip_grad_norm / (total + 1e-6)
        coefficient = torch.clamp(raw, max=1.0)
        dcoefficient = torch.where(raw <= 1.0, -raw / (total + 1e-6) * dtotal, 0.0)
        return {
            n: dg * coefficient + grads[n] * _rows(dcoefficient, dg)
            for n, dg in grad_tangents.items()
        }

    def clipped(self, grads: Params) -> Params:
        """``grads`` scaled as ``torch.nn.utils.clip_grad_norm_(..., clip_grad_norm)`` scales
        them: by ``min(max_norm / (total_norm + 1e-6), 1)``, total_norm the 2-norm of the
        per-tensor 2-norms (in ``hyper`` order). Clamped, not branched, so it differentiates."""
        names = [n for n in self.hyper if n in grads]
        if not names:
            return dict(grads)
        total = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(grads[n]) for n in names])
        )
        coefficient = torch.clamp(self.clip_grad_norm / (total + 1e-6), max=1.0)
        return {n: g * coefficient for n, g in grads.items()}


def step_lrs(record: StageRecord, log: StepLog, t: int) -> dict[str, float]:
    """Per-parameter learning rates of step ``t``: ``log.lr[t, i]`` for group ``i``'s names."""
    row = log.lr[t].tolist()
    return {n: lr for group, lr in zip(record.groups, row, strict=True) for n in group.params}


def _sgd(
    p: torch.Tensor,
    slots: Mapping[str, torch.Tensor],
    grad: torch.Tensor,
    lr: float,
    hyper: Mapping[str, Any],
    decoupled: bool,
    fresh: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """torch.optim.SGD's single-tensor step; ``decoupled``: SGDW's decay of p, grad untouched."""
    decay, momentum = hyper["weight_decay"], hyper["momentum"]
    if decay != 0 and decoupled:
        p = p * (1.0 - lr * decay)
    elif decay != 0:
        grad = torch.add(grad, p, alpha=decay)
    if momentum == 0:
        return torch.add(p, grad, alpha=-lr), {}
    if fresh:
        buf = grad
    else:
        buf = torch.add(slots["momentum_buffer"] * momentum, grad, alpha=1 - hyper["dampening"])
    direction = torch.add(grad, buf, alpha=momentum) if hyper["nesterov"] else buf
    return torch.add(p, direction, alpha=-lr), {"momentum_buffer": buf}


def _adam(
    p: torch.Tensor,
    slots: Mapping[str, torch.Tensor],
    grad: torch.Tensor,
    lr: float,
    hyper: Mapping[str, Any],
    decoupled: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """torch.optim.Adam's single-tensor step (AdamW: ``decoupled``), op for op.

    Torch reads the step count with ``.item()`` and forms the bias corrections and step size as
    Python floats; here they are float64 0-dim tensors, which round the same way when they meet
    the parameter's dtype.
    """
    beta1, beta2 = hyper["betas"]
    decay = hyper["weight_decay"]
    step = slots["step"] + 1
    if decay != 0 and decoupled:
        p = p * (1.0 - lr * decay)
    elif decay != 0:
        grad = torch.add(grad, p, alpha=decay)
    exp_avg = torch.lerp(slots["exp_avg"], grad, 1 - beta1)
    exp_avg_sq = torch.addcmul(slots["exp_avg_sq"] * beta2, grad, grad, value=1 - beta2)
    count = step.double()
    # not ``lr / tensor``: Tensor.__rtruediv__ multiplies by the reciprocal (1 ulp off torch)
    step_size = torch.tensor(lr, dtype=torch.float64) / (1 - beta1**count)
    denom = _sqrt(exp_avg_sq) / (1 - beta2**count).sqrt() + hyper["eps"]
    # torch: param.addcdiv_(exp_avg, denom, value=-step_size), computed as p + (value * m) / d
    p = p + -step_size * exp_avg / denom
    return p, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def _rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row vector shaped to broadcast over stacked tangents ``like``."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def _sgd_tangent(
    lr: float,
    hyper: Mapping[str, Any],
    decoupled: bool,
    fresh: bool,
    dp: torch.Tensor,
    dslots: Mapping[str, torch.Tensor],
    dg: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Tangent of ``_sgd``: the SGD step is affine in (p, buffer, grad), so its tangent is
    the same update applied to the tangents without the constant parts."""
    decay, momentum = hyper["weight_decay"], hyper["momentum"]
    if decay != 0 and decoupled:
        dp = dp * (1.0 - lr * decay)
    elif decay != 0:
        dg = dg + decay * dp
    if momentum == 0:
        return dp - lr * dg, {}
    dampened = (1 - hyper["dampening"]) * dg
    dbuf = dg if fresh else dslots["momentum_buffer"] * momentum + dampened
    direction = dg + momentum * dbuf if hyper["nesterov"] else dbuf
    return dp - lr * direction, {"momentum_buffer": dbuf}


def _adam_tangent(
    p: torch.Tensor,
    grad: torch.Tensor,
    after: Mapping[str, torch.Tensor],
    lr: float,
    hyper: Mapping[str, Any],
    decoupled: bool,
    dp: torch.Tensor,
    dslots: Mapping[str, torch.Tensor],
    dg: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Tangent of ``_adam`` at the step that produced the moments ``after``:
    dm' = b1 dm + (1 - b1) dg, dv' = b2 dv + 2 (1 - b2) g dg, and
    dp' = dp - step_size (dm' - m' d(denom) / denom) / denom, with d(sqrt v) = dv / (2 sqrt v)
    and 0 where v = 0 (as ``_sqrt``'s derivative)."""
    beta1, beta2 = hyper["betas"]
    decay = hyper["weight_decay"]
    if decay != 0 and decoupled:
        dp = dp * (1.0 - lr * decay)
    elif decay != 0:
        grad = torch.add(grad, p, alpha=decay)
        dg = dg + decay * dp
    exp_avg_d = beta1 * dslots["exp_avg"] + (1 - beta1) * dg
    exp_avg_sq_d = beta2 * dslots["exp_avg_sq"] + (2 * (1 - beta2)) * grad * dg
    count = after["step"].double()
    step_size = torch.tensor(lr, dtype=torch.float64) / (1 - beta1**count)
    correction = (1 - beta2**count).sqrt()
    v = after["exp_avg_sq"]
    root = _sqrt(v)
    denom = root / correction + hyper["eps"]
    droot = torch.where(v > 0, exp_avg_sq_d / (2 * torch.where(v > 0, root, 1.0)), 0.0)
    ddenom = droot / correction
    dp = dp - step_size * (exp_avg_d - after["exp_avg"] * ddenom / denom) / denom
    return dp, {"step": dslots["step"], "exp_avg": exp_avg_d, "exp_avg_sq": exp_avg_sq_d}


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with derivative 0 at x = 0 (values unchanged).

    The second moment is 0 exactly where every gradient so far was 0 (dead ReLU units, masked
    weights), and there the first moment is 0 too, so the true derivative of m / denom has no
    denom term; plain sqrt's derivative there is inf and makes the tangent 0 * inf = NaN.
    """
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, 1.0)), 0.0)
