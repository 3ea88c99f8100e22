"""The two read-outs: from stage embeddings to stage effects on a behaviour.

A stage embedding SE_k is a dict {parameter name: tensor} estimating theta_T^(-k) - theta_T, the
offset from the final parameters to those of the run without stage k (names it lacks have offset
0). With the project's sign convention effect_k(f) = f(theta_T) - f(theta_T^(-k)):

- linear: effect_k(f) ~= -<grad f(theta_T), SE_k>, one forward-mode ``torch.func.jvp`` of the
  batch's per-example quantities along SE_k;
- evaluated: effect_k(f) ~= f(theta_T) - f(theta_T + SE_k), one forward pass; exact whenever SE_k
  is.

Both run per example in batches of ``batch_size`` examples, so memory is bounded by one batch's
forward pass (never an N x p matrix of per-example gradients), and return per-example effects
([N] float64, in the units of the quantity) that ``behaviour_effects`` aggregates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

import torch
from torch import Tensor, nn
from torch.func import jvp

from attribution.analysis.behaviors import Behavior
from attribution.record.errors import StagetraceError
from attribution.record.evaluation import per_example

Embeddings = Mapping[str, Mapping[str, Tensor]]


def linear_effects(
    model: nn.Module,
    params: Mapping[str, Tensor],
    embeddings: Embeddings,
    inputs: Tensor,
    targets: Tensor,
    quantity: str,
    batch_size: int = 512,
) -> dict[str, Tensor]:
    """Per stage, the [N] float64 effects -<grad f(theta_T), SE_k> of the per-example quantity.

    ``params`` are the final model's parameters theta_T; ``model`` is only the function (run with
    ``params`` and its own buffers). One jvp per stage per batch.
    """
    params = _detached(params)
    effects = {}
    for stage, embedding in _checked(params, embeddings).items():
        tangent = {
            n: embedding[n] if n in embedding else torch.zeros_like(p) for n, p in params.items()
        }
        derivative = partial(_directional, model, params, tangent, quantity)
        effects[stage] = -_batched(derivative, inputs, targets, batch_size, _device(params, inputs))
    return effects


@torch.no_grad()
def evaluated_effects(
    model: nn.Module,
    params: Mapping[str, Tensor],
    embeddings: Embeddings,
    inputs: Tensor,
    targets: Tensor,
    quantity: str,
    batch_size: int = 512,
) -> dict[str, Tensor]:
    """Per stage, the [N] float64 effects f(theta_T) - f(theta_T + SE_k) per example.

    ``params`` are the final model's parameters theta_T; ``model`` is only the function (run with
    the given parameters and its own buffers). One forward pass per stage per batch, plus one for
    f(theta_T).
    """
    params = _detached(params)
    checked = _checked(params, embeddings)

    def quantity_at(point: Mapping[str, Tensor]) -> Tensor:
        run = partial(per_example, model, point, quantity=quantity)
        return _batched(run, inputs, targets, batch_size, _device(params, inputs))

    final = quantity_at(params)
    effects = {}
    for stage, embedding in checked.items():
        shifted = {n: p + embedding[n] if n in embedding else p for n, p in params.items()}
        effects[stage] = final - quantity_at(shifted)
    return effects


def behaviour_effects(
    behavior: Behavior, per_example_effects: Mapping[str, Tensor], keys: Tensor
) -> dict[str, dict[str, float]]:
    """Aggregate per-example effects into the behaviour's outputs: {stage: {output: effect}}.

    Valid for either read-out, since behaviours are linear in the per-example quantity;
    ``keys`` are the examples' group keys (``Behavior.load``'s third value).
    """
    names, weights = behavior.weights(keys)
    out = {}
    for stage, effects in per_example_effects.items():
        values = effects if weights is None else weights.to(effects) @ effects
        out[stage] = dict(zip(names, values.tolist(), strict=True))
    return out


def _detached(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in params.items()}


def _directional(
    model: nn.Module,
    params: Mapping[str, Tensor],
    tangent: Mapping[str, Tensor],
    quantity: str,
    inputs: Tensor,
    targets: Tensor,
) -> Tensor:
    """<grad f(params), tangent> for each example's quantity f: one forward-mode jvp."""
    f = partial(per_example, model, inputs=inputs, targets=targets, quantity=quantity)
    return jvp(f, (dict(params),), (dict(tangent),))[1]


def _checked(params: Mapping[str, Tensor], embeddings: Embeddings) -> dict[str, dict[str, Tensor]]:
    """Embeddings cast to their parameters' dtype and device, after checking names, shapes and
    values."""
    checked = {}
    for stage, embedding in embeddings.items():
        checked[stage] = {}
        for name, offset in embedding.items():
            if name not in params:
                known = ", ".join(list(params)[:8]) + (", ..." if len(params) > 8 else "")
                raise StagetraceError(
                    f"stage embedding {stage!r}: key {name!r} is not a parameter of the final "
                    f"model (parameters: {known}). Fix: key stage embeddings by the final model's "
                    "parameter names"
                )
            if offset.shape != params[name].shape:
                raise StagetraceError(
                    f"stage embedding {stage!r}: key {name!r} has shape {list(offset.shape)}, the "
                    f"parameter has shape {list(params[name].shape)}. Fix: give an offset of the "
                    "parameter's shape (theta_T^(-k) - theta_T)"
                )
            if not torch.isfinite(offset).all():
                raise StagetraceError(
                    f"stage embedding {stage!r}: key {name!r} holds NaN or infinite values. "
                    "Fix: recompute the embedding (check the estimator's inputs for divergence)"
                )
            checked[stage][name] = offset.to(params[name])
    return checked


def _device(params: Mapping[str, Tensor], inputs: Tensor) -> torch.device:
    """Where the model's parameters live (batches are moved there one at a time)."""
    return next(iter(params.values()), inputs).device


def _batched(
    fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    batch_size: int,
    device: torch.device,
) -> Tensor:
    """``fn(inputs, targets)`` [N], run on ``device`` over batches of at most ``batch_size``
    examples, returned as float64 on the CPU."""
    if not isinstance(batch_size, int) or batch_size < 1:
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
    )
