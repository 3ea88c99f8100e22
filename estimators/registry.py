"""The one owner of estimator names: the registry, the name parser and the evidence check.

A name is an estimator's registry key, optionally with its shorthand setting after a colon
(``e4:2`` is E4 with ``stride=2``). Settings come as a mapping per estimator name
(``{"e3": {"rank": 5}}``, what ``--setting e3.rank=5`` and Hydra's ``settings.e3`` give) and
become the estimator's typed ``Arguments``; a setting for an estimator that is not asked for is
an error, not silently ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

from attribution.record.errors import SpecError, StagetraceError
from attribution.record.references import resolve
from attribution.record.trajectory import Trajectory
from estimators.base import EVIDENCE, Estimator
from estimators.e0 import E0
from estimators.e1 import E1
from estimators.e2 import E2
from estimators.e3 import E3
from estimators.e4 import E4
from estimators.subset import Subset
from estimators.truth import Truth

ESTIMATORS: dict[str, type[Estimator]] = {c.name: c for c in (E0, E1, E2, E3, E4, Subset, Truth)}

Settings = Mapping[str, Mapping[str, Any]]
"""Settings per estimator name: ``{"e3": {"rank": 5, "at": "end"}}``."""


def build(name: str, settings: Mapping[str, Any] | None = None) -> Estimator:
    """The estimator ``name`` (``e4:2`` sets E4's stride) with ``settings`` (its keyword
    arguments); a ``SpecError`` names an unknown estimator or setting."""
    base, colon, short = name.partition(":")
    if base not in ESTIMATORS:
        raise SpecError(
            "estimator",
            f"unknown estimator {name!r}",
            f"use one of {', '.join(ESTIMATORS)} (e4:STRIDE sets E4's stride, subset:BUDGET the "
            "subset replay's budget)",
        )
    cls = ESTIMATORS[base]
    settings = dict(settings or {})
    if colon:
        if cls.shorthand is None:
            raise SpecError(
                "estimator", f"{base} takes nothing after a colon ({name!r})", f"write {base}"
            )
        value = yaml.safe_load(short) if short else None
        if cls.shorthand in settings and settings[cls.shorthand] != value:
            raise SpecError(
                f"{base}.{cls.shorthand}",
                f"{name!r} and the setting {cls.shorthand}={settings[cls.shorthand]!r} disagree",
                f"give the {cls.shorthand} once",
            )
        settings[cls.shorthand] = value
    return cls(**settings)


def build_all(names: Sequence[str], settings: Settings | None = None) -> dict[str, Estimator]:
    """Each named estimator with its settings (keyed by the name's base, ``e3``); settings for
    an estimator not among ``names`` are refused."""
    settings = settings or {}
    bases = {n.partition(":")[0] for n in names}
    stray = sorted(set(settings) - bases)
    if stray:
        raise SpecError(
            f"settings.{stray[0]}",
            f"settings given for {stray[0]}, which is not run (estimators: {', '.join(names)})",
            f"drop the setting or run {stray[0]}",
        )
    return {n: build(n, settings.get(n.partition(":")[0])) for n in names}


def available_evidence(traj: Trajectory) -> set[str]:
    """What the recording holds, in the vocabulary of ``EVIDENCE``."""
    evidence = {
        "boundary_checkpoints",
        "learning_rates",
        "optimizer_hyperparameters",
        "optimizer_state",
    }
    if all(traj.steps(i).has_batch_order for i in range(len(traj.stages))):
        evidence.add("batch_order")
    try:
        for record in traj.stages:
            resolve(record.data.target)
        evidence.add("stage_data")
    except StagetraceError:
        pass
    return evidence


def check_evidence(estimators: Iterable[Estimator], traj: Trajectory) -> None:
    """Refuse an estimator whose evidence the recording lacks, saying what is missing and which
    estimators the recording supports."""
    held = available_evidence(traj)
    for estimator in estimators:
        missing = sorted(estimator.requires - held)
        if missing:
            usable = [n for n, cls in ESTIMATORS.items() if cls.requires <= held]
            raise StagetraceError(
                f"estimator {estimator.label} needs {'; '.join(EVIDENCE[m] for m in missing)}, "
                "which this trajectory does not hold. Fix: use "
                f"{' or '.join(usable) or 'a fuller recording'}"
            )
