"""Test-set metrics of a classifier: mean cross-entropy loss and accuracy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset


@dataclass(frozen=True)
class Metrics:
    loss: float
    accuracy: float


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset, batch_size: int = 1000) -> Metrics:
    """Mean cross-entropy (nats) and accuracy (fraction) of ``model`` on ``data``."""
    model.eval()
    inputs, targets = data.tensors
    total_loss, correct = 0.0, 0
    for lo in range(0, len(targets), batch_size):
        logits = model(inputs[lo : lo + batch_size])
        y = targets[lo : lo + batch_size]
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    return Metrics(total_loss / len(targets), correct / len(targets))
