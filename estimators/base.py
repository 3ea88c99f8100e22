"""The estimator interface: from a trajectory to one stage embedding per stage.

A stage embedding ``SE_k`` is a parameter-shaped dict estimating ``theta_T^(-k) - theta_T``, the
change of the final parameters had stage k never run. It does not depend on any behaviour, so it
is computed once and scored against any number of behaviours (see ``attribution.analysis.readout``).
Parameters missing from an embedding have offset 0.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch

from attribution.record import SIGN_CONVENTION
from attribution.record.artifacts import load_artifact, save_artifact
from attribution.record.counterfactual import check_skippable
from attribution.record.entry import matching_modules
from attribution.record.errors import SpecError
from attribution.record.trajectory import Trajectory

Offsets = dict[str, torch.Tensor]

EVIDENCE = {
    "boundary_checkpoints": "parameters at the start and end of every stage",
    "learning_rates": "the learning rate of every step of every stage",
    "optimizer_hyperparameters": "each stage's optimizer type and hyperparameters",
    "optimizer_state": "optimizer state at stage boundaries",
    "batch_order": "the batch indices of every step",
    "stage_data": "each stage's training data (an importable data reference)",
}


@dataclass(frozen=True)
class StageEmbeddings:
    """Per-stage estimates of ``theta_T^(-k) - theta_T`` and how they were obtained.

    ``counts`` holds the work done (e.g. ``gradients``, ``jvps``); ``seconds`` the wall time.
    """

    estimator: str
    settings: Mapping[str, Any]
    offsets: Mapping[str, Offsets]
    seconds: float
    counts: Mapping[str, int] = field(default_factory=dict)
    sign_convention: str = SIGN_CONVENTION


@dataclass(frozen=True)
class Arguments:
    """An estimator's settings: a frozen dataclass whose fields are the settings that change its
    result. Stored beside the embeddings they produced (they key them), so a stored result is
    never reused under other settings. Subclasses check their values in ``__post_init__`` and
    raise ``SpecError`` naming the setting."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def changed(self) -> dict[str, Any]:
        """The settings that differ from the defaults."""
        defaults = type(self)().to_dict()
        return {k: v for k, v in self.to_dict().items() if defaults[k] != v}


class Estimator:
    """One estimator over one trajectory. Declare ``name``, ``requires`` (keys of
    ``EVIDENCE``) and ``Settings`` (its ``Arguments``); implement ``offsets``. Raise
    ``version`` when a change of the code changes the estimates, so stored ones are not reused.
    ``shorthand`` names the one setting written after a colon (``e4:2``: E4 with stride 2)."""

    name: ClassVar[str]
    requires: ClassVar[frozenset[str]]
    Settings: ClassVar[type[Arguments]] = Arguments
    shorthand: ClassVar[str | None] = None
    version: ClassVar[int] = 1

    def __init__(self, **settings: Any) -> None:
        known = [f.name for f in fields(self.Settings)]
        unknown = sorted(set(settings) - set(known))
        if unknown:
            takes = f"its settings are {', '.join(known)}" if known else "it takes no settings"
            raise SpecError(
                f"{self.name}.{unknown[0]}",
                f"{self.name} has no setting {unknown[0]!r}",
                f"drop it ({takes})",
            )
        self.arguments = self.Settings(**settings)

    def settings(self) -> dict[str, Any]:
        """The settings that change the result (they key stored artifacts)."""
        return self.arguments.to_dict()

    @property
    def label(self) -> str:
        """The name a result is reported under: ``e4:2``, or ``e3(rank=5, sample=128)`` with the
        settings that differ from the defaults, so runs with other settings stay apart."""
        changed = self.arguments.changed()
        if self.shorthand is not None:
            head = f"{self.name}:{self.settings()[self.shorthand]}"
            changed.pop(self.shorthand, None)
        else:
            head = self.name
        if not changed:
            return head
        return f"{head}({', '.join(f'{k}={v}' for k, v in sorted(changed.items()))})"

    def offsets(self, traj: Trajectory, counts: dict[str, int]) -> dict[str, Offsets]:
        raise NotImplementedError

    def embed(self, traj: Trajectory) -> StageEmbeddings:
        """Stage embeddings of every recorded stage, timed."""
        for k in range(len(traj.stages)):
            check_skippable(traj, k)
        counts: dict[str, int] = {}
        began = time.perf_counter()
        offsets = self.offsets(traj, counts)
        seconds = time.perf_counter() - began
        return StageEmbeddings(self.name, self.settings(), offsets, seconds, counts)


SCHEMA = "stagetrace.embeddings"
SCHEMA_VERSION = 1
OFFSETS = "offsets.safetensors"


def stored_embeddings(estimator: Estimator, traj: Trajectory) -> tuple[StageEmbeddings, bool]:
    """The estimator's embeddings of ``traj`` and whether they were reused: computed once per
    recording, settings and estimator version, stored under ``embeddings/<name>-<hash>/``."""
    settings = json.dumps({**estimator.settings(), "version": estimator.version}, sort_keys=True)
    folder = f"embeddings/{estimator.name}-{hashlib.sha256(settings.encode()).hexdigest()[:10]}"
    stored = load_artifact(traj, folder, OFFSETS, SCHEMA, SCHEMA_VERSION)
    if stored is not None:
        offsets: dict[str, Offsets] = {s: {} for s in stored.meta["stages"]}
        for key, value in stored.tensors.items():
            stage, _, name = key.partition("/")
            offsets[stage][name] = value
        meta = stored.meta
        return StageEmbeddings(
            meta["estimator"], meta["settings"], offsets, meta["seconds"], meta["counts"]
        ), True
    result = estimator.embed(traj)
    tensors = {f"{s}/{n}": v for s, offset in result.offsets.items() for n, v in offset.items()}
    meta = {
        "estimator": result.estimator,
        "settings": dict(result.settings),
        "stages": list(result.offsets),
        "seconds": result.seconds,
        "counts": dict(result.counts),
        "meaning": "offset[k] estimates theta_T^(-k) - theta_T",
    }
    save_artifact(traj, folder, OFFSETS, SCHEMA, SCHEMA_VERSION, tensors, meta)
    return result, False


def final_parameter_names(traj: Trajectory) -> list[str]:
    """Names of the final model's parameters (buffers excluded)."""
    return [n for n, _ in traj.build_model(len(traj.stages) - 1).named_parameters()]


def stage_displacement(traj: Trajectory, k: int, names: list[str]) -> Offsets:
    """``delta_k = theta_{t_{k-1}} - theta_{t_k}``: minus the net displacement of stage k,
    over the parameters that exist when stage k starts."""
    start, end = traj.checkpoint(k, "start"), traj.checkpoint(k, "end")
    return {n: start[n].double() - end[n].double() for n in names if n in start}


def reinitialised(traj: Trajectory, j: int) -> set[str]:
    """Parameters that stage j's ``reinit`` actions re-create (their offset restarts at 0)."""
    record = traj.stages[j]
    model = traj.build_model(j)
    names = set()
    for action in (a for a in record.entry if a.kind == "reinit"):
        for module in matching_modules(model, action.modules, f"stage {record.name} entry"):
            names |= {f"{module}.{n}" for n, _ in model.get_submodule(module).named_parameters()}
    return names
