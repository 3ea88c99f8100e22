"""The audit: which stage is accountable for each behaviour, and by how much.

Effects follow the project's sign convention, effect_k(f) = f(theta_T) - f(theta_T^(-k)): for
a loss, a positive effect means stage k raised it (blame), a negative one lowered it (credit).
Validation of the estimators against real skip-stage retraining: ``attribution.analysis.validate``.
Embeddings and read-outs run on the compute of ``attribution.record.compute.current()`` and
come back on the CPU (docs/scale.md, "Devices and precision").
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from attribution.analysis.behaviors import Behavior
from attribution.analysis.choice import DEFAULT_BUDGET, Label, Plan, labels, plan
from attribution.analysis.readout import behaviour_effects, evaluated_effects, linear_effects
from attribution.record import SIGN_CONVENTION
from attribution.record.errors import SpecError, StagetraceError
from attribution.record.evaluation import final_model
from attribution.record.trajectory import Trajectory
from estimators import Estimator, StageEmbeddings, build, check_evidence, stored_embeddings

READOUTS = {"linear": linear_effects, "evaluated": evaluated_effects}
BEHAVIORS_FILE = "behaviors.yaml"


@dataclass(frozen=True)
class EstimatorRun:
    """The estimator behind an audit: ``name`` (registry key), ``label`` (the name a result is
    reported under, e.g. ``e3(rank=2)``), its ``settings``, the ``seconds`` and work ``counts``
    of computing the embeddings, and whether they were ``reused`` from storage (``None``: the
    caller passed embeddings it computed)."""

    name: str
    label: str
    settings: Mapping[str, Any]
    seconds: float
    counts: Mapping[str, int]
    reused: bool | None


@dataclass(frozen=True)
class BehaviorEffects:
    """One behaviour's stage effects: ``effects[stage][i]`` is the effect on ``outputs[i]``
    (units of ``quantity``), ``mean_effect[stage]`` their mean over the outputs."""

    quantity: str
    aggregate: str
    outputs: list[str]
    effects: dict[str, list[float]]
    mean_effect: dict[str, float]

    def of(self, stage: str) -> dict[str, float]:
        """{output: effect} of ``stage``."""
        return dict(zip(self.outputs, self.effects[stage], strict=True))


@dataclass(frozen=True)
class Audit:
    """Stage effects on every behaviour, with how they were obtained and how far to trust each
    stage's (``labels``; ``check_seconds`` the time their check took), and, for ``auto``, the
    ``plan`` that chose the method (``attribution.json``)."""

    trajectory: str
    estimator: EstimatorRun
    readout: str
    readout_seconds: float
    stages: list[str]
    behaviors: dict[str, BehaviorEffects]
    labels: dict[str, Label]
    check_seconds: float
    plan: Plan | None = None
    sign_convention: str = field(default=SIGN_CONVENTION)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["estimator"]["settings"] = dict(self.estimator.settings)
        out["estimator"]["counts"] = dict(self.estimator.counts)
        if self.plan is not None:
            out["plan"]["predicted_seconds"] = dict(self.plan.predicted_seconds)
            out["plan"]["settings"] = dict(self.plan.settings)
        return out


def load_behaviors(path: Path | str) -> dict[str, Behavior]:
    """Behaviours from a YAML or JSON file mapping each name to its settings."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(
            str(path),
            "no such behaviours file",
            "give --behaviors FILE (YAML: name -> {data, quantity, aggregate, ...})",
        )
    try:
        obj = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:  # a syntax error, or a tag such as !!python/object
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(
            str(path),
            f"is not valid plain YAML{at}: {problem}",
            "write plain YAML (no !!python tags): `name: {data: {target: ..., kwargs: {...}}}`",
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(str(path), f"cannot be read ({exc})", "give a readable text file") from exc
    if not isinstance(obj, Mapping) or not obj:
        raise SpecError(
            str(path),
            "expected a non-empty mapping of behaviour names",
            "write `name: {data: {target: ..., kwargs: {...}}, quantity: loss}`",
        )
    return {str(n): Behavior.from_dict(str(n), spec, f"{path}:{n}") for n, spec in obj.items()}


def default_behaviors_file(run: Path | str) -> Path:
    """``behaviors.yaml`` of a run directory, or of the Hydra run directory holding a
    ``trajectory/`` folder given as the run."""
    run = Path(run)
    if run.name == "trajectory" and (run.parent / BEHAVIORS_FILE).is_file():
        return run.parent / BEHAVIORS_FILE
    return run / BEHAVIORS_FILE


def check_readouts(readouts: list[str] | tuple[str, ...]) -> None:
    """Refuse an unknown read-out, naming the known ones."""
    unknown = [r for r in readouts if r not in READOUTS]
    if unknown:
        raise StagetraceError(
            f"unknown read-out {unknown[0]!r}. Fix: use one of {', '.join(READOUTS)}"
        )


def embeddings_of(
    estimator: str | Estimator | StageEmbeddings,
    traj: Trajectory,
    settings: Mapping[str, Any] | None = None,
) -> tuple[StageEmbeddings, EstimatorRun]:
    """Embeddings and their estimator's description from a name (built with ``settings``), an
    estimator (stored embeddings, computed once per recording and setting) or embeddings
    already computed (used as they are)."""
    if isinstance(estimator, StageEmbeddings):
        if settings:
            raise SpecError(
                "settings",
                "settings given with embeddings already computed",
                "drop the settings (the embeddings carry their own)",
            )
        embeddings, reused = estimator, None
        label = build(embeddings.estimator, embeddings.settings).label
    else:
        if isinstance(estimator, str):
            estimator = build(estimator, settings)
        elif settings:
            raise SpecError(
                "settings",
                "settings given with an estimator already built",
                "build the estimator with its settings (estimators.build)",
            )
        check_evidence([estimator], traj)
        embeddings, reused = stored_embeddings(estimator, traj)
        label = estimator.label
    run = EstimatorRun(
        embeddings.estimator,
        label,
        dict(embeddings.settings),
        embeddings.seconds,
        dict(embeddings.counts),
        reused,
    )
    return embeddings, run


def audit(
    traj: Trajectory,
    estimator: str | Estimator | StageEmbeddings,
    behaviors: Mapping[str, Behavior],
    readout: str = "evaluated",
    batch_size: int = 512,
    settings: Mapping[str, Any] | None = None,
    budget: float = DEFAULT_BUDGET,
) -> Audit:
    """Stage effects on every behaviour: per stage, each output's effect and their mean, and a
    label saying how far to trust each stage's (``attribution.analysis.choice``).

    ``estimator`` is ``"auto"`` (the truth when retraining fits ``budget`` seconds, else the
    most faithful estimate that does: ``choice.plan``), a name (``"e3"``, ``"e4:2"``;
    ``settings`` are its settings, e.g. E3's ``rank``), an ``Estimator`` or the
    ``StageEmbeddings`` already computed from ``traj`` (so a caller that also undoes a stage
    uses the very same embeddings). Behaviours are loaded and checked before any work.
    """
    check_readouts([readout])
    data = {name: b.load() for name, b in behaviors.items()}
    chosen = None
    if isinstance(estimator, str) and estimator == "auto":
        if settings:
            raise SpecError(
                "settings",
                "settings given with the estimator chosen automatically",
                "name the estimator whose settings they are (--estimator NAME)",
            )
        chosen = plan(traj, budget)
        estimator, settings = chosen.estimator, dict(chosen.settings) or None
    embeddings, run = embeddings_of(estimator, traj, settings)
    model = final_model(traj)

    def per_example(emb: StageEmbeddings) -> dict[str, dict[str, Tensor]]:
        """Per behaviour, the read-out's per-example effects; behaviours over the same data
        and quantity share one read-out."""
        computed: dict[str, dict[str, Tensor]] = {}
        for name, (inputs, targets, _) in data.items():
            key = behaviors[name].values_key
            if key not in computed:
                computed[key] = READOUTS[readout](
                    model, emb.offsets, inputs, targets, behaviors[name].quantity, batch_size
                )
        return {name: computed[behaviors[name].values_key] for name in data}

    began = time.perf_counter()
    effects = per_example(embeddings)
    results = {}
    for name, behavior in behaviors.items():
        per_output = behaviour_effects(behavior, effects[name], data[name][2])
        results[name] = BehaviorEffects(
            quantity=behavior.quantity,
            aggregate=behavior.aggregate,
            outputs=list(next(iter(per_output.values()))),
            effects={s: list(v.values()) for s, v in per_output.items()},
            mean_effect={s: float(np.mean(list(v.values()))) for s, v in per_output.items()},
        )
    readout_seconds = time.perf_counter() - began

    def concatenated(emb: StageEmbeddings) -> dict[str, Tensor]:
        per = per_example(emb)
        return {s: torch.cat([per[name][s] for name in per]) for s in traj.names}

    began = time.perf_counter()
    stage_labels = labels(traj, embeddings, readout, concatenated)
    return Audit(
        trajectory=str(traj.root),
        estimator=run,
        readout=readout,
        readout_seconds=readout_seconds,
        stages=traj.names,
        behaviors=results,
        labels=stage_labels,
        check_seconds=time.perf_counter() - began,
        plan=chosen,
    )
