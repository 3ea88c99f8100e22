"""A model whose function depends on its mode and buffers: BatchNorm (running statistics) and
dropout, for checking that every behaviour is evaluated in eval mode with each checkpoint's own
buffers. (``torch.func.vmap`` fails on BatchNorm in train mode, so E2 cannot train through it.)"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from tests.attribution import tiny


class NormNet(nn.Module):
    """``fc1`` -> ``norm1`` (BatchNorm1d) -> ReLU -> dropout -> ``head`` logits."""

    def __init__(self, hidden: int = 16, num_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, hidden)
        self.norm1 = nn.BatchNorm1d(hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(self.norm1(self.fc1(x.reshape(x.shape[0], -1))).relu()))


def three_stage() -> dict[str, Any]:
    """Pretrain (SGD + momentum), fine-tune (AdamW), adapt (SGD): every stage moves the
    parameters and the running statistics."""
    return {
        "model": {"target": "tests.attribution.normnet:NormNet", "kwargs": {}},
        "seed": 0,
        "stages": {
            "pretrain": tiny.stage("pretrain", 1, {"type": "sgd", "momentum": 0.9}, 0.05),
            "finetune": tiny.stage("finetune", 2, {"type": "adamw"}, 1e-3, steps=5),
            "adapt": tiny.stage("adapt", 3, {"type": "sgd"}, 0.05, steps=4),
        },
    }
