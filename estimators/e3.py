"""E3, stage-averaged curvature: E1's optimizer carry plus each later stage's top curvature.

Linearised with one averaged curvature ``H`` (Hessian or Gauss-Newton of the stage's loss on a
fixed sample of its data, at its boundary checkpoints) and a per-parameter step mass ``D``, later
stage j moves an offset by ``d(delta)/dm = -D H delta``, so ``delta_out = exp(-D H) delta``.
With ``A = D^1/2 H D^1/2`` and ``phi(x) = (1 - exp(-x)) / x`` the exact identity

    exp(-D H) delta = delta - D^1/2 phi(A) D^1/2 (H delta)

lets E3 keep ``phi(A)`` only on A's top-``rank`` eigenpairs (Lanczos, HVPs only) and drop the
curvature elsewhere: one extra curvature-vector product per offset per stage, exact when ``rank``
is the trained dimension (and ``H`` positive semi-definite), E1 when ``rank = 0``.

``D`` (units of learning rate x steps, per parameter): for SGD/SGDW the displacement the
recorded schedule makes under a unit constant gradient, counting momentum, dampening and Nesterov
from a buffer that starts at zero (torch's first step copies the gradient where the buffer is
new); for long stages this is ``sum(lr) (1 - dampening) / (1 - momentum)``. For Adam/AdamW it is
``sum(lr) / (sqrt(v_hat) + eps)`` with ``v_hat`` the stage's recorded final second moment,
bias-corrected, except ``D = 0`` where that moment is exactly 0: such a parameter had a zero
gradient at every step of the stage (a dead ReLU unit, an always-blank input pixel), and the formal
``sum(lr) / eps`` (millions) would let any curvature coupling blow the offset up, while Adam's real
response to a new gradient there is normalised (about ``lr`` per step); on the smoke MNIST pipeline
this choice took E3's error on the stage offsets from about 20x the truth to below 1x. Parameters
the stage does not train have ``D = 0`` too (their offsets still act on the trained ones through
the mixed second derivatives).

Eigenvalues: Lanczos returns the top ``rank`` by algebraic value, the directions where the stage
contracts an offset most. Non-positive ones are dropped (taken as curvature-free): along negative
curvature the linearised stage grows an offset like ``exp(m |lambda|)``, which nonlinear training
does not sustain, and the sign of a small sampled eigenvalue at two checkpoints says little about
a whole stage. Gauss-Newton is positive semi-definite for convex losses, so nothing is dropped.

Order: per later stage E1's carry is applied first (re-initialised parameters restart at 0,
weight decay and momentum shrink the offset and give buffer offsets), then the curvature factor,
so that parameters a stage re-creates or adds still receive the curvature's response. For one
group with scalar coefficients the order is immaterial (a scalar commutes with ``exp(-D H)``);
with several groups of different coefficients, or coupled-decay Adam (whose E1 factor differs per
element), the two factors do not commute and the product is an approximation. Momentum-buffer
offsets handed on under ``carry`` get E1's coefficients only.

Device: the curvature products (in the model's own precision), Lanczos and the carried offsets
run on the current compute's device; the random start vectors are drawn on the CPU, so every
device starts from the same ones. The embeddings are handed back on the CPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from attribution.record.compute import current, on_device, to_cpu
from attribution.record.errors import SpecError, StagetraceError
from attribution.record.references import load_dataset, loss_function
from attribution.record.trajectory import StageRecord, Trajectory
from estimators.base import (
    Arguments,
    Estimator,
    Offsets,
    final_parameter_names,
    stage_displacement,
)
from estimators.curvature import CURVATURES, Operator, curvature_product, lanczos
from estimators.e1 import LaterStage, handed_buffers
from estimators.stages import TrainingStart

POINTS = ("start", "end", "both")


@dataclass(frozen=True)
class E3Arguments(Arguments):
    """``rank``: eigenpairs per later stage (0 gives E1); ``sample``: training examples the
    curvature is averaged over; ``at``: the checkpoint(s) it is taken at (start, end, both);
    ``curvature``: ``hessian`` or ``gauss_newton``; ``seed``: of the sample and of Lanczos."""

    rank: int = 20
    sample: int = 512
    at: str = "both"
    curvature: str = "hessian"
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("rank", self.rank, 0, "give the number of eigenpairs, e.g. 20 (0 gives E1)")
        _check_int("sample", self.sample, 1, "give how many training examples to sample, e.g. 512")
        _check_int("seed", self.seed, None, "give an integer seed, e.g. 0")
        if self.at not in POINTS:
            raise SpecError(
                "e3.at", f"unknown point {self.at!r}", f"use one of {', '.join(POINTS)}"
            )
        if self.curvature not in CURVATURES:
            raise SpecError(
                "e3.curvature",
                f"unknown curvature {self.curvature!r}",
                f"use one of {', '.join(CURVATURES)}",
            )


class E3(Estimator):
    """Stage-averaged curvature (see the module docstring); ``counts["hvps"]`` counts
    curvature-vector products over the whole sample at one checkpoint."""

    name = "e3"
    version = 2  # the last stage's embedding holds floating-point buffers
    requires = frozenset(
        {
            "boundary_checkpoints",
            "learning_rates",
            "optimizer_hyperparameters",
            "optimizer_state",
            "stage_data",
        }
    )
    Settings = E3Arguments
    trains = False

    def offsets(self, traj: Trajectory, counts: dict[str, int]) -> dict[str, Offsets]:
        names, device = final_parameter_names(traj), current().torch_device
        counts.setdefault("hvps", 0)
        carried: dict[str, tuple[Offsets, Offsets]] = {}  # skipped stage -> offsets in flight
        for j in range(1, len(traj.stages)):
            k = j - 1
            carried[traj.stages[k].name] = (
                stage_displacement(traj, k, names, device=device),
                handed_buffers(traj, k, device),
            )
            optimizer = LaterStage.of(traj, j)
            curvature = StageCurvature.of(traj, j, self.arguments, counts)
            for stage, (offset, buffers) in carried.items():
                offset, buffers = optimizer.carry(offset, buffers)
                carried[stage] = (curvature.carry(offset, counts), buffers)
        last = len(traj.stages) - 1
        out = {
            s: to_cpu({n: v.double() for n, v in offset.items() if n in names})
            for s, (offset, _) in carried.items()
        }
        out[traj.stages[last].name] = stage_displacement(traj, last, names)
        return out


def _check_int(setting: str, value: Any, minimum: int | None, fix: str) -> None:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or (minimum is not None and value < minimum)
    ):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise SpecError(f"e3.{setting}", f"expected an integer{bound}, got {value!r}", fix)


@dataclass(frozen=True)
class StageCurvature:
    """Later stage j's curvature in step-mass coordinates: ``A = D^1/2 H D^1/2`` on the
    flattened trained parameters, with its kept top eigenpairs."""

    products: list[Operator]  # one per checkpoint; H is their mean
    domain: frozenset[str]  # what a tangent may move: the parameters of the stage's model
    shapes: dict[str, torch.Size]  # trained parameters, in flattening order
    root_mass: torch.Tensor  # D^1/2, float64 [dim]
    values: torch.Tensor  # kept (positive) eigenvalues of A
    vectors: torch.Tensor  # their eigenvectors [dim, r]

    @classmethod
    def of(
        cls, traj: Trajectory, j: int, settings: E3Arguments, counts: dict[str, int]
    ) -> StageCurvature:
        """Read stage j's checkpoints, sample and step mass, and find A's top eigenpairs, on
        the current compute's device (the points hold the buffers too, so that the module's
        own, on the CPU, are never used)."""
        device = current().torch_device
        start = TrainingStart.of(traj, j)
        record, model = start.record, start.model
        trained = list(record.trainable)
        end = traj.checkpoint(j, "end")
        buffers = dict(model.named_buffers())
        points = {
            "start": [on_device({**buffers, **start.params}, cast=False)],
            "end": [
                on_device(
                    {n: end[n] for n, _ in (*model.named_parameters(), *model.named_buffers())},
                    cast=False,
                )
            ],
        }
        points["both"] = points["start"] + points["end"]
        inputs, targets = (t.to(device) for t in _sample(record, settings.sample, settings.seed))
        loss = loss_function(record.loss)
        products = [
            curvature_product(settings.curvature, model, point, trained, loss, inputs, targets)
            for point in points[settings.at]
        ]
        shapes = {n: start.params[n].shape for n in trained}
        mass = step_mass(traj, j, shapes)
        root_mass = torch.cat([mass[n].reshape(-1) for n in shapes]).sqrt().to(device)
        none = torch.zeros(0, dtype=torch.float64, device=device)
        stage = cls(
            products,
            frozenset(start.params),
            shapes,
            root_mass,
            none,
            torch.zeros(len(root_mass), 0, dtype=torch.float64, device=device),
        )
        if settings.rank == 0:
            return stage

        def operator(v: torch.Tensor) -> torch.Tensor:
            return root_mass * stage.curvature(stage.unflatten(root_mass * v), counts)

        values, vectors = lanczos(
            operator, len(root_mass), settings.rank, seed=settings.seed, device=device
        )
        keep = values > 0
        return dataclasses.replace(stage, values=values[keep], vectors=vectors[:, keep])

    def curvature(self, tangent: Offsets, counts: dict[str, int]) -> torch.Tensor:
        """``H v`` over the trained parameters, flattened, float64 (mean over the checkpoints)."""
        counts["hvps"] = counts.get("hvps", 0) + len(self.products)
        return sum(self.flatten(product(tangent)) for product in self.products) / len(self.products)

    def carry(self, offset: Offsets, counts: dict[str, int]) -> Offsets:
        """The offset after the stage's curvature factor (top eigenpairs; identity elsewhere)."""
        tangent = {n: v for n, v in offset.items() if n in self.domain}
        if not len(self.values) or not tangent:
            return offset
        projected = self.vectors.T @ (self.root_mass * self.curvature(tangent, counts))
        correction = self.root_mass * (self.vectors @ (phi(self.values) * projected))
        out = dict(offset)
        for name, change in self.unflatten(correction).items():
            out[name] = offset[name] - change if name in offset else -change
        return out

    def flatten(self, tensors: Offsets) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1).double() for n in self.shapes])

    def unflatten(self, flat: torch.Tensor) -> Offsets:
        parts = torch.split(flat, [s.numel() for s in self.shapes.values()])
        return {n: p.reshape(s) for (n, s), p in zip(self.shapes.items(), parts, strict=True)}


