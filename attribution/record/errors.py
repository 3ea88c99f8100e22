"""Errors raised on bad input. Each one names the thing that is wrong and the fix."""

from __future__ import annotations

from pathlib import Path


class StagetraceError(Exception):
    """A user-facing problem; the message says what is wrong and how to fix it."""


class SpecError(StagetraceError):
    """A declared pipeline or stage is invalid; ``field`` is the dotted path of the bad value."""

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field = field
        super().__init__(f"{field}: {problem}. Fix: {fix}")


class TrajectoryError(StagetraceError):
    """A recorded trajectory is damaged, inconsistent or of another schema version."""

    def __init__(self, path: Path | str, problem: str, fix: str, field: str | None = None) -> None:
        self.path = Path(path)
        self.field = field
        where = f"{path} (field {field})" if field else f"{path}"
        super().__init__(f"{where}: {problem}. Fix: {fix}")


class UnknownStageError(StagetraceError):
    """A stage name that the trajectory does not contain."""

    def __init__(self, name: str, known: list[str]) -> None:
        fix = f"use one of {', '.join(known)}" if known else "record the run's stages first"
        recorded = "in this trajectory" if known else "(the trajectory records no stage yet)"
        super().__init__(f"no stage named {name!r} {recorded}. Fix: {fix}")


class TrainingError(StagetraceError):
    """Training produced a non-finite loss or gradient."""
