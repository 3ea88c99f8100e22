"""The audit: which stage is accountable for each behaviour, and by how much; and validation of
the estimators against real skip-stage retraining.

Effects follow the project's sign convention, effect_k(f) = f(theta_T) - f(theta_T^(-k)): for
a loss, a positive effect means stage k raised it (blame), a negative one lowered it (credit).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from attribution.analysis import metrics
from attribution.analysis.behaviors import Behavior
from attribution.analysis.readout import behaviour_effects, evaluated_effects, linear_effects
from attribution.record import SIGN_CONVENTION
from attribution.record.counterfactual import skip_stage
from attribution.record.errors import SpecError, StagetraceError
from attribution.record.evaluation import per_example
from attribution.record.trajectory import Trajectory
from estimators import Estimator, build, build_all, check_evidence, stored_embeddings

READOUTS = {"linear": linear_effects, "evaluated": evaluated_effects}
BEHAVIORS_FILE = "behaviors.yaml"


def estimator_for(
    name: str, traj: Trajectory, settings: Mapping[str, Any] | None = None
) -> Estimator:
    """The named estimator with ``settings``, refused with what is missing if the recording
    cannot support it."""
    estimator = build(name, settings)
    check_evidence([estimator], traj)
    return estimator


def load_behaviors(path: Path | str) -> dict[str, Behavior]:
    """Behaviours from a YAML or JSON file mapping each name to its settings."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(
            str(path),
            "no such behaviours file",
            "give --behaviors FILE (YAML: name -> {data, quantity, aggregate, ...})",
        )
    obj = yaml.safe_load(path.read_text())
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


