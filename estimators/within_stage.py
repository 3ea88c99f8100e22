"""Within-stage example attribution: what each training example of a stage did to a behaviour of
the final model (docs/interventions.md, the scores behind the ``filter`` intervention).

For a behaviour f of the final parameters and a stage k, example z of stage k's data scores

    score(z) = d f(theta_T) / d w_z  at w = 1,

where w_z weights z's loss in every batch of stage k that used it: the batch loss of step t is
``(1/|B_t|) sum_{z in B_t} w_z loss_z`` (denominator unchanged). So score(z) ~= f(with z) -
f(without z), the project's sign convention: positive means z raised f (for a loss or a gap:
z is harmful), negative means it lowered f. Examples no batch used score 0.

Computed exactly to first order by the adjoint (reverse) method. ``grad f(theta_T)`` is pulled
back through the recorded steps of stages K..k+1 (vector-Jacobian products of the functional
optimizer step, ``estimators.functional``; optimizer-state adjoints cross a boundary under the
``carry`` policy; re-initialised and newly added parameters take no adjoint back, as in
``estimators.e2.adjoint_effects``), then through stage k's steps in reverse. Each step is split
into ``g_t = grad L(theta_t; B_t)`` and ``(theta_{t+1}, s_{t+1}) = step(theta_t, s_t, g_t)``:
the vjp of ``step`` gives the adjoints of theta_t (direct part), s_t and g_t; the adjoint of
theta_t adds the Hessian-vector product of the batch loss with the g_t-adjoint; and example z in
B_t gains ``(1/|B_t|) <grad loss_z(theta_t), adjoint of g_t>``, for the whole batch from ONE
forward-mode jvp of the per-example losses along the g_t-adjoint (no per-example gradients).

Cost: for stage k and every later stage, one forward replay (a gradient per step) and in
reverse one gradient plus its vjp (a Hessian-vector product) and one vjp of the step per step;
stage k adds one jvp per step. Memory: the trained parameters and the optimizer state before
every step of the stage being pulled back through (``num_steps x (trained parameters + state)``
numbers), plus one step's activations; never an N x p matrix. The steps run where
``estimators.stages`` runs them; the scores come back as float64 CPU tensors.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, jvp

from attribution.record.errors import StagetraceError
from attribution.record.pipeline import check_indices, require_batch_order
from attribution.record.references import load_dataset, loss_function
from attribution.record.trajectory import StageRecord, Trajectory
from estimators.functional import Params
from estimators.stages import TrainingStart, adjoints

PerExampleLoss = Callable[[Tensor, Tensor], Tensor]
"""``loss(outputs, targets) -> [batch]``: one loss per example whose mean is the stage's loss."""

MEANING = (
    "score(z) = d f(theta_T) / d w_z at w = 1 (w_z weights example z's loss in every batch of "
    "the stage that used it) ~= f(with z) - f(without z): positive means z raised f"
)


def _per_example_mse(outputs: Tensor, targets: Tensor) -> Tensor:
    return (outputs - targets).square().flatten(1).mean(1)


def _per_example_bce(outputs: Tensor, targets: Tensor) -> Tensor:
    loss = F.binary_cross_entropy_with_logits(outputs, targets, reduction="none")
    return loss.reshape(len(loss), -1).mean(1)


def _per_example_cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    loss = F.cross_entropy(outputs, targets, reduction="none")
    return loss.reshape(len(loss), -1).mean(1)


PER_EXAMPLE: dict[str, PerExampleLoss] = {
    "cross_entropy": _per_example_cross_entropy,
    "mse": _per_example_mse,
    "binary_cross_entropy_with_logits": _per_example_bce,
}
"""Per-example forms of the named losses of ``attribution.record.references.LOSSES``."""


@dataclass(frozen=True)
class ExampleScores:
    """Scores of every example of a stage's dataset (indices as in the stage's data).

    ``scores`` float64 [n]: d f / d w_z (units of f per unit weight; ``meaning``); ``uses``
    int64 [n]: how often z appeared in the stage's batches (0: never used, score 0);
    ``seconds``: wall time; ``counts``: work done (steps replayed, Hessian-vector products,
    jvps).
    """

    stage: str
    scores: Tensor
    uses: Tensor
    seconds: float
    counts: Mapping[str, int] = field(default_factory=dict)
    meaning: str = MEANING

    @property
    def used(self) -> Tensor:
        """Indices (int64, ascending) of the examples some batch used."""
        return torch.nonzero(self.uses > 0).flatten()


