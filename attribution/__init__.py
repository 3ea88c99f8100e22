"""stagetrace: which training stage is accountable for a behaviour of the final model.

The handful of names a user needs, in one import::

    from attribution import Trajectory, Recorder, Ref, Behavior, audit, validate, undo, skip

The package is layered (``docs/design.md``): ``attribution.record`` (what happened, and the
truth of what would have happened without a stage), ``estimators`` (stage embeddings without
retraining) and ``attribution.analysis`` (behaviours, audit, validation, interventions, the
command line). Names are loaded on first use, so importing a lower layer never pulls in a
higher one.

Sign convention: ``effect_k(f) = f(theta_T) - f(theta_T^(-k))`` (``SIGN_CONVENTION``).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from attribution.record import SIGN_CONVENTION

_PUBLIC = {
    "Trajectory": "attribution.record.trajectory",
    "Recorder": "attribution.record.recorder",
    "Ref": "attribution.record.references",
    "PipelineSpec": "attribution.record.spec",
    "run_pipeline": "attribution.record.pipeline",
    "skip_stage": "attribution.record.counterfactual",
    "final_model": "attribution.record.evaluation",
    "StagetraceError": "attribution.record.errors",
    "build_estimator": "estimators.registry",
    "stored_embeddings": "estimators.base",
    "example_scores": "estimators.within_stage",
    "Behavior": "attribution.analysis.behaviors",
    "load_behaviors": "attribution.analysis.audit",
    "audit": "attribution.analysis.audit",
    "validate": "attribution.analysis.validate",
    "undo": "attribution.analysis.interventions",
    "skip": "attribution.analysis.interventions",
    "filter_and_rerun": "attribution.analysis.interventions",
    "most_harmful": "attribution.analysis.interventions",
    "random_drop": "attribution.analysis.interventions",
}
_RENAMED = {"build_estimator": "build"}

__all__ = ["SIGN_CONVENTION", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'attribution' has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name]), _RENAMED.get(name, name))
    globals()[name] = value
    return value
