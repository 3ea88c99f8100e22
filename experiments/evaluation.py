"""Test-set metrics of a classifier: mean cross-entropy loss and accuracy, computed by the one
evaluator (``attribution.record.evaluation``: eval mode, the checkpoint's own buffers)."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import TensorDataset

from attribution.record.evaluation import ModelAt


@dataclass(frozen=True)
class Metrics:
    """Mean cross-entropy (nats) and accuracy (fraction)."""

    loss: float
    accuracy: float


def evaluate(model: ModelAt, data: TensorDataset, batch_size: int = 1000) -> Metrics:
    """Mean cross-entropy (nats) and accuracy (fraction) of ``model`` on ``data`` (inputs and
    labels first)."""
    inputs, targets = data.tensors[:2]
    loss = model.values(inputs, targets, "loss", batch_size)
    correct = model.values(inputs, targets, "correct", batch_size)
    return Metrics(float(loss.mean()), float(correct.mean()))
