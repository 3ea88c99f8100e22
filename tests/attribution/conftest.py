"""Shared fixtures: one tiny three-stage run recorded once per session, copied per test."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from attribution.record.pipeline import run_pipeline
from attribution.record.spec import PipelineSpec
from tests.attribution.tiny import make_tiny_config


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
