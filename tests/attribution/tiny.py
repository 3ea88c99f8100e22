"""Tiny real pipelines (MNIST slices, a 16-unit MLP) that train in well under a second."""

from __future__ import annotations

import copy
from typing import Any

DATA = {"target": "experiments.data:mnist", "kwargs": {"stop": 600}}


def stage(
    kind: str, seed: int, optimizer: dict[str, Any], lr: float, steps: int = 6, **extra: Any
) -> dict[str, Any]:
    return {
        "kind": kind,
        "data": copy.deepcopy(DATA),
        "optimizer": optimizer,
        "lr": lr,
        "batch_size": 32,
        "steps": steps,
        "seed": seed,
        **extra,
    }


def config(**stages: dict[str, Any]) -> dict[str, Any]:
    """A pipeline over the given stages (in keyword order) for ``MLP(hidden=[16])``."""
    return {
        "model": {"target": "experiments.models:MLP", "kwargs": {"hidden": [16]}},
        "seed": 0,
        "stages": stages,
    }


SGD_MOMENTUM = {"type": "sgd", "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-3}
NESTEROV = {"type": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}
SGDW = {"type": "sgdw", "momentum": 0.8, "weight_decay": 0.05}
ADAMW = {"type": "adamw", "weight_decay": 0.01}
ADAM = {"type": "adam", "weight_decay": 1e-3}


def three_stage(policy: str = "reset", adapt_policy: str | None = None) -> dict[str, Any]:
    """Pretrain (SGD+momentum), fine-tune with head re-init, adapt with LoRA on fc1; the
    optimizer policy of fine-tune is ``policy``, of adapt ``adapt_policy`` (default: the same)."""
    return config(
        pretrain=stage("pretrain", 1, SGD_MOMENTUM, 0.05, schedule={"name": "cosine"}),
        finetune=stage(
            "finetune",
            2,
            NESTEROV,
            0.02,
            entry=[{"kind": "reinit", "modules": ["head"]}],
            optimizer_policy=policy,
        ),
        adapt=stage(
            "adapt",
            3,
            NESTEROV,
            0.05,
            trainable=["*.lora_*", "head.*"],
            entry=[{"kind": "add_lora", "modules": ["fc1"], "rank": 2}],
            optimizer_policy=adapt_policy or policy,
        ),
    )


_LORA = [{"kind": "add_lora", "modules": ["fc1"], "rank": 2}]
_TINY = config(
    pretrain=stage("pretrain", 1, {"type": "sgd", "momentum": 0.9, "weight_decay": 1e-3}, 0.05),
    finetune=stage(
        "finetune",
        2,
        {"type": "adamw"},
        1e-3,
        steps=5,
        entry=[{"kind": "reinit", "modules": ["head"]}],
    ),
    adapt=stage("adapt", 3, {"type": "sgd"}, 0.05, steps=4, trainable=["*.lora_*"], entry=_LORA),
)


def make_tiny_config(**stage_overrides: dict[str, Any]) -> dict[str, Any]:
    """A fresh copy of the tiny pipeline; ``stage=dict(...)`` updates that stage's settings."""
    cfg = copy.deepcopy(_TINY)
    for name, override in stage_overrides.items():
        cfg["stages"][name].update(copy.deepcopy(override))
    return cfg
