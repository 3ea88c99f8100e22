"""A Hugging Face ``Trainer`` output folder, read from its JSON and weights-only files.

``training_args.bin`` is a pickle of arbitrary objects and is never opened; everything needed
(steps, batch size, logged learning rates) is in ``trainer_state.json``. ``optimizer.pt`` and
``scheduler.pt`` are read with ``torch.load(weights_only=True)`` only.

The learning-rate log: ``log_history`` holds, at every logged step s (the count of optimizer
steps taken), ``learning_rate``. Current transformers log the rate step s used (the spec's
``expected[s - 1]``, 0-based); older releases logged the rate of the next step
(``expected[s]``). ``TrainerRun.check_learning_rates`` finds which of the two the log holds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attribution.record.errors import StagetraceError, TrajectoryError
from attribution.record.loaders.weights import load_torch_file, read_json

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE = "trainer_state.json"
REL_TOL = 1e-6
FIELDS = ("global_step", "max_steps", "logging_steps", "train_batch_size")


@dataclass(frozen=True)
class LRCheck:
    """How the Trainer's logged rates line up with the declared ones: ``offset`` 0 when the rate
    logged at step s is the one step s used, 1 when it is the next step's; ``note`` says so in
    words; ``max_rel_error`` is the largest relative difference over the ``steps`` compared."""

    offset: int
    note: str
    max_rel_error: float
    steps: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "offset": self.offset,
            "note": self.note,
            "max_rel_error": self.max_rel_error,
            "steps": list(self.steps),
        }


@dataclass(frozen=True)
class TrainerRun:
    """A Trainer run: its ``checkpoints`` (global step -> ``checkpoint-N`` folder), the
    ``global_step`` of the latest, ``max_steps``, ``logging_steps``, ``train_batch_size`` (per
    device) and the logged ``learning_rates`` (logged step -> rate), from ``trainer_state.json``
    of the latest checkpoint."""

    folder: Path
    checkpoints: dict[int, Path]
    global_step: int
    max_steps: int
    logging_steps: int
    train_batch_size: int
    learning_rates: dict[int, float]

    def optimizer_state(self, step: int) -> dict[str, Any]:
        """The optimizer's ``state_dict()`` saved at ``step`` (``optimizer.pt``)."""
        return self._saved(step, "optimizer.pt")

    def scheduler_state(self, step: int) -> dict[str, Any]:
        """The learning-rate scheduler's ``state_dict()`` saved at ``step`` (``scheduler.pt``)."""
        return self._saved(step, "scheduler.pt")

    def check_learning_rates(self, expected: Sequence[float], stage: str) -> LRCheck:
        """Check the logged rates against ``expected[t]``, the rate of optimizer step t
        (0-based) as declared for ``stage``; relative tolerance 1e-6. Raises, naming the first
        step that differs, when neither the rate used by the step nor the next one matches."""
        if not self.learning_rates:
            raise StagetraceError(
                f"stage {stage!r}: {self.folder} logs no learning rate, so the declared schedule "
                "cannot be checked. Fix: train with logging_steps set (every logged step records "
                "its rate)"
            )
        longest = max(self.learning_rates)
        if longest > len(expected):
            raise StagetraceError(
                f"stage {stage!r}: the Trainer logged step {longest} but the spec declares "
                f"{len(expected)} steps. Fix: declare the stage's {self.global_step} steps, or "
                "point it at the Trainer run it describes"
            )
        trials = {offset: self._compare(expected, offset) for offset in (0, 1)}
        fits = [o for o, (bad, _, steps) in trials.items() if bad is None and steps]
        if not fits:
            step = trials[0][0]
            logged = self.learning_rates[step]
            nxt = f"{expected[step]:.10g}" if step < len(expected) else "none declared"
            raise StagetraceError(
                f"stage {stage!r}: the Trainer logged learning rate {logged:.10g} at step "
                f"{step}, but the spec's rate for that step is {expected[step - 1]:.10g} (and "
                f"for the next step {nxt}, which older transformers logged). Fix: declare the "
                "schedule the Trainer ran (learning_rate, lr_scheduler_type, warmup, max_steps)"
            )
        offset = fits[0]
        _, error, steps = trials[offset]
        if len(fits) == 2:
            note = (
                "the logged rates match the declared ones both as the rate each logged step "
                "used and as the next step's (the schedule is flat there), so the log cannot "
                "tell which transformers convention it follows"
            )
        elif offset == 0:
            note = "the rate logged at step s is the rate step s used (current transformers)"
        else:
            note = (
                "the rate logged at step s is the rate of step s + 1, one step ahead of the "
                "rate step s used (older transformers logged after the scheduler stepped); "
                "the declared rates match once shifted by one step"
            )
        return LRCheck(offset=offset, note=note, max_rel_error=error, steps=steps)

    def to_json(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "checkpoints": {str(s): str(p) for s, p in sorted(self.checkpoints.items())},
            "global_step": self.global_step,
            "max_steps": self.max_steps,
            "logging_steps": self.logging_steps,
            "train_batch_size": self.train_batch_size,
            "learning_rates": {str(s): lr for s, lr in sorted(self.learning_rates.items())},
        }

    def _compare(
        self, expected: Sequence[float], offset: int
    ) -> tuple[int | None, float, tuple[int, ...]]:
        """(first differing step or None, largest relative error, steps compared): logged step s
        against ``expected[s - 1 + offset]``, skipping steps the declared rates do not reach."""
        error, steps = 0.0, []
        for step, logged in sorted(self.learning_rates.items()):
            index = step - 1 + offset
            if not 0 <= index < len(expected):
                continue
            want = float(expected[index])
            if not math.isclose(logged, want, rel_tol=REL_TOL, abs_tol=0.0):
                return step, math.inf, tuple(steps)
            error = max(error, abs(logged - want) / max(abs(want), abs(logged), 1e-300))
            steps.append(step)
        return None, error, tuple(steps)

    def _saved(self, step: int, name: str) -> dict[str, Any]:
        if step not in self.checkpoints:
            raise StagetraceError(
                f"{self.folder}: no checkpoint at step {step}. Fix: use one of "
                f"{', '.join(map(str, sorted(self.checkpoints)))}"
            )
        path = self.checkpoints[step] / name
        if not path.is_file():
            raise TrajectoryError(
                path,
                "file is missing",
                "keep the Trainer's optimizer and scheduler files (save_only_model=False)",
            )
        state = load_torch_file(path)
        if not isinstance(state, dict):
            raise TrajectoryError(
                path,
                f"holds a {type(state).__name__}, not a state dict",
                "restore the file the Trainer wrote into this checkpoint",
            )
        return state


