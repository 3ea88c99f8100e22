"""Optional experiment tracking: wandb in offline mode, or a no-op (the default).

A task logs its training losses, its effects and result tables (``table``) and its figures
(``image``); the no-op logger ignores all of them. wandb's files stay inside the run directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from attribution.record.errors import SpecError

MODES = ("disabled", "offline")
WANDB_FOLDERS = {"WANDB_CACHE_DIR": "cache", "WANDB_DATA_DIR": "data"}
_SET_BY_USER = frozenset(v for v in WANDB_FOLDERS if v in os.environ)


class NullLogger:
    """Logs nothing."""

    def log(self, metrics: Mapping[str, float]) -> None:
        pass

    def table(self, key: str, rows: Sequence[Mapping[str, Any]]) -> None:
        pass

    def image(self, key: str, path: Path) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger:
    """A wandb run whose files live in ``run_dir/wandb``: wandb's cache (its service logs) and
    data (staged tables) folders are pointed there too, unless set when the process started."""

    def __init__(self, mode: str, project: str, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        own = Path(run_dir) / "wandb"
        for variable, folder in WANDB_FOLDERS.items():
            if variable not in _SET_BY_USER:
                os.environ[variable] = str(own / folder)
        self.wandb = wandb
        self.run = wandb.init(mode=mode, project=project, dir=str(run_dir), config=config)

    def log(self, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics))

    def table(self, key: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Log ``rows`` (dicts with the same keys) as a ``wandb.Table`` under ``key``."""
        if not rows:
            return
        columns = list(rows[0])
        data = [[_cell(row.get(c)) for c in columns] for row in rows]
        self.run.log({key: self.wandb.Table(columns=columns, data=data)})

    def image(self, key: str, path: Path) -> None:
        """Log the image file at ``path`` under ``key``."""
        self.run.log({key: self.wandb.Image(str(path))})

    def finish(self) -> None:
        self.run.finish()


def check_logger(settings: Mapping[str, Any]) -> None:
    """Refuse a logger the run cannot start, before anything is written."""
    mode = settings.get("mode", "disabled")
    if mode not in MODES:
        raise SpecError(
            "logger.mode",
            f"{mode!r} is not supported",
            "use logger=disabled or logger=offline",
        )
    if mode == "offline":
        try:
            import wandb  # noqa: F401
        except ImportError as exc:
            raise SpecError(
                "logger", "logger=offline needs wandb", "pip install 'stagetrace[wandb]'"
            ) from exc


def make_logger(
    settings: Mapping[str, Any], run_dir: Path, config: dict[str, Any]
) -> NullLogger | WandbLogger:
    """The logger that ``settings`` (the ``logger`` config group) asks for."""
    check_logger(settings)
    if settings.get("mode", "disabled") == "disabled":
        return NullLogger()
    return WandbLogger("offline", settings.get("project", "stagetrace"), run_dir, config)


def _cell(value: Any) -> Any:
    """A table cell: numbers and strings as they are, anything else as text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
