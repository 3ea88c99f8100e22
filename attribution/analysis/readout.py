"""The two read-outs: from stage embeddings to stage effects on a behaviour.

A stage embedding SE_k is a dict {name: tensor} estimating theta_T^(-k) - theta_T, the offset from
the final model's state to that of the run without stage k, over its parameters and, where the
estimator gives them, its floating-point buffers (BatchNorm running statistics; names it lacks
have offset 0). With the project's sign convention effect_k(f) = f(theta_T) - f(theta_T^(-k)):

- linear: effect_k(f) ~= -<grad f(theta_T), SE_k>, one forward-mode jvp of the batch's
  per-example quantities along SE_k (``attribution.record.evaluation.directional``);
- evaluated: effect_k(f) ~= f(theta_T) - f(theta_T + SE_k), one forward pass; exact whenever
  SE_k is.

The final model is a ``ModelAt`` (eval mode, its checkpoint's buffers). Both read-outs run per
example in batches of ``batch_size`` examples, so memory is bounded by one batch's forward pass
(never an N x p matrix of per-example gradients), and return per-example effects ([N] float64,
in the units of the quantity) that ``behaviour_effects`` aggregates.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from attribution.analysis.behaviors import Behavior
from attribution.record.errors import StagetraceError
from attribution.record.evaluation import ModelAt, directional

Embeddings = Mapping[str, Mapping[str, Tensor]]


def linear_effects(
    model: ModelAt,
    embeddings: Embeddings,
    inputs: Tensor,
    targets: Tensor,
    quantity: str,
    batch_size: int = 512,
) -> dict[str, Tensor]:
    """Per stage, the [N] float64 effects -<grad f(theta_T), SE_k> of the per-example quantity,
    ``model`` being the final model theta_T. One jvp per stage per batch."""
    return {
        stage: -directional(model, embedding, inputs, targets, quantity, batch_size)
        for stage, embedding in _checked(model, embeddings).items()
    }


def evaluated_effects(
    model: ModelAt,
    embeddings: Embeddings,
    inputs: Tensor,
    targets: Tensor,
    quantity: str,
    batch_size: int = 512,
) -> dict[str, Tensor]:
    """Per stage, the [N] float64 effects f(theta_T) - f(theta_T + SE_k) per example,
    ``model`` being the final model theta_T. One forward pass per stage per batch, plus one for
    f(theta_T)."""
    checked = _checked(model, embeddings)
    final = model.values(inputs, targets, quantity, batch_size)
    return {
        stage: final - model.moved(embedding).values(inputs, targets, quantity, batch_size)
        for stage, embedding in checked.items()
    }


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


def _checked(model: ModelAt, embeddings: Embeddings) -> dict[str, dict[str, Tensor]]:
    """Embeddings on the model's device (float64), after checking names, shapes and values:
    offsets may address the final model's parameters and floating-point buffers."""
    point = model.point
    checked = {}
    for stage, embedding in embeddings.items():
        checked[stage] = {}
        for name, offset in embedding.items():
            if name not in point:
                known = ", ".join(list(point)[:8]) + (", ..." if len(point) > 8 else "")
                raise StagetraceError(
                    f"stage embedding {stage!r}: key {name!r} is not a parameter or "
                    f"floating-point buffer of the final model (they are: {known}). Fix: key "
                    "stage embeddings by the final model's parameter and buffer names"
                )
            if offset.shape != point[name].shape:
                raise StagetraceError(
                    f"stage embedding {stage!r}: key {name!r} has shape {list(offset.shape)}, the "
                    f"model's tensor has shape {list(point[name].shape)}. Fix: give an offset of "
                    "its shape (theta_T^(-k) - theta_T)"
                )
            if not torch.isfinite(offset).all():
                raise StagetraceError(
                    f"stage embedding {stage!r}: key {name!r} holds NaN or infinite values. "
                    "Fix: recompute the embedding (check the estimator's inputs for divergence)"
                )
            checked[stage][name] = offset.to(point[name].device, torch.float64)
    return checked
