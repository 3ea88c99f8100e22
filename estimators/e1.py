"""E1, optimizer-aware and curvature-free.

Every later update is linearised with the loss Hessian taken as zero, so a parameter offset moves
only through the optimizer itself: weight decay shrinks it, momentum (and Nesterov) spreads the
shrinkage over later steps, and the learning-rate schedule sets how much each step shrinks it.

For ``sgd``, ``sgdw`` and ``adamw`` the carried offset after a stage is ``alpha * a0 + beta * b0``
per parameter group, with ``a0`` the offset entering the stage and ``b0`` the momentum-buffer
offset handed over under the ``carry`` policy; ``alpha``, ``beta`` are scalars from a recursion
over the recorded learning rates, so the cost does not grow with the model. ``adam`` (coupled
decay) feeds the decay into the first moment; E1 then takes the preconditioner fixed at the
stage's recorded final second moment (an approximation: the gradients of every step would be
needed for the exact curvature-free answer). Adam moment offsets handed over under ``carry`` are
ignored (they need the gradient trajectory; E2 carries them). Parameters a later stage
re-initialises get offset 0; adapter parameters a later stage adds start at offset 0; frozen
parameters keep their offset. Carried in float64 on the current compute's device (the recorded
optimizer state is moved there as it is used), handed back on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attribution.record.compute import current, to_cpu
from attribution.record.errors import TrajectoryError
from attribution.record.optim import OptimizerState
from attribution.record.pipeline import reinitialised
from attribution.record.trajectory import StageRecord, Trajectory
from estimators.base import Estimator, Offsets, final_parameter_names, stage_displacement
from estimators.stages import handed_state

Affine = tuple[float, float]  # coefficients of (a0, b0)


class E1(Estimator):
    name = "e1"
    version = 2  # the last stage's embedding holds floating-point buffers
    requires = frozenset(
        {"boundary_checkpoints", "learning_rates", "optimizer_hyperparameters", "optimizer_state"}
    )
    trains = False

    def offsets(self, traj: Trajectory, counts: dict[str, int]) -> dict[str, Offsets]:
        names, device = final_parameter_names(traj), current().torch_device
        stages = [LaterStage.of(traj, j) for j in range(len(traj.stages))]
        out = {}
        for k, record in enumerate(traj.stages):
            offset = stage_displacement(traj, k, names, device=device)
            buffers = handed_buffers(traj, k, device)
            for stage in stages[k + 1 :]:
                offset, buffers = stage.carry(offset, buffers)
            out[record.name] = to_cpu(offset)
        return out


def handed_buffers(traj: Trajectory, k: int, device: torch.device | str = "cpu") -> Offsets:
    """Momentum-buffer offsets (float64, on ``device``) handed to stage k+1 when stage k is
    skipped (what ``carry`` passes on; nothing under ``reset``)."""
    if k + 1 >= len(traj.stages) or traj.stages[k + 1].optimizer_policy != "carry":
        return {}
    return {
        name: slots["momentum_buffer"].to(device, torch.float64)
        for name, slots in handed_state(traj, k).items()
        if "momentum_buffer" in slots
    }


@dataclass
class LaterStage:
    """What E1 needs of a stage that an offset passes through, read once from the record."""

    record: StageRecord
    rates: list[list[float]]  # per group, per step
    start: OptimizerState
    end: OptimizerState
    fresh: set[str]
    coefficients: dict[tuple[int, bool], tuple[Affine, Affine]] = field(default_factory=dict)

    @classmethod
    def of(cls, traj: Trajectory, j: int) -> LaterStage:
        record = traj.stages[j]
        lr = traj.steps(j).lr
        end = traj.optimizer_state(j, "end") if record.optimizer == "adam" else {}
        return cls(
            record,
            [lr[:, g].tolist() for g in range(len(record.groups))],
            traj.optimizer_state(j, "start"),
            end,
            reinitialised(traj.build_model(j), record),
        )

    def carry(self, offset: Offsets, buffers: Offsets) -> tuple[Offsets, Offsets]:
        """The (parameter, momentum-buffer) offsets after this stage, from those entering it."""
        record = self.record
        offset = {n: v for n, v in offset.items() if n not in self.fresh}
        if record.optimizer_policy == "reset":
            buffers = {}
        out, out_buffers = dict(offset), {}
        for g, group in enumerate(record.groups):
            for name in group.params:
                if name not in offset:
                    continue
                a0, b0 = offset[name], buffers.get(name)
                if record.optimizer == "adam":
                    out[name] = _adam(
                        a0,
                        self.rates[g],
                        group.hyper,
                        self.start.get(name, {}),
                        self.end.get(name, {}),
                        name,
                        record,
                    )
                    continue
                first = "momentum_buffer" not in self.start.get(name, {})
                if (g, first) not in self.coefficients:
                    self.coefficients[g, first] = _sgd_family(
                        record.optimizer, group.hyper, self.rates[g], first
                    )
                a, c = self.coefficients[g, first]
                out[name] = _apply(a, a0, b0)
                if group.hyper.get("momentum", 0.0):
                    out_buffers[name] = _apply(c, a0, b0)
        return out, out_buffers


def _sgd_family(kind: str, hyper: dict, rates: list[float], first: bool) -> tuple[Affine, Affine]:
    """Offset and buffer after the stage as affine functions of (entering offset, buffer)."""
    mu, damp = hyper.get("momentum", 0.0), hyper.get("dampening", 0.0)
    nesterov = hyper.get("nesterov", False)
    coupled = hyper["weight_decay"] if kind == "sgd" else 0.0
    decoupled = hyper["weight_decay"] if kind in ("sgdw", "adamw") else 0.0
    a, c = (1.0, 0.0), (0.0, 1.0)
    for t, eta in enumerate(rates):
        a = _scale(a, 1.0 - eta * decoupled)
        if kind == "adamw":
            continue
        dp = _scale(a, coupled)
        if mu:
            c = dp if (t == 0 and first) else _add(_scale(c, mu), _scale(dp, 1.0 - damp))
            update = _add(dp, _scale(c, mu)) if nesterov else c
        else:
            update = dp
        a = _add(a, _scale(update, -eta))
    return a, c


def _adam(
    a0: torch.Tensor,
    rates: list[float],
    hyper: dict,
    start: dict,
    end: dict,
    name: str,
    record: StageRecord,
) -> torch.Tensor:
    """Coupled-decay Adam with the preconditioner fixed at the stage's final second moment."""
    if "exp_avg_sq" not in end:
        raise TrajectoryError(
            None,
            f"no recorded second moment for {name}, which E1 needs",
            "record the optimizer state at the stage end, or use E2",
            field="optimizer_state.end",
            stage=record.name,
        )
    (beta1, beta2), eps, lam = hyper["betas"], hyper["eps"], hyper["weight_decay"]
    step0 = float(start["step"]) if "step" in start else 0.0
    bias2 = 1.0 - beta2 ** float(end["step"])
    denom = (end["exp_avg_sq"].to(a0.device, torch.float64) / bias2).sqrt() + eps
    a, m = a0.clone(), torch.zeros_like(a0)
    for t, eta in enumerate(rates):
        m = beta1 * m + (1.0 - beta1) * lam * a
        a = a - eta / (1.0 - beta1 ** (step0 + t + 1)) * m / denom
    return a


def _apply(coefficients: Affine, a0: torch.Tensor, b0: torch.Tensor | None) -> torch.Tensor:
    alpha, beta = coefficients
    return alpha * a0 if b0 is None or beta == 0.0 else alpha * a0 + beta * b0


def _scale(x: Affine, s: float) -> Affine:
    return (x[0] * s, x[1] * s)


def _add(x: Affine, y: Affine) -> Affine:
    return (x[0] + y[0], x[1] + y[1])
