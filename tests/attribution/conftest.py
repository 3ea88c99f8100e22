"""Shared fixtures: one tiny three-stage run recorded once per session, copied per test."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from attribution.record.pipeline import run_pipeline
from attribution.record.spec import PipelineSpec
from tests.attribution import tiny

_LORA = [{"kind": "add_lora", "modules": ["fc1"], "rank": 2}]
_TINY = tiny.config(
    pretrain=tiny.stage(
        "pretrain", 1, {"type": "sgd", "momentum": 0.9, "weight_decay": 1e-3}, 0.05
    ),
    finetune=tiny.stage(
        "finetune",
        2,
        {"type": "adamw"},
        1e-3,
        steps=5,
        entry=[{"kind": "reinit", "modules": ["head"]}],
    ),
    adapt=tiny.stage(
        "adapt", 3, {"type": "sgd"}, 0.05, steps=4, trainable=["*.lora_*"], entry=_LORA
    ),
)


def make_tiny_config(**stage_overrides: dict[str, Any]) -> dict[str, Any]:
    """A fresh copy of the tiny pipeline; ``stage=dict(...)`` updates that stage's settings."""
    cfg = copy.deepcopy(_TINY)
    for name, override in stage_overrides.items():
        cfg["stages"][name].update(copy.deepcopy(override))
    return cfg


@pytest.fixture
def tiny_config() -> Callable[..., dict[str, Any]]:
    """The factory ``tiny_config(**stage_overrides) -> pipeline config dict``."""
    return make_tiny_config


@pytest.fixture(scope="session")
def recorded_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline recorded once. Never damage it: use ``run_copy`` for that."""
    root = tmp_path_factory.mktemp("recorded") / "run"
    run_pipeline(PipelineSpec.from_dict(make_tiny_config()), root)
    return root


@pytest.fixture
def run_copy(recorded_run: Path, tmp_path: Path) -> Path:
    """A private copy of the recorded run that a test may damage."""
    return Path(shutil.copytree(recorded_run, tmp_path / "run"))
