"""Toy problems with known answers, as importable references for recorded pipelines.

``Additive`` is linear in its parameters: with ``linear_loss`` the training loss is linear in
theta (zero Hessian), with ``mse`` it is quadratic (constant Hessian, affine SGD steps).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


class Additive(nn.Module):
    """``body(x) + head(x)``: two linear maps summed, float64, so linear in every parameter."""

    def __init__(self, in_features: int = 5, out_features: int = 1) -> None:
        super().__init__()
        self.body = nn.Linear(in_features, out_features, dtype=torch.float64)
        self.head = nn.Linear(in_features, out_features, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.head(x)


def regression(
    n: int = 64, in_features: int = 5, seed: int = 0, shift: float = 0.0
) -> TensorDataset:
    """Gaussian inputs (mean ``shift``) and noisy linear targets, float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g, dtype=torch.float64) + shift
    w = torch.linspace(-1.0, 1.0, in_features, dtype=torch.float64)
    y = (x @ w + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)).unsqueeze(1)
    return TensorDataset(x, y)


def linear_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-mean(outputs * targets)``: linear in the outputs, so in theta for ``Additive``."""
    return -(outputs * targets).mean()


def pipeline(
    loss: str,
    optimizers: list[dict],
    policies: list[str],
    lrs: list[float],
    reinit_head_in: int | None = None,
    steps: int = 12,
) -> dict:
    """A pipeline config of ``Additive`` stages on shifted regression data."""
    stages = {}
    for i, (optimizer, policy, lr) in enumerate(zip(optimizers, policies, lrs, strict=True)):
        stages[f"s{i}"] = {
            "kind": "pretrain" if i == 0 else "finetune",
            "data": {
                "target": "tests.estimators.toy:regression",
                "kwargs": {"seed": i, "shift": 0.5 * i},
            },
            "loss": loss,
            "optimizer": optimizer,
            "lr": lr,
            "batch_size": 16,
            "steps": steps,
            "seed": 10 + i,
            "optimizer_policy": policy,
            "schedule": {"name": "cosine"},
            "entry": [{"kind": "reinit", "modules": ["head"]}] if i == reinit_head_in else [],
        }
    return {"model": {"target": "tests.estimators.toy:Additive", "kwargs": {}}, "stages": stages}
