"""The two read-outs: from stage embeddings to stage effects on a behaviour.

A stage embedding SE_k is a dict {name: tensor} estimating theta_T^(-k) - theta_T, the offset from
the final model's state to that of the run without stage k, over its parameters and, where the
estimator gives them, its floating-point buffers (BatchNorm running statistics; names it lacks
have offset 0). With the project's sign convention effect_k(f) = f(theta_T) - f(theta_T^(-k)):

- linear: effect_k(f) ~= -<grad f(theta_T), SE_k>, the derivative of the batch's per-example
  quantities along SE_k for all K stages at once: in reverse mode, contracted where the
  parameters are used, or a forward-mode jvp vectorised over the tangents
  (``attribution.record.evaluation.derivatives_along``);
- evaluated: effect_k(f) ~= f(theta_T) - f(theta_T + SE_k), one forward pass per parameter set
  and batch, theta_T's once for all K stages (``values_along``); exact whenever SE_k is.

The final model is a ``ModelAt`` (eval mode, its checkpoint's buffers). Both read-outs run on
the device of ``attribution.record.compute.current()``, in its dtype where that is not float32
(``ModelAt.placed``: a bfloat16 read-out is a cheaper approximation; docs/scale.md), and per
example in batches of ``batch_size`` examples, so memory is bounded by one batch's forward pass
for K + 1 parameter sets (never an N x p matrix of per-example gradients), and return
per-example effects ([N] float64, in the units of the quantity; memory-mapped beyond
``MEMMAP_ABOVE`` numbers, docs/scale.md) that ``behaviour_effects`` aggregates.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from attribution.analysis.behaviors import Behavior
from attribution.record.compute import current
from attribution.record.errors import StagetraceError
from attribution.record.evaluation import (
    ModelAt,
    batched,
    derivatives_along,
    evaluation_dtype,
    values_along,
)

Embeddings = Mapping[str, Mapping[str, Tensor]]


def linear_effects(
    model: ModelAt,
    embeddings: Embeddings,
    inputs: Tensor,
    targets: Tensor,
    quantity: str,
    batch_size: int = 512,
    memmap_above: int | None = None,
    contract: bool = True,
) -> dict[str, Tensor]:
    """Per stage, the [N] float64 effects -<grad f(theta_T), SE_k> of the per-example quantity,
    ``model`` being the final model theta_T. Per batch, all K embeddings at once
    (``derivatives_along``): in reverse mode, contracted where the parameters are used (one
    forward, one backward and about one forward per stage), or, without ``contract`` or where
    that does not apply, ONE forward-mode jvp vectorised over them (the primal pass once, the K
    tangent passes batched; one jvp per stage where vmap cannot run the model). Beyond
    ``memmap_above`` results (K x N; default ``memmap_above()``) they are memory-mapped
    (``Results``)."""
    checked = _checked(model, embeddings)
    along = derivatives_along(model, list(checked.values()), quantity, contract)

    def effects(x: Tensor, y: Tensor) -> Tensor:
        return -along(x, y)

    return _per_stage(effects, checked, inputs, targets, batch_size, memmap_above)


def evaluated_effects(
    model: ModelAt,
    embeddings: Embeddings,
    inputs: Tensor,
    targets: Tensor,
    quantity: str,
    batch_size: int = 512,
    memmap_above: int | None = None,
) -> dict[str, Tensor]:
    """Per stage, the [N] float64 effects f(theta_T) - f(theta_T + SE_k) per example,
    ``model`` being the final model theta_T. Per batch, one forward pass for each of the K + 1
    parameter sets theta_T, theta_T + SE_1, ... (``values_along``), differenced in float64.
    Beyond ``memmap_above`` results (K x N; default ``memmap_above()``) they are memory-mapped
    (``Results``)."""
    checked = _checked(model, embeddings)
    along = values_along(model, [{}, *checked.values()], quantity)

    def effects(x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            values = along(x, y).to(torch.float64)
        return values[0] - values[1:]

    return _per_stage(effects, checked, inputs, targets, batch_size, memmap_above)


def _per_stage(
    effects: Callable[[Tensor, Tensor], Tensor],
    checked: Mapping[str, Any],
    inputs: Tensor,
    targets: Tensor,
    batch_size: int,
    memmap_above: int | None,
) -> dict[str, Tensor]:
    """{stage: [N] effects}: ``effects`` run over the examples in batches on the compute's device
    and precision, giving one row per stage of ``checked``."""
    out = batched(
        effects,
        inputs,
        targets,
        batch_size,
        current().torch_device,
        len(checked),
        memmap_above,
        evaluation_dtype(),
    )
    return dict(zip(checked, out, strict=True))


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
    """Embeddings on the model's device (float64; the read-outs place them on the compute's),
    after checking names, shapes and values: offsets may address the final model's parameters
    and floating-point buffers."""
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
