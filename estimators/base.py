"""The estimator interface: from a trajectory to one stage embedding per stage.

A stage embedding ``SE_k`` is a parameter-shaped dict estimating ``theta_T^(-k) - theta_T``, the
change of the final parameters had stage k never run. It does not depend on any behaviour, so it
is computed once and scored against any number of behaviours (see ``attribution.analysis.readout``).
Parameters missing from an embedding have offset 0.

Estimators compute on the device of ``attribution.record.compute.current()`` and hand their
embeddings back as float64 CPU tensors, so that stored embeddings do not depend on the device
that computed them. Embeddings that come out of training steps (``Estimator.trains``: E4, the
subset replay, the truth) follow the compute's training dtype too: computed in bfloat16 they are
another, approximate result, stored apart (``Compute.cache_suffix``).
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
from attribution.record.artifacts import artifact_lock, load_artifact, save_artifact
from attribution.record.compute import current
from attribution.record.counterfactual import check_skippable
from attribution.record.errors import SpecError, TrajectoryError
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


REPLAYS = frozenset({"batch_order", "stage_data"})
"""Evidence that an estimator replays recorded steps with: such estimators refuse stages
recorded as not replaying exactly (``Trajectory.check_replayable``)."""


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
        """The settings as stored beside the results (JSON's types: a tuple is a list)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def changed(self) -> dict[str, Any]:
        """The settings that differ from the defaults."""
        defaults = type(self)().to_dict()
        return {k: v for k, v in self.to_dict().items() if defaults[k] != v}


def _shown(value: Any) -> str:
    """A setting's value in a label: a list of names as ``a+b``."""
    return "+".join(map(str, value)) if isinstance(value, tuple | list) else str(value)


class Estimator:
    """One estimator over one trajectory. Declare ``name``, ``requires`` (keys of
    ``EVIDENCE``) and ``Settings`` (its ``Arguments``); implement ``offsets``. Raise
    ``version`` when a change of the code changes the estimates, so stored ones are not reused.
    ``shorthand`` names the one setting written after a colon (``e4:2``: E4 with stride 2).
    ``trains`` says whether the embeddings come out of training steps (``train_stage``: replays,
    retraining), which run in bfloat16 under a bfloat16 compute (``Compute.training_dtype``), so
    that such embeddings are stored apart; True unless an estimator declares otherwise, so a new
    estimator is never served across precisions by mistake. Estimators that read the record or
    differentiate it in its own precision set it False."""

    name: ClassVar[str]
    requires: ClassVar[frozenset[str]]
    Settings: ClassVar[type[Arguments]] = Arguments
    shorthand: ClassVar[str | None] = None
    version: ClassVar[int] = 1
    trains: ClassVar[bool] = True

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
        return f"{head}({', '.join(f'{k}={_shown(v)}' for k, v in sorted(changed.items()))})"

    def offsets(self, traj: Trajectory, counts: dict[str, int]) -> dict[str, Offsets]:
        raise NotImplementedError

    def embed(self, traj: Trajectory) -> StageEmbeddings:
        """Stage embeddings of every recorded stage, timed."""
        for k in range(len(traj.stages)):
            check_skippable(traj, k)
            if self.requires & REPLAYS:
                traj.check_replayable(k)
        counts: dict[str, int] = {}
        began = time.perf_counter()
        offsets = self.offsets(traj, counts)
        seconds = time.perf_counter() - began
        return StageEmbeddings(self.name, self.settings(), offsets, seconds, counts)


SCHEMA = "stagetrace.embeddings"
SCHEMA_VERSION = 1
OFFSETS = "offsets.safetensors"


def embeddings_folder(estimator: Estimator) -> str:
    """Where the estimator's embeddings are stored in a trajectory's cache:
    ``embeddings/<name>-<hash of settings and version>``, with ``Compute.cache_suffix``
    (``-bfloat16``) for an estimator that ``trains`` under a bfloat16 compute."""
    settings = json.dumps({**estimator.settings(), "version": estimator.version}, sort_keys=True)
    suffix = current().cache_suffix if estimator.trains else ""
    digest = hashlib.sha256(settings.encode()).hexdigest()[:10]
    return f"embeddings/{estimator.name}-{digest}{suffix}"


def stored_embeddings(estimator: Estimator, traj: Trajectory) -> tuple[StageEmbeddings, bool]:
    """The estimator's embeddings of ``traj`` and whether they were reused: computed once per
    recording, settings, estimator version and, for one that ``trains``, training precision
    (however many processes ask at once), stored with those settings under
    ``embeddings_folder(estimator)`` in the trajectory's cache."""
    folder = embeddings_folder(estimator)
    stored = _stored(traj, folder, estimator)
    if stored is not None:
        return stored, True
    with artifact_lock(traj, folder):
        stored = _stored(traj, folder, estimator)
        if stored is not None:
            return stored, True
        result = estimator.embed(traj)
        tensors = {f"{s}/{n}": v for s, offset in result.offsets.items() for n, v in offset.items()}
        meta = {
            "estimator": result.estimator,
            "settings": dict(result.settings),
            "version": estimator.version,
            "stages": list(result.offsets),
            "seconds": result.seconds,
            "counts": dict(result.counts),
            "meaning": "offset[k] estimates theta_T^(-k) - theta_T",
        }
        if estimator.trains:
            dtype = current().training_dtype
            meta["training_dtype"] = "recorded" if dtype is None else current().dtype
        save_artifact(traj, folder, OFFSETS, SCHEMA, SCHEMA_VERSION, tensors, meta)
        return result, False


def _stored(traj: Trajectory, folder: str, estimator: Estimator) -> StageEmbeddings | None:
    """Stored embeddings in ``folder``, refused if they were made with other settings."""
    stored = load_artifact(traj, folder, OFFSETS, SCHEMA, SCHEMA_VERSION)
    if stored is None:
        return None
    meta = stored.meta
    if meta["estimator"] != estimator.name or meta["settings"] != estimator.settings():
        raise TrajectoryError(
            traj.cache.where(folder),
            f"holds {meta['estimator']} embeddings with settings {meta['settings']}, not "
            f"{estimator.name} with {estimator.settings()}",
            f"delete {folder} so that it is computed again",
        )
    offsets: dict[str, Offsets] = {s: {} for s in meta["stages"]}
    for key, value in stored.tensors.items():
        stage, _, name = key.partition("/")
        offsets[stage][name] = value
    return StageEmbeddings(
        meta["estimator"], meta["settings"], offsets, meta["seconds"], meta["counts"]
    )


def final_parameter_names(traj: Trajectory) -> list[str]:
    """Names of the final model's parameters (buffers excluded)."""
    return [n for n, _ in traj.build_model(len(traj.stages) - 1).named_parameters()]


def final_buffer_names(traj: Trajectory) -> list[str]:
    """Names of the final model's floating-point buffers (e.g. BatchNorm running statistics)."""
    model = traj.build_model(len(traj.stages) - 1)
    return [n for n, b in model.named_buffers() if b.is_floating_point()]


def stage_displacement(
    traj: Trajectory,
    k: int,
    names: list[str],
    buffers: bool | None = None,
    device: torch.device | str = "cpu",
) -> Offsets:
    """``delta_k = theta_{t_{k-1}} - theta_{t_k}`` (float64, on ``device``, where an
    estimator carries it on): minus the net displacement of stage k,
    over the parameters ``names`` that exist when stage k starts and, with ``buffers`` (by
    default for the last stage only), the final model's floating-point buffers, so that the last
    stage's embedding is the exact offset of the whole state (running statistics included).
    Earlier stages' embeddings carry parameters only: running statistics are re-estimated by
    the later stages, which the estimators do not model."""
    start, end = traj.checkpoint(k, "start"), traj.checkpoint(k, "end")
    if buffers is None:
        buffers = k == len(traj.stages) - 1
    if buffers:
        names = [*names, *(n for n in final_buffer_names(traj) if n not in names)]
    return {
        n: start[n].to(device, torch.float64) - end[n].to(device, torch.float64)
        for n in names
        if n in start
    }
