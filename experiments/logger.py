"""Optional experiment tracking: wandb in offline mode, or a no-op (the default)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


class NullLogger:
    """Logs nothing."""

    def log(self, metrics: Mapping[str, float]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger:
    """A wandb run whose files live in ``run_dir`` (never in the repository)."""

    def __init__(self, mode: str, project: str, run_dir: Path, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise RuntimeError(
                "logger=offline needs wandb. Fix: pip install 'stagetrace[wandb]' "
                "or use logger=disabled"
            ) from exc
        self.run = wandb.init(mode=mode, project=project, dir=str(run_dir), config=config)

    def log(self, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics))

    def finish(self) -> None:
        self.run.finish()


def make_logger(
    settings: Mapping[str, Any], run_dir: Path, config: dict[str, Any]
) -> NullLogger | WandbLogger:
    """The logger that ``settings`` (the ``logger`` config group) asks for."""
    mode = settings.get("mode", "disabled")
    if mode == "disabled":
        return NullLogger()
    if mode != "offline":
        raise ValueError(f"logger.mode={mode!r} is not supported. Fix: use disabled or offline")
    return WandbLogger(mode, settings.get("project", "stagetrace"), run_dir, config)