def audit(
    traj: Trajectory,
    estimator: str,
    behaviors: Mapping[str, Behavior],
    readout: str = "evaluated",
    batch_size: int = 512,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Stage effects on every behaviour: per stage, each output's effect and their mean;
    ``settings`` are the estimator's (e.g. E3's ``rank``)."""
    if readout not in READOUTS:
        raise StagetraceError(
            f"unknown read-out {readout!r}. Fix: use one of {', '.join(READOUTS)}"
        )
    data = {name: b.load() for name, b in behaviors.items()}
    embeddings, reused = stored_embeddings(estimator_for(estimator, traj, settings), traj)
    model, params = final_model(traj)
    began = time.perf_counter()
    results = {}
    for name, behavior in behaviors.items():
        inputs, targets, keys = data[name]
        effects = READOUTS[readout](
            model, params, embeddings.offsets, inputs, targets, behavior.quantity, batch_size
        )
        per_output = behaviour_effects(behavior, effects, keys)
        results[name] = {
            "quantity": behavior.quantity,
            "aggregate": behavior.aggregate,
            "outputs": list(next(iter(per_output.values()))),
            "mean_effect": {s: float(np.mean(list(v.values()))) for s, v in per_output.items()},
            "effects": {s: list(v.values()) for s, v in per_output.items()},
        }
    return {
        "sign_convention": SIGN_CONVENTION,
        "trajectory": str(traj.root),
        "estimator": {
            "name": embeddings.estimator,
            "settings": dict(embeddings.settings),
            "seconds": embeddings.seconds,
            "counts": dict(embeddings.counts),
            "reused": reused,
        },
        "readout": readout,
        "readout_seconds": time.perf_counter() - began,
        "stages": traj.names,
        "behaviors": results,
    }


def validate(
    traj: Trajectory,
    estimators: Sequence[str],
    readouts: Sequence[str],
    behaviors: Mapping[str, Behavior],
    batch_size: int = 512,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    keep_effects: bool = False,
) -> dict[str, Any]:
    """Estimated against true per-example effects, per estimator, read-out, per-example behaviour
    and stage (group behaviours are aggregates of the same per-example effects).

    The truth retrains without each stage (stored under the run and reused) and evaluates
    f(theta_T) - f(theta_T^(-k)) directly. ``settings`` maps an estimator's base name (``e3``)
    to its settings. With ``keep_effects`` the result also holds the per-example effects
    (``"effects"``: ``"truth"`` -> behaviour -> stage -> [N], and ``"estimate:readout"`` ->
    behaviour -> stage -> [N], float64 numpy arrays), for plots.
    """
    settings = settings or {}
    behaviors = {n: b for n, b in behaviors.items() if b.aggregate == "per_example"}
    if not behaviors:
        raise SpecError(
            "behaviors",
            "validation needs at least one per_example behaviour",
            "add e.g. `test_loss: {data: ..., quantity: loss}`",
        )
    built = build_all(estimators, settings)
    check_evidence(built.values(), traj)
    if any(r not in READOUTS for r in readouts):
        raise StagetraceError(
            f"unknown read-out in {list(readouts)}. Fix: use {', '.join(READOUTS)}"
        )
    data = {name: b.load() for name, b in behaviors.items()}
    model, params = final_model(traj)
    truths = {s: skip_stage(traj, s) for s in traj.names}
    truth_seconds = sum(cf.seconds for cf in truths.values())
    true_effects = {}
    for name, behavior in behaviors.items():
        inputs, targets, _ = data[name]
        final = per_example(model, params, inputs, targets, behavior.quantity).double()
        true_effects[name] = {
            s: final
            - per_example(
                model, {n: cf.state[n] for n in params}, inputs, targets, behavior.quantity
            ).double()
            for s, cf in truths.items()
        }
    rows = []
    kept: dict[str, Any] = {
        "truth": {b: {s: v.numpy() for s, v in e.items()} for b, e in true_effects.items()}
    }
    for estimator in estimators:
        embeddings, _ = stored_embeddings(built[estimator], traj)
        for readout in readouts:
            for name, behavior in behaviors.items():
                inputs, targets, _ = data[name]
                began = time.perf_counter()
                estimated = READOUTS[readout](
                    model,
                    params,
                    embeddings.offsets,
                    inputs,
                    targets,
                    behavior.quantity,
                    batch_size,
                )
                seconds = embeddings.seconds + time.perf_counter() - began
                rows += fidelity_rows(
                    estimator, readout, name, estimated, true_effects[name], seconds, truth_seconds
                )
                kept.setdefault(f"{estimator}:{readout}", {})[name] = {
                    s: v.numpy() for s, v in estimated.items()
                }
    result = {
        "sign_convention": SIGN_CONVENTION,
        "trajectory": str(traj.root),
        "ground_truth_seconds": truth_seconds,
        "rows": rows,
    }
    if keep_effects:
        result["effects"] = kept
    return result


def final_model(traj: Trajectory) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The final model (as a function) and its parameters theta_T."""
    last = len(traj.stages) - 1
    model = traj.build_model(last)
    state = traj.checkpoint(last, "end")
    return model, {n: state[n] for n, _ in model.named_parameters()}


def fidelity_rows(
    estimator: str,
    readout: str,
    behavior: str,
    estimated: Mapping[str, torch.Tensor],
    truth: Mapping[str, torch.Tensor],
    seconds: float,
    truth_seconds: float,
) -> list[dict[str, Any]]:
    """One row of fidelity metrics per stage: estimated against true per-example effects
    ([N] tensors per stage), with the estimate's cost and its ratio to the truth's."""
    stages = list(truth)
    est = np.stack([estimated[s].numpy() for s in stages])
    tru = np.stack([truth[s].numpy() for s in stages])
    top = metrics.top_stage_agreement(est, tru)
    return [
        {
            "estimator": estimator,
            "readout": readout,
            "behavior": behavior,
            "stage": stage,
            "pearson": metrics.pearson(est[i], tru[i]),
            "spearman": metrics.spearman(est[i], tru[i]),
            "sign_agreement": metrics.sign_agreement(est[i], tru[i]),
            "mean_effect_true": float(tru[i].mean()),
            "mean_effect_error": metrics.mean_effect_error(est[i], tru[i]),
            "top_stage_agreement": top,
            "seconds": seconds,
            "cost_ratio": seconds / truth_seconds if truth_seconds else float("nan"),
        }
        for i, stage in enumerate(stages)
    ]