def phi(x: torch.Tensor) -> torch.Tensor:
    """``(1 - exp(-x)) / x`` with ``phi(0) = 1``, accurate near 0 (``expm1``)."""
    small = x.abs() < 1e-12
    return torch.where(small, torch.ones_like(x), -torch.expm1(-x) / torch.where(small, 1.0, x))


def step_mass(traj: Trajectory, j: int, shapes: dict[str, torch.Size]) -> Offsets:
    """``D`` of stage j for each trained parameter (shaped like it, float64; see module doc)."""
    record = traj.stages[j]
    rates = traj.steps(j).lr.double()
    start = traj.optimizer_state(j, "start")
    end = traj.optimizer_state(j, "end") if record.optimizer in ("adam", "adamw") else {}
    mass = {}
    for g, group in enumerate(record.groups):
        for name in group.params:
            if record.optimizer in ("adam", "adamw"):
                mass[name] = _adam_mass(
                    rates[:, g].sum(), group.hyper, end.get(name, {}), name, record
                )
            else:
                first = "momentum_buffer" not in start.get(name, {})
                value = _sgd_mass(group.hyper, rates[:, g].tolist(), first)
                mass[name] = torch.full(shapes[name], value, dtype=torch.float64)
    return mass


def _sgd_mass(hyper: dict, rates: list[float], first: bool) -> float:
    """Displacement per unit constant gradient over the stage (gradient change from step 0)."""
    mu, damp = hyper.get("momentum", 0.0), hyper.get("dampening", 0.0)
    if not mu:
        return float(sum(rates))
    nesterov, buffer, mass = hyper.get("nesterov", False), 0.0, 0.0
    for t, eta in enumerate(rates):
        buffer = 1.0 if (t == 0 and first) else mu * buffer + (1.0 - damp)
        mass += eta * (1.0 + mu * buffer if nesterov else buffer)
    return mass


def _adam_mass(
    total: torch.Tensor, hyper: dict, end: dict, name: str, record: StageRecord
) -> torch.Tensor:
    """``sum(lr) / (sqrt(v_hat) + eps)``, and 0 where the second moment is exactly 0."""
    if "exp_avg_sq" not in end:
        raise StagetraceError(
            f"stage {record.name!r} has no recorded second moment for {name}, which E3 needs "
            "for Adam's step mass. Fix: record the optimizer state at the stage end, or use E2"
        )
    beta2 = hyper["betas"][1]
    v_hat = end["exp_avg_sq"].double() / (1.0 - beta2 ** float(end["step"]))
    return torch.where(v_hat > 0, total / (v_hat.sqrt() + hyper["eps"]), 0.0)


def _sample(record: StageRecord, sample: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random sample of the stage's training data (all of it if smaller)."""
    inputs, targets = load_dataset(record.data).tensors[:2]
    n = len(inputs)
    if sample >= n:
        return inputs, targets
    index = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:sample]
    return inputs[index], targets[index]
