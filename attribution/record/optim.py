"""The optimizers a stage may use, built from resolved parameter groups, and their state by name.

Supported: ``sgd`` (momentum, dampening, Nesterov, coupled weight decay), ``sgdw`` (SGD with
decoupled weight decay), ``adam`` (coupled weight decay) and ``adamw``. Optimizer state is stored
keyed by parameter name (``{name: {"momentum_buffer": ..., "exp_avg": ..., "step": ...}}``) so it
survives changes of the trainable set between stages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
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


def steps_with_frozen_gradient(
    optimizer: torch.optim.Optimizer, lrs: Sequence[Sequence[float]]
) -> None:
    """Take ``len(lrs)`` optimizer steps, step i with learning rate ``lrs[i][g]`` in group g,
    all with the gradients now in ``.grad`` (held fixed): what the optimizer would do if the
    loss's gradient did not change over those steps.

    One step is ``optimizer.step()`` itself. Over several, SGD and SGDW advance in closed form:
    their parameters and momentum buffers after the steps are a linear combination of those
    before and of the gradient, with coefficients (scalars per group: learning rates, momentum,
    dampening, Nesterov, both weight decays, a buffer that does not exist yet) computed in
    float64, so the steps cost one pass over the parameters instead of one each. Adam and AdamW
    take their steps one by one."""
    if len(lrs) > 1 and isinstance(optimizer, torch.optim.SGD):
        _sgd_frozen(optimizer, lrs)
        return
    for row in lrs:
        for group, lr in zip(optimizer.param_groups, row, strict=True):
            group["lr"] = lr
        optimizer.step()


@torch.no_grad()
def _sgd_frozen(optimizer: torch.optim.SGD, lrs: Sequence[Sequence[float]]) -> None:
    """``steps_with_frozen_gradient`` for SGD and SGDW: torch's update, per step with gradient
    ``g``, parameter ``p``, buffer ``b`` (coupled decay ``wd``, decoupled ``dd``, momentum
    ``mu``, dampening ``d``)::

        r = g + wd * p;  p = (1 - lr * dd) * p
        b = r if there is no buffer yet, else mu * b + (1 - d) * r
        p = p - lr * (r + mu * b if nesterov else b)   (p - lr * r without momentum)

    is linear in (p, b, g), so p and b are tracked as coefficients on the starting (p0, b0, g)
    and formed once at the end."""
    for i, group in enumerate(optimizer.param_groups):
        params = [p for p in group["params"] if p.grad is not None]
        if group["momentum"] == 0:
            p, _ = _sgd_coefficients(group, [row[i] for row in lrs], fresh=False)
            torch._foreach_mul_(params, float(p[0]))
            torch._foreach_add_(params, [q.grad for q in params], alpha=float(p[2]))
            continue
        for fresh in (False, True):
            chosen = [
                q for q in params if (optimizer.state[q].get("momentum_buffer") is None) == fresh
            ]
            if not chosen:
                continue
            p, b = _sgd_coefficients(group, [row[i] for row in lrs], fresh)
            grads = [q.grad for q in chosen]
            buffers = torch._foreach_mul(chosen, float(b[0]))
            torch._foreach_add_(buffers, grads, alpha=float(b[2]))
            torch._foreach_mul_(chosen, float(p[0]))
            torch._foreach_add_(chosen, grads, alpha=float(p[2]))
            for q, buffer in zip(chosen, buffers, strict=True):
                old = optimizer.state[q].get("momentum_buffer")
                if old is not None:  # fresh parameters start from no buffer: b0 plays no part
                    q.add_(old, alpha=float(p[1]))
                    buffer.add_(old, alpha=float(b[1]))
                optimizer.state[q]["momentum_buffer"] = buffer
    for group, lr in zip(optimizer.param_groups, lrs[-1], strict=True):
        group["lr"] = lr


def _sgd_coefficients(
    group: Mapping[str, Any], lrs: Sequence[float], fresh: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The coefficients on (p0, b0, g) of the parameter and the buffer after SGD steps with
    learning rates ``lrs`` and the gradient g fixed; ``fresh``: no buffer exists before."""
    mu, damp, wd = group["momentum"], group["dampening"], group["weight_decay"]
    decay = group.get("decoupled_weight_decay", 0.0)
    p, b, g = np.eye(3)
    for step, lr in enumerate(lrs):
        r = g + wd * p
        p = (1.0 - lr * decay) * p
        if mu == 0:
            p = p - lr * r
            continue
        b = r if fresh and step == 0 else mu * b + (1.0 - damp) * r
        p = p - lr * (r + mu * b if group["nesterov"] else b)
    return p, b