def example_scores(
    traj: Trajectory,
    stage: str | int,
    behaviour: Callable[[Params], Tensor],
    per_example_loss: PerExampleLoss | None = None,
) -> ExampleScores:
    """Score every example of ``stage``'s data by its first-order effect on ``behaviour``.

    ``behaviour`` maps the final parameters (dict, buffers excluded) to a 0-dim tensor.
    ``per_example_loss`` is needed only when the stage's loss is a ``module:function``
    reference: the unreduced form of that loss (its batch mean must equal the loss).
    """
    k = traj.index(stage)
    record = traj.stages[k]
    per_example = per_example_loss or per_example_form(record)
    for j in range(k, len(traj.stages)):
        require_batch_order(traj.stages[j], traj.steps(j), "example scores")
    began = time.perf_counter()
    start = TrainingStart.of(traj, k)
    log = traj.steps(k)
    dataset = load_dataset(record.data)
    _check_per_example(per_example, start, *start.batch(dataset, log, 0))
    counts = {"steps": 0, "hvps": 0, "jvps": 0}
    *_, (_, adjoint, adjoint_state) = adjoints(traj, behaviour, counts, down_to=k)
    uses = example_uses(traj, k)
    scores = torch.zeros(len(uses), dtype=torch.float64)
    trained = list(start.rule.hyper)

    def score(t: int, params: Params, inputs: Tensor, targets: Tensor, adjoint_g: Params) -> None:
        def losses(part: Params) -> Tensor:
            return per_example(functional_call(start.model, {**params, **part}, (inputs,)), targets)

        _, slopes = jvp(losses, ({n: params[n] for n in trained},), (adjoint_g,))
        scores.index_add_(0, log.batch(t), slopes.detach().to("cpu", torch.float64) / len(targets))
        counts["jvps"] += 1

    start.pull_back(adjoint, adjoint_state, counts, score)
    counts["examples"] = len(uses)
    counts["used"] = int((uses > 0).sum())
    return ExampleScores(record.name, scores, uses, time.perf_counter() - began, counts)


def example_uses(traj: Trajectory, stage: str | int) -> Tensor:
    """int64 [n]: how often each example of the stage's data appeared in its recorded batches."""
    k = traj.index(stage)
    log, record = traj.steps(k), traj.stages[k]
    size = len(load_dataset(record.data))
    check_indices(record, log, size)
    return torch.bincount(log.indices, minlength=size)


def per_example_form(record: StageRecord) -> PerExampleLoss:
    """The unreduced form of a stage's named loss; an error for losses stagetrace cannot split."""
    if record.loss in PER_EXAMPLE:
        return PER_EXAMPLE[record.loss]
    raise StagetraceError(
        f"stage {record.name!r} trained with the loss {record.loss!r}, which has no per-example "
        f"form known to stagetrace. Fix: pass per_example_loss (outputs, targets) -> [batch] "
        f"whose mean is that loss, or train with one of {', '.join(PER_EXAMPLE)}"
    )


def _check_per_example(
    per_example: PerExampleLoss, start: TrainingStart, inputs: Tensor, targets: Tensor
) -> None:
    """The per-example losses must average to the recorded loss (checked on the stage's first
    batch at its start, on the stage's device), else the scores would be silently wrong."""
    with torch.no_grad():
        outputs = start.model(inputs)
        values = per_example(outputs, targets)
        mean = loss_function(start.record.loss)(outputs, targets)
    if values.shape != (len(targets),) or not torch.allclose(
        values.mean(), mean, rtol=1e-4, atol=1e-6
    ):
        raise StagetraceError(
            f"the per-example loss of stage {start.record.name!r} gives shape "
            f"{tuple(values.shape)} and mean {float(values.mean()):.6g} on a batch of "
            f"{len(targets)} whose loss {start.record.loss!r} is {float(mean):.6g}. Fix: give "
            "per_example_loss returning one value per example whose mean is the stage's loss"
        )
