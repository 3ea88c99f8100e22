"""The one evaluator of a model on data: a model as a function at a checkpoint, its per-example
quantities (differentiable in its parameters and floating-point buffers), one batched runner and
one directional derivative (a forward-mode jvp) for the read-outs and the baselines.

A model is always evaluated in eval mode with the buffers of the checkpoint it stands for
(BatchNorm running statistics, ...): dropout is off and normalisation uses the recorded
statistics, so the same checkpoint gives the same numbers every time.

Units: ``loss`` is cross-entropy in nats; ``margin`` is the true-class logit minus the largest
other logit, in logit units; ``correct`` is 1.0 where the largest logit is the true class's, else
0.0 (not differentiable; for accuracies).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp
from torch.overrides import TorchFunctionMode

from attribution.record.errors import SpecError, StagetraceError
from attribution.record.trajectory import Trajectory, load_state

QUANTITIES = ("loss", "margin")
"""The differentiable per-example quantities a behaviour can be made of."""
MEASURES = (*QUANTITIES, "correct")


@dataclass(frozen=True, eq=False)
class ModelAt:
    """A model as a function at one checkpoint: ``module`` (held in eval mode) run with the
    checkpoint's ``params`` and ``buffers``. ``point`` (parameters and floating-point buffers) is
    what stage embeddings offset and what jvps and gradients differentiate."""

    module: nn.Module
    params: Mapping[str, Tensor]
    buffers: Mapping[str, Tensor]

    @classmethod
    def of(cls, module: nn.Module, state: Mapping[str, Tensor]) -> ModelAt:
        """``module`` (set to eval mode; it is taken over) at the full state dict ``state``
        (parameters and buffers, e.g. a checkpoint); a state that does not fit is refused."""
        load_state(module, state, "the state to evaluate")  # checks names and shapes
        module.eval()
        params = {n: state[n].detach() for n, _ in module.named_parameters()}
        buffers = {n: state[n].detach() for n, _ in module.named_buffers()}
        return cls(module, params, buffers)

    def at(self, state: Mapping[str, Tensor]) -> ModelAt:
        """The same function at another full state (e.g. a counterfactual's ``state``)."""
        return ModelAt.of(self.module, state)

    @property
    def point(self) -> dict[str, Tensor]:
        """Parameters and floating-point buffers: the coordinates offsets and tangents address."""
        floating = {n: b for n, b in self.buffers.items() if b.is_floating_point()}
        return {**self.params, **floating}

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values()), torch.zeros(0)).device

    def moved(self, offsets: Mapping[str, Tensor]) -> ModelAt:
        """The model at ``point + offsets`` (names of ``point``; others stay): added in float64
        and stored in each tensor's dtype, so the offset of two checkpoints lands exactly."""
        unknown = sorted(set(offsets) - set(self.point))
        if unknown:
            raise StagetraceError(
                f"offsets for {unknown[:5]}, which are not parameters or floating-point buffers "
                "of the model. Fix: key offsets by the model's parameter and buffer names"
            )

        def add(values: Mapping[str, Tensor]) -> dict[str, Tensor]:
            return {
                n: (v.double() + offsets[n].to(v.device, torch.float64)).to(v.dtype)
                if n in offsets
                else v
                for n, v in values.items()
            }

        return ModelAt(self.module, add(self.params), add(self.buffers))

    def logits(self, inputs: Tensor, point: Mapping[str, Tensor] | None = None) -> Tensor:
        """The model's outputs on ``inputs``, run with ``point`` (any subset of ``point``'s
        names) in place of the checkpoint's own values."""
        state = {**self.buffers, **self.params, **(point or {})}
        return functional_call(self.module, state, (inputs,))

    def values(
        self, inputs: Tensor, targets: Tensor, measure: str, batch_size: int = 512
    ) -> Tensor:
        """The per-example ``measure`` [N] float64 on the CPU, without gradients, in batches."""
        with torch.no_grad():
            return batched(
                partial(per_example, self, {}, quantity=measure),
                inputs,
                targets,
                batch_size,
                self.device,
            )


def final_model(traj: Trajectory) -> ModelAt:
    """The final model: the last stage's structure at its ``end`` checkpoint."""
    last = len(traj.stages) - 1
    return ModelAt.of(traj.build_model(last), traj.checkpoint(last, "end"))


