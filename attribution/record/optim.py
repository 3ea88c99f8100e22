"""The optimizers a stage may use, built from resolved parameter groups, and their state by name.

Supported: ``sgd`` (momentum, dampening, Nesterov, coupled weight decay), ``sgdw`` (SGD with
decoupled weight decay), ``adam`` (coupled weight decay) and ``adamw``. Optimizer state is stored
keyed by parameter name (``{name: {"momentum_buffer": ..., "exp_avg": ..., "step": ...}}``) so it
survives changes of the trainable set between stages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "sgd": {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0},
    "sgdw": {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0},
    "adam": {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01},
}

OptimizerState = dict[str, dict[str, torch.Tensor]]


class SGDW(torch.optim.SGD):
    """SGD with decoupled weight decay: ``p <- (1 - lr * weight_decay) * p``, then a plain SGD step.

    The decay does not enter the momentum buffer (as in AdamW), which is what "decoupled" means.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        self._default_decay = weight_decay
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=0.0,
            nesterov=nesterov,
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        decay = param_group.pop("weight_decay", self._default_decay)
        param_group["decoupled_weight_decay"] = decay
        param_group["weight_decay"] = 0.0
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            factor = 1.0 - group["lr"] * group["decoupled_weight_decay"]
            for p in group["params"]:
                if p.grad is not None:
                    p.mul_(factor)
        return super().step(closure)


_CLASSES = {
    "sgd": torch.optim.SGD,
    "sgdw": SGDW,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


def build_optimizer(
    kind: str, groups: Sequence[tuple[Sequence[torch.Tensor], Mapping[str, Any]]]
) -> torch.optim.Optimizer:
    """An optimizer of ``kind`` over ``groups`` of (parameters, hyperparameters incl. ``lr``)."""
    param_groups = []
    for params, hyper in groups:
        group = {"params": list(params), **hyper}
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        param_groups.append(group)
    return _CLASSES[kind](param_groups, lr=param_groups[0]["lr"])


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """The name of a supported optimizer instance, or ``ValueError`` saying what is supported."""
    for name, cls in _CLASSES.items():
        if type(optimizer) is cls:
            if name == "adam" and optimizer.param_groups[0].get("decoupled_weight_decay"):
                return "adamw"
            return name
    raise ValueError(
        f"optimizer {type(optimizer).__name__} is not supported; use one of "
        "torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, attribution.record.optim.SGDW"
    )


def group_hyperparameters(kind: str, group: Mapping[str, Any]) -> dict[str, Any]:
    """The recorded hyperparameters of one torch param group (``lr`` excluded: it is per step)."""
    for flag in ("maximize", "amsgrad", "differentiable", "fused", "capturable"):
        if group.get(flag):
            raise ValueError(f"optimizer option {flag}=True is not supported; turn it off")
    hyper = {}
    for key in HYPERPARAMETERS[kind]:
        value = (
            group["decoupled_weight_decay"]
            if kind == "sgdw" and key == "weight_decay"
            else group[key]
        )
        hyper[key] = list(value) if isinstance(value, tuple) else value
    return hyper


def state_by_name(optimizer: torch.optim.Optimizer, names: Mapping[int, str]) -> OptimizerState:
    """A detached copy of the optimizer state keyed by parameter name (``names``: id -> name)."""
    out: OptimizerState = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            entries = {
                k: v.detach().clone()
                for k, v in optimizer.state.get(p, {}).items()
                if isinstance(v, torch.Tensor)
            }
            if entries:
                out[names[id(p)]] = entries
    return out


def load_state_by_name(
    optimizer: torch.optim.Optimizer, state: OptimizerState, names: Mapping[int, str]
) -> None:
    """Give each parameter of ``optimizer`` a copy of its entry in ``state`` (if it has one)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = state.get(names[id(p)])
            if entry:
                optimizer.state[p] = {k: v.detach().clone() for k, v in entry.items()}
