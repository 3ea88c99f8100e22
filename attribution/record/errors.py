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
    """A recorded trajectory is damaged, inconsistent, of another schema version, or cannot be
    used as asked. ``path`` is the file or directory at fault (None when the problem lies in a
    stage rather than a file), ``stage`` the stage's name, ``step`` the step (0-based) within it,
    ``field`` the dotted manifest field or tensor key."""

    def __init__(
        self,
        path: Path | str | None,
        problem: str,
        fix: str,
        field: str | None = None,
        *,
        stage: str | None = None,
        step: int | None = None,
    ) -> None:
        self.path = None if path is None else Path(path)
        self.field, self.stage, self.step = field, stage, step
        details = [
            f"stage {stage!r}" if stage is not None and path is not None else None,
            f"step {step}" if step is not None else None,
            f"field {field}" if field else None,
        ]
        head = str(path) if path is not None else f"stage {stage!r}" if stage else "trajectory"
        listed = ", ".join(d for d in details if d)
        where = f"{head} ({listed})" if listed else head
        super().__init__(f"{where}: {problem}. Fix: {fix}")


class UnknownStageError(StagetraceError):
    """A stage name that the trajectory does not contain."""

    def __init__(self, name: str, known: list[str]) -> None:
        fix = f"use one of {', '.join(known)}" if known else "record the run's stages first"
        recorded = "in this trajectory" if known else "(the trajectory records no stage yet)"
        super().__init__(f"no stage named {name!r} {recorded}. Fix: {fix}")


class TrainingError(StagetraceError):
    """Training produced a non-finite loss or gradient."""
