"""Learning-rate schedules: per-step multipliers of a stage's base learning rate.

Multipliers are computed in Python floats so that a schedule gives the same numbers everywhere;
the learning rates a run actually used are recorded per step, and replays read those records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from attribution.record.errors import SpecError

SCHEDULES = {
    "constant": (),
    "step": ("step_size", "gamma"),
    "cosine": ("min_factor",),
    "warmup_linear": ("warmup", "end_factor"),
    "warmup_cosine": ("warmup", "min_factor"),
}
DEFAULTS = {"gamma": 0.1, "min_factor": 0.0, "warmup": 0, "end_factor": 0.0}


@dataclass(frozen=True)
class ScheduleSpec:
    """A named schedule with its parameters (see ``SCHEDULES`` for the names each one takes)."""

    name: str = "constant"
    params: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> ScheduleSpec:
        if obj is None:
            return cls()
        if isinstance(obj, str):
            obj = {"name": obj}
        name = obj.get("name", "constant")
        if name not in SCHEDULES:
            raise SpecError(
                f"{where}.name", f"unknown schedule {name!r}", f"use one of {', '.join(SCHEDULES)}"
            )
        params = {k: v for k, v in obj.items() if k != "name"}
        unknown = set(params) - set(SCHEDULES[name])
        if unknown:
            raise SpecError(
                where,
                f"schedule {name!r} takes no {sorted(unknown)}",
                f"use only {list(SCHEDULES[name]) or 'no parameters'}",
            )
        if name == "step" and "step_size" not in params:
            raise SpecError(f"{where}.step_size", "missing", "give the number of steps per decay")
        for key, value in params.items():
            _check_value(f"{where}.{key}", key, value)
        return cls(name, params)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.params}

    def multipliers(self, total: int, where: str = "schedule") -> list[float]:
        """The factor applied to the base learning rate at steps 0..total-1; a warm-up longer
        than the stage is refused (the rate would never reach its base value)."""
        p = {**DEFAULTS, **self.params}
        if int(p["warmup"]) > total:
            raise SpecError(
                f"{where}.warmup",
                f"a warm-up of {p['warmup']} steps is longer than the stage ({total} steps), so "
                "the learning rate would never reach its base value",
                f"give a warm-up of at most {total} steps, or train longer",
            )
        return [_multiplier(self.name, p, t, total) for t in range(total)]


FIXES = {
    "warmup": "give the number of warm-up steps, e.g. 10",
    "step_size": "give the number of steps per decay, e.g. 100",
    "gamma": "give the decay factor per step_size steps, e.g. 0.1",
    "min_factor": "give the final rate as a fraction of the base rate, e.g. 0.0",
    "end_factor": "give the final rate as a fraction of the base rate, e.g. 0.0",
}


def _check_value(where: str, key: str, value: Any) -> None:
    """Step counts are whole numbers (``warmup`` >= 0, ``step_size`` >= 1); factors lie in
    [0, 1] and ``gamma`` in (0, 1]."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key in ("warmup", "step_size"):
        low = 0 if key == "warmup" else 1
        if not (number and float(value).is_integer() and value >= low):
            raise SpecError(where, f"expected a whole number >= {low}, got {value!r}", FIXES[key])
    elif not (number and (0 < value <= 1 if key == "gamma" else 0 <= value <= 1)):
        bounds = "(0, 1]" if key == "gamma" else "[0, 1]"
        raise SpecError(where, f"expected a number in {bounds}, got {value!r}", FIXES[key])


def _cosine(progress: float, min_factor: float) -> float:
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _multiplier(name: str, p: Mapping[str, Any], t: int, total: int) -> float:
    if name == "constant":
        return 1.0
    if name == "step":
        return float(p["gamma"]) ** (t // int(p["step_size"]))
    if name == "cosine":
        return _cosine(t / total, float(p["min_factor"]))
    warmup = int(p["warmup"])
    if t < warmup:
        return (t + 1) / warmup
    progress = (t - warmup) / max(1, total - warmup)
    if name == "warmup_linear":
        return 1.0 + (float(p["end_factor"]) - 1.0) * progress
    return _cosine(progress, float(p["min_factor"]))
