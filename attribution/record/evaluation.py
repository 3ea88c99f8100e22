"""The one evaluator of a model on data: per-example quantities of a model run with given
parameters, as a differentiable function (for jvps and gradients) and in batches.

Units: ``loss`` is cross-entropy in nats; ``margin`` is the true-class logit minus the largest
other logit, in logit units.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from attribution.record.errors import SpecError

QUANTITIES = ("loss", "margin")


def per_example(
    model: nn.Module, params: Mapping[str, Tensor], inputs: Tensor, targets: Tensor, quantity: str
) -> Tensor:
    """The per-example ``quantity`` [N] of ``model`` run with ``params`` (and its own buffers).

    ``loss``: cross-entropy in nats; ``margin``: true-class logit minus the largest other logit.
    Differentiable in ``params`` (works under ``torch.func.jvp``).
    """
    logits = functional_call(model, {**params, **dict(model.named_buffers())}, (inputs,))
    if quantity == "loss":
        return F.cross_entropy(logits, targets, reduction="none")
    if quantity == "margin":
        true = logits.gather(-1, targets[:, None]).squeeze(-1)
        others = logits.masked_fill(F.one_hot(targets, logits.shape[-1]).bool(), float("-inf"))
        return true - others.amax(-1)
    raise SpecError("quantity", f"unknown quantity {quantity!r}", f"use one of {QUANTITIES}")