def per_example(
    model: ModelAt, point: Mapping[str, Tensor], inputs: Tensor, targets: Tensor, quantity: str
) -> Tensor:
    """The per-example ``quantity`` [N] of ``model`` run with ``point`` in place of its own
    parameters and floating buffers (any subset; ``{}`` for the checkpoint itself).

    ``loss``: cross-entropy in nats; ``margin``: true-class logit minus the largest other logit;
    ``correct``: 1.0 or 0.0. Differentiable in ``point`` (works under ``torch.func``) for the
    first two.
    """
    if quantity not in MEASURES:
        raise SpecError("quantity", f"unknown quantity {quantity!r}", f"use one of {QUANTITIES}")
    logits = model.logits(inputs, point)
    if quantity == "loss":
        return F.cross_entropy(logits, targets, reduction="none")
    if quantity == "correct":
        return (logits.argmax(-1) == targets).to(logits.dtype)
    true = logits.gather(-1, targets[:, None]).squeeze(-1)
    others = logits.masked_fill(F.one_hot(targets, logits.shape[-1]).bool(), float("-inf"))
    return true - others.amax(-1)


def directional(
    model: ModelAt,
    tangent: Mapping[str, Tensor],
    inputs: Tensor,
    targets: Tensor,
    quantity: str,
    batch_size: int = 512,
) -> Tensor:
    """<grad f_i(point), tangent> for every example's ``quantity`` f_i: one forward-mode jvp per
    batch, [N] float64 on the CPU. ``tangent`` covers any subset of ``model.point`` (the rest
    is held fixed) and is cast to each coordinate's dtype and device. Floating buffers are
    differentiated too: eval-mode BatchNorm is then run as its explicit formula, since torch's
    kernel refuses a derivative along running statistics."""
    point = model.point
    unknown = sorted(set(tangent) - set(point))
    if unknown:
        raise StagetraceError(
            f"tangent for {unknown[:5]}, which are not parameters or floating-point buffers of "
            "the model. Fix: key the direction by the model's parameter and buffer names"
        )
    if not tangent:
        return torch.zeros(len(targets), dtype=torch.float64)
    primal = {n: point[n] for n in tangent}
    direction = {n: t.to(point[n]) for n, t in tangent.items()}
    along_buffers = bool(set(tangent) - set(model.params))

    def derivative(x: Tensor, y: Tensor) -> Tensor:
        f = partial(per_example, model, inputs=x, targets=y, quantity=quantity)
        if along_buffers:
            with _RunningStatisticsAsFormula():
                return jvp(f, (primal,), (direction,))[1]
        return jvp(f, (primal,), (direction,))[1]

    return batched(derivative, inputs, targets, batch_size, model.device)


def batched(
    fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    batch_size: int,
    device: torch.device,
) -> Tensor:
    """``fn(inputs, targets)`` [N], run on ``device`` over batches of at most ``batch_size``
    examples (memory: one batch's forward pass), returned as float64 on the CPU."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise StagetraceError(
            f"batch_size {batch_size!r} is not a positive integer. Fix: give the number of "
            "examples per forward pass, e.g. 512"
        )
    return torch.cat(
        [
            fn(inputs[i : i + batch_size].to(device), targets[i : i + batch_size].to(device))
            .detach()
            .to("cpu", torch.float64)
            for i in range(0, len(targets), batch_size)
        ]
        or [torch.zeros(0, dtype=torch.float64)]
    )


_BATCH_NORM = inspect.signature(F.batch_norm)


class _RunningStatisticsAsFormula(TorchFunctionMode):
    """Eval-mode ``F.batch_norm`` as ``(x - mean) / sqrt(var + eps) * weight + bias``, which is
    differentiable along the running statistics (the same function; other calls untouched)."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            bound = _BATCH_NORM.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            if not a["training"] and a["running_mean"] is not None:
                x = a["input"]
                shape = (1, -1) + (1,) * (x.ndim - 2)
                y = (x - a["running_mean"].view(shape)) * torch.rsqrt(
                    a["running_var"].view(shape) + a["eps"]
                )
                if a["weight"] is not None:
                    y = y * a["weight"].view(shape)
                return y if a["bias"] is None else y + a["bias"].view(shape)
        return func(*args, **kwargs)
