"""Validation of the estimators against real skip-stage retraining.

The truth retrains without each stage (``attribution.record.counterfactual.skip_stage``, stored
under the run and reused) and evaluates f(theta_T) - f(theta_T^(-k)) directly, per example, with
the one evaluator (eval mode, each checkpoint's own buffers). Every estimator and read-out is
scored against it:

- per-example behaviours: one ``FidelityRow`` per stage (correlations, sign agreement, mean
  effect error, top-stage agreement, cost);
- group behaviours (``group_mean``, ``group_gap``): one ``GroupRow`` per output and stage
  (estimated and true effect, sign right or not, absolute error, and whether the estimate orders
  the stages as the truth does).

Sign convention: effect_k(f) = f(theta_T) - f(theta_T^(-k)).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from torch import Tensor

from attribution.analysis import metrics
from attribution.analysis.audit import READOUTS, check_readouts
from attribution.analysis.behaviors import Behavior
from attribution.analysis.readout import behaviour_effects
from attribution.record import SIGN_CONVENTION
from attribution.record.counterfactual import skip_stage
from attribution.record.errors import SpecError
from attribution.record.evaluation import ModelAt, final_model
from attribution.record.trajectory import Trajectory
from estimators import build_all, check_evidence, stored_embeddings

Effects = dict[str, Tensor]
"""Stage -> [N] float64 per-example effects."""


@dataclass(frozen=True)
class FidelityRow:
    """Estimated against true per-example effects of one stage on one per-example behaviour;
    ``seconds``: embedding plus read-out, ``cost_ratio``: their ratio to the truth's."""

    estimator: str
    readout: str
    behavior: str
    stage: str
    pearson: float
    spearman: float
    sign_agreement: float
    mean_effect_true: float
    mean_effect_error: float
    top_stage_agreement: float
    seconds: float
    cost_ratio: float


@dataclass(frozen=True)
class GroupRow:
    """Estimated against true effect of one stage on one output of a group behaviour (units of
    its quantity). ``ranking_matches``: the estimate orders the stages by effect (largest
    first, signed) as the truth does, the same for every stage of the output."""

    estimator: str
    readout: str
    behavior: str
    output: str
    stage: str
    estimated: float
    true: float
    sign_right: bool
    abs_error: float
    ranking_matches: bool


@dataclass(frozen=True)
class Truth:
    """True per-example effects of every stage, per behaviour (``effects[behaviour][stage]``,
    [N] float64), and the seconds retraining took (as recorded when it was computed)."""

    effects: dict[str, Effects]
    seconds: float


@dataclass(frozen=True)
class Validation:
    """Every estimator and read-out against the truth (``validation.json``). ``effects`` (with
    ``keep_effects``): ``"truth"`` and ``"<label>:<readout>"`` -> per-example behaviour ->
    stage -> [N] float64 numpy arrays, for plots (not in ``to_json``)."""

    trajectory: str
    ground_truth_seconds: float
    rows: list[FidelityRow]
    group_rows: list[GroupRow]
    effects: dict[str, dict[str, dict[str, np.ndarray]]] | None = None
    sign_convention: str = field(default=SIGN_CONVENTION)

    def to_json(self) -> dict[str, Any]:
        return {
            "sign_convention": self.sign_convention,
            "trajectory": self.trajectory,
            "ground_truth_seconds": self.ground_truth_seconds,
            "rows": [asdict(r) for r in self.rows],
            "group_rows": [asdict(r) for r in self.group_rows],
        }


def true_effects(
    traj: Trajectory, behaviors: Mapping[str, Behavior], batch_size: int = 512
) -> Truth:
    """f(theta_T) - f(theta_T^(-k)) per example, stage and behaviour: retraining without each
    stage (stored and reused), then one evaluation of the final and each counterfactual model.
    Behaviours over the same data and quantity share one computation."""
    data = {name: b.load() for name, b in behaviors.items()}  # checked before retraining
    model = final_model(traj)
    skipped = {s: skip_stage(traj, s) for s in traj.names}
    counterfactual = {s: model.at(cf.state) for s, cf in skipped.items()}
    computed: dict[str, Effects] = {}
    effects = {}
    for name, behavior in behaviors.items():
        key = _same_values(behavior)
        if key not in computed:
            inputs, targets, _ = data[name]
            final = model.values(inputs, targets, behavior.quantity, batch_size)
            computed[key] = {
                s: final - cf.values(inputs, targets, behavior.quantity, batch_size)
                for s, cf in counterfactual.items()
            }
        effects[name] = computed[key]
    return Truth(effects, sum(cf.seconds for cf in skipped.values()))