def load_trainer_run(folder: Path | str) -> TrainerRun:
    """A Trainer ``output_dir`` holding ``checkpoint-N`` folders, or one ``checkpoint-N``.

    Checks that every checkpoint's own ``trainer_state.json`` says it was saved at step N and
    holds the log of the latest up to N, and that ``global_step <= max_steps``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise TrajectoryError(folder, "folder is missing", "give a Trainer output_dir")
    if CHECKPOINT.match(folder.name) and (folder / STATE).is_file():
        checkpoints = {int(CHECKPOINT.match(folder.name)[1]): folder}
    else:
        checkpoints = {
            int(m[1]): p for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))
        }
    if not checkpoints:
        raise TrajectoryError(
            folder,
            "holds no checkpoint-N folder with a trainer_state.json",
            "give the Trainer's output_dir after it saved a checkpoint (save_strategy='steps')",
        )
    states = {step: _state(path / STATE) for step, path in checkpoints.items()}
    latest = max(checkpoints)
    log = states[latest]["log_history"]
    for step, state in sorted(states.items()):
        path = checkpoints[step] / STATE
        if state["global_step"] != step:
            raise TrajectoryError(
                path,
                f"says global_step {state['global_step']}, but its folder is checkpoint-{step}",
                "keep each checkpoint-N folder as the Trainer wrote it",
                field="global_step",
            )
        if state["log_history"] != [e for e in log if e.get("step", 0) <= step]:
            raise TrajectoryError(
                path,
                f"its log_history disagrees with the latest checkpoint's (checkpoint-{latest}) "
                f"up to step {step}: they are not from the same run",
                "keep only the checkpoints of one Trainer run in the folder",
                field="log_history",
            )
    state = states[latest]
    path = checkpoints[latest] / STATE
    if state["global_step"] > state["max_steps"]:
        raise TrajectoryError(
            path,
            f"global_step {state['global_step']} exceeds max_steps {state['max_steps']}",
            "the file was edited or damaged; restore the Trainer's own",
            field="global_step",
        )
    rates: dict[int, float] = {}
    for entry in log:
        if "learning_rate" not in entry:
            continue
        step = entry.get("step")
        if not isinstance(step, int) or not 0 < step <= state["global_step"]:
            raise TrajectoryError(
                path,
                f"log_history has a learning rate at step {step!r}, outside the run's "
                f"steps 1..{state['global_step']}",
                "the file was edited or damaged; restore the Trainer's own",
                field="log_history",
            )
        if step in rates and rates[step] != entry["learning_rate"]:
            raise TrajectoryError(
                path,
                f"log_history gives step {step} two learning rates",
                "the file was edited or damaged; restore the Trainer's own",
                field="log_history",
            )
        rates[step] = float(entry["learning_rate"])
    return TrainerRun(
        folder=folder,
        checkpoints=dict(sorted(checkpoints.items())),
        global_step=state["global_step"],
        max_steps=state["max_steps"],
        logging_steps=state["logging_steps"],
        train_batch_size=state["train_batch_size"],
        learning_rates=rates,
    )


def _state(path: Path) -> dict[str, Any]:
    """``trainer_state.json`` with its fields type-checked."""
    fix = "restore the trainer_state.json the Trainer wrote into this checkpoint"
    state = read_json(path, fix)
    if not isinstance(state, dict):
        raise TrajectoryError(path, "not a JSON object", fix)
    for key in FIELDS:
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TrajectoryError(path, f"{key} is not a whole number ≥ 0", fix, field=key)
    log = state.get("log_history")
    if not isinstance(log, list) or not all(isinstance(e, dict) for e in log):
        raise TrajectoryError(
            path, "log_history is not a list of objects", fix, field="log_history"
        )
    for entry in log:
        rate = entry.get("learning_rate")
        if "learning_rate" in entry and (
            not isinstance(rate, (int, float)) or isinstance(rate, bool) or not math.isfinite(rate)
        ):
            raise TrajectoryError(
                path, f"log_history entry {entry} has a non-numeric learning_rate", fix
            )
    return state