def validate(
    traj: Trajectory,
    estimators: Sequence[str],
    readouts: Sequence[str],
    behaviors: Mapping[str, Behavior],
    batch_size: int = 512,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    keep_effects: bool = False,
    truth: Truth | None = None,
) -> Validation:
    """Every estimator and read-out against the true effects, per behaviour and stage.

    ``settings`` maps an estimator's base name (``e3``) to its settings; settings for an
    estimator not run are refused. ``truth`` (from ``true_effects`` over the same behaviours)
    is reused if given, e.g. by a caller validating one estimator at a time. Estimators, settings,
    evidence and behaviours are checked before anything is computed.
    """
    if not behaviors:
        raise SpecError("behaviors", "no behaviour to validate", "declare at least one behaviour")
    built = build_all(estimators, settings)
    check_evidence(built.values(), traj)
    check_readouts(list(readouts))
    data = {name: b.load() for name, b in behaviors.items()}
    if truth is None:
        truth = true_effects(traj, behaviors, batch_size)
    missing = sorted(set(behaviors) - set(truth.effects))
    if missing:
        raise SpecError(
            "truth",
            f"the given truth lacks the behaviours {missing}",
            "compute it with true_effects over the same behaviours",
        )
    model = final_model(traj)
    per_example = [n for n, b in behaviors.items() if b.aggregate == "per_example"]
    rows: list[FidelityRow] = []
    group_rows: list[GroupRow] = []
    kept: dict[str, dict[str, dict[str, np.ndarray]]] = {
        "truth": {b: _numpy(truth.effects[b]) for b in per_example}
    }
    for estimator in built.values():
        label = estimator.label
        embeddings, _ = stored_embeddings(estimator, traj)
        for readout in readouts:
            estimated = _estimates(model, embeddings.offsets, readout, behaviors, data, batch_size)
            for behavior, (effects, seconds) in estimated.items():
                seconds += embeddings.seconds
                if behavior in per_example:
                    rows += fidelity_rows(
                        label,
                        readout,
                        behavior,
                        effects,
                        truth.effects[behavior],
                        seconds,
                        truth.seconds,
                    )
                    kept.setdefault(f"{label}:{readout}", {})[behavior] = _numpy(effects)
                else:
                    group_rows += _group_rows(
                        label,
                        readout,
                        behaviors[behavior],
                        effects,
                        truth.effects[behavior],
                        data[behavior][2],
                    )
    return Validation(
        trajectory=str(traj.root),
        ground_truth_seconds=truth.seconds,
        rows=rows,
        group_rows=group_rows,
        effects=kept if keep_effects else None,
    )


def fidelity_rows(
    estimator: str,
    readout: str,
    behavior: str,
    estimated: Mapping[str, Tensor],
    truth: Mapping[str, Tensor],
    seconds: float,
    truth_seconds: float,
) -> list[FidelityRow]:
    """One row of fidelity metrics per stage: estimated against true per-example effects
    ([N] tensors per stage), with the estimate's cost and its ratio to the truth's."""
    stages = list(truth)
    est = np.stack([estimated[s].numpy() for s in stages])
    tru = np.stack([truth[s].numpy() for s in stages])
    top = metrics.top_stage_agreement(est, tru)
    return [
        FidelityRow(
            estimator=estimator,
            readout=readout,
            behavior=behavior,
            stage=stage,
            pearson=metrics.pearson(est[i], tru[i]),
            spearman=metrics.spearman(est[i], tru[i]),
            sign_agreement=metrics.sign_agreement(est[i], tru[i]),
            mean_effect_true=float(tru[i].mean()),
            mean_effect_error=metrics.mean_effect_error(est[i], tru[i]),
            top_stage_agreement=top,
            seconds=seconds,
            cost_ratio=seconds / truth_seconds if truth_seconds else float("nan"),
        )
        for i, stage in enumerate(stages)
    ]


def _group_rows(
    estimator: str,
    readout: str,
    behavior: Behavior,
    estimated: Effects,
    truth: Effects,
    keys: Tensor,
) -> list[GroupRow]:
    """One row per output and stage of a group behaviour, aggregated from per-example effects."""
    est = behaviour_effects(behavior, estimated, keys)
    tru = behaviour_effects(behavior, truth, keys)
    stages = list(truth)
    rows = []
    for output in next(iter(tru.values())):
        e = np.array([est[s][output] for s in stages])
        t = np.array([tru[s][output] for s in stages])
        ranking = metrics.same_ranking(e, t)
        rows += [
            GroupRow(
                estimator=estimator,
                readout=readout,
                behavior=behavior.name,
                output=output,
                stage=stage,
                estimated=float(e[i]),
                true=float(t[i]),
                sign_right=bool(np.sign(e[i]) == np.sign(t[i])),
                abs_error=float(abs(e[i] - t[i])),
                ranking_matches=ranking,
            )
            for i, stage in enumerate(stages)
        ]
    return rows


def _estimates(
    model: ModelAt,
    offsets: Mapping[str, Mapping[str, Tensor]],
    readout: str,
    behaviors: Mapping[str, Behavior],
    data: Mapping[str, tuple[Tensor, Tensor, Tensor]],
    batch_size: int,
) -> dict[str, tuple[Effects, float]]:
    """Per behaviour, the read-out's per-example effects and the seconds they took (behaviours
    over the same data and quantity share one computation and its seconds)."""
    computed: dict[str, tuple[Effects, float]] = {}
    out = {}
    for name, behavior in behaviors.items():
        key = _same_values(behavior)
        if key not in computed:
            inputs, targets, _ = data[name]
            began = time.perf_counter()
            effects = READOUTS[readout](
                model, offsets, inputs, targets, behavior.quantity, batch_size
            )
            computed[key] = (effects, time.perf_counter() - began)
        out[name] = computed[key]
    return out


def _same_values(behavior: Behavior) -> str:
    """Behaviours with equal keys have the same per-example values (data and quantity)."""
    return json.dumps([behavior.data.to_dict(), behavior.quantity], sort_keys=True)


def _numpy(effects: Effects) -> dict[str, np.ndarray]:
    return {s: v.numpy() for s, v in effects.items()}
