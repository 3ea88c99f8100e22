"""The record of a multi-stage training run: a versioned JSON manifest plus safetensors files.

Layout of a trajectory directory (see docs/trajectory.md)::

    manifest.json                         schema, model reference, stages (appended as they finish)
    stages/NN-<name>/start.safetensors    parameters and buffers entering the stage, theta_{t_{k-1}}
                                          (its adapters added, its re-initialisations not yet done)
    stages/NN-<name>/end.safetensors      parameters and buffers after its last step
    stages/NN-<name>/optimizer_start.safetensors   optimizer state the stage started from
    stages/NN-<name>/optimizer_end.safetensors     optimizer state after its last step
    stages/NN-<name>/steps.safetensors    per-step learning rates and batch indices
    stages/NN-<name>/inner/step-TTTTTT.safetensors   parameters and buffers before step T
                                          (only for stages recorded with checkpoint_every)

    .lock                                 while a process records into the directory

Files are written before the manifest that lists them, each atomically, so an interrupted run
leaves a manifest that lists only complete stages. One process at a time records into a
directory (``.lock``). Derived results (counterfactuals, embeddings) go to the trajectory's
``cache``: the directory itself by default, another directory, or memory.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from attribution.record import SIGN_CONVENTION
from attribution.record.compute import current as current_compute
from attribution.record.entry import apply_entry, is_structural
from attribution.record.errors import (
    SpecError,
    StagetraceError,
    TrajectoryError,
    UnknownStageError,
)
from attribution.record.optim import HYPERPARAMETERS, OptimizerState
from attribution.record.references import Ref
from attribution.record.spec import (
    ENTRY_KINDS,
    POLICIES,
    STAGE_KINDS,
    EntryAction,
    check_clip_grad_norm,
    is_safe_name,
)
from attribution.record.store import REWRITE, DiskStore, FileLock, MemoryStore, Store

SCHEMA = "stagetrace.trajectory"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
FILE_ROLES = ("start", "end", "optimizer_start", "optimizer_end", "steps")
REPAIR = "re-record the run, or repair the manifest by hand following docs/trajectory.md"
LOCK = ".lock"
"""The file a process holds an exclusive flock on while it records into a directory, or computes
a derived result in a folder of the cache (docs/trajectory.md, section 1)."""

Cache = Path | str | Literal[False] | None
"""Where a trajectory keeps derived results: None the trajectory itself, a directory path, or
False for memory (nothing written)."""


@dataclass(frozen=True)
class Environment:
    """What, besides the record, decides a CPU run's floating-point results: the torch version,
    the intra-op thread count (it changes how kernels split sums), the deterministic-algorithms
    flag, the device and the CPU kernels torch dispatches to (``cpu``, e.g. "AVX2"; None where
    torch does not say). Replays and retraining apply ``threads`` and ``deterministic``
    (``pipeline.recorded_threads``); the others they cannot change, so they name them."""

    torch: str
    threads: int
    deterministic: bool
    device: str = "cpu"
    cpu: str | None = None

    @classmethod
    def current(cls, device: str | None = None) -> Environment:
        """The environment of this process, training on ``device`` (a device type; default
        where this process records, ``compute.current().recording()``: the CPU unless a
        device was asked)."""
        if device is None:
            device = current_compute().recording().torch_device.type
        try:
            cpu: str | None = torch.backends.cpu.get_cpu_capability()
        except AttributeError:  # torch < 2.1
            cpu = None
        return cls(
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            deterministic=torch.are_deterministic_algorithms_enabled(),
            device=device,
            cpu=cpu,
        )

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``environment`` object."""
        return {
            "torch": self.torch,
            "threads": self.threads,
            "deterministic_algorithms": self.deterministic,
            "device": self.device,
            "cpu_capability": self.cpu,
        }

    def differences(self, now: Environment, verb: str = "replayed") -> tuple[str, ...]:
        """What differs between this (recorded) environment and ``now`` that a replay cannot
        set back, e.g. "recorded with torch 2.12.0, replayed with 2.13.0"."""
        notes = []
        if self.torch != now.torch:
            notes.append(f"recorded with torch {self.torch}, {verb} with {now.torch}")
        if self.device != now.device:
            notes.append(f"recorded on {self.device}, {verb} on {now.device}")
        if self.cpu is not None and now.cpu is not None and self.cpu != now.cpu:
            notes.append(f"recorded with {self.cpu} CPU kernels, {verb} with {now.cpu}")
        return tuple(notes)


@dataclass(frozen=True)
class ParamGroup:
    """Parameters (by name) sharing hyperparameters; ``hyper['lr']`` is the base learning rate."""

    params: tuple[str, ...]
    hyper: Mapping[str, Any]


REPLAY_CAUSES = (
    "the loop modified gradients or parameters outside the optimizer step (gradient clipping "
    "not declared, gradient accumulation, a second optimizer, ...), or computed the loss "
    "otherwise than loss(model(inputs), targets) on the logged batch"
)


@dataclass(frozen=True)
class Verification:
    """The check a ``Recorder`` makes when a stage ends: its first ``steps`` steps replayed from
    the stage's start by ``train_stage``, compared with what the user's loop produced.

    ``step`` is the first step (0-based) after which parameters or buffers differ (None: none
    did); ``difference`` the largest absolute difference over the checked steps; ``problem``
    says why the replay could not run at all (e.g. the data reference does not load).
    """

    steps: int
    step: int | None = None
    difference: float = 0.0
    problem: str | None = None

    @property
    def passed(self) -> bool:
        return self.step is None and self.problem is None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "steps": self.steps,
            "step": self.step,
            "difference": self.difference,
        }
        if self.problem is not None:
            out["problem"] = self.problem
        return out


@dataclass(frozen=True)
class StageRecord:
    """What a stage did, resolved to explicit parameter names, seeds and counts.

    ``clip_grad_norm``: the gradients of the trained parameters were clipped to that total
    2-norm before every step (None: not clipped). ``verified``: whether the stage's steps are
    known to replay exactly (True for declared pipelines, the outcome of ``verification`` for
    Recorder stages, None when not checked: older manifests, stages without batch order).
    """

    name: str
    kind: str
    data: Ref
    loss: str
    optimizer: str
    groups: tuple[ParamGroup, ...]
    num_steps: int
    seed: int
    batch_size: int | None = None
    schedule: Mapping[str, Any] | None = None
    entry: tuple[EntryAction, ...] = ()
    optimizer_policy: str = "reset"
    checkpoint_every: int | None = None
    clip_grad_norm: float | None = None
    verified: bool | None = None
    verification: Verification | None = None

    @property
    def trainable(self) -> tuple[str, ...]:
        """Names of the parameters this stage updated; all others were frozen."""
        return tuple(n for g in self.groups for n in g.params)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's stage object, less ``files`` (``checkpoint_every``, ``clip_grad_norm``,
        ``verified`` and ``verification`` only when set)."""
        out = {
            "name": self.name,
            "kind": self.kind,
            "data": self.data.to_dict(),
            "loss": self.loss,
            "optimizer": {
                "type": self.optimizer,
                "groups": [{"params": list(g.params), **g.hyper} for g in self.groups],
            },
            "schedule": dict(self.schedule) if self.schedule else None,
            "batch_size": self.batch_size,
            "num_steps": self.num_steps,
            "seed": self.seed,
            "entry": [a.to_dict() for a in self.entry],
            "optimizer_policy": self.optimizer_policy,
        }
        if self.checkpoint_every is not None:
            out["checkpoint_every"] = self.checkpoint_every
        if self.clip_grad_norm is not None:
            out["clip_grad_norm"] = self.clip_grad_norm
        if self.verified is not None:
            out["verified"] = self.verified
        if self.verification is not None:
            out["verification"] = self.verification.to_dict()
        return out

    def checkpoint_steps(self) -> list[int]:
        """Steps t before which a recording saves the state: N, 2N, ... below ``num_steps`` for
        ``checkpoint_every = N``, none without it (step 0's state is ``start`` plus the stage's
        ``reinit`` actions, so it is never saved twice)."""
        every = self.checkpoint_every
        return list(range(every, self.num_steps, every)) if every else []

    @classmethod
    def from_dict(cls, obj: Any, path: str, where: str) -> StageRecord:
        check = _Checker(path, where)
        obj = check.mapping(obj, "")
        optimizer = check.mapping(obj.get("optimizer"), "optimizer")
        kind = check.choice(optimizer.get("type"), "optimizer.type", tuple(HYPERPARAMETERS))
        groups = []
        for i, g in enumerate(
            check.list(optimizer.get("groups"), "optimizer.groups", nonempty=True)
        ):
            g = dict(check.mapping(g, f"optimizer.groups[{i}]"))
            params = check.list(g.pop("params", None), f"optimizer.groups[{i}].params")
            missing = {*HYPERPARAMETERS[kind], "lr"} - set(g)
            if missing:
                check.fail(f"optimizer.groups[{i}]", f"missing hyperparameters {sorted(missing)}")
            groups.append(ParamGroup(tuple(params), g))
        entry = []
        for i, a in enumerate(check.list(obj.get("entry", []), "entry")):
            a = dict(check.mapping(a, f"entry[{i}]"))
            check.choice(a.get("kind"), f"entry[{i}].kind", ENTRY_KINDS)
            try:
                entry.append(EntryAction(a.pop("kind"), tuple(a.pop("modules")), **a))
            except (KeyError, TypeError) as exc:
                check.fail(f"entry[{i}]", f"not a valid entry action ({exc})")
        try:
            data = Ref.from_dict(obj.get("data"), "data")
        except StagetraceError:
            check.fail("data", "expected {target, kwargs}")
        return cls(
            name=check.name(obj.get("name"), "name"),
            kind=check.choice(obj.get("kind"), "kind", STAGE_KINDS),
            data=data,
            loss=check.string(obj.get("loss"), "loss"),
            optimizer=kind,
            groups=tuple(groups),
            num_steps=check.integer(obj.get("num_steps"), "num_steps", minimum=1),
            seed=check.integer(obj.get("seed"), "seed", minimum=0),
            batch_size=obj.get("batch_size"),
            schedule=obj.get("schedule"),
            entry=tuple(entry),
            optimizer_policy=check.choice(
                obj.get("optimizer_policy", "reset"), "optimizer_policy", POLICIES
            ),
            checkpoint_every=None
            if obj.get("checkpoint_every") is None
            else check.integer(obj["checkpoint_every"], "checkpoint_every", minimum=1),
            clip_grad_norm=check.clip(obj.get("clip_grad_norm"), "clip_grad_norm"),
            verified=check.optional_bool(obj.get("verified"), "verified"),
            verification=None
            if obj.get("verification") is None
            else _verification(check, obj["verification"]),
        )


def _verification(check: _Checker, obj: Any) -> Verification:
    obj = check.mapping(obj, "verification")
    step = obj.get("step")
    difference = obj.get("difference", 0.0)
    if not isinstance(difference, (int, float)) or isinstance(difference, bool):
        check.fail("verification.difference", f"expected a number, got {difference!r}")
    problem = obj.get("problem")
    return Verification(
        steps=check.integer(obj.get("steps"), "verification.steps", minimum=0),
        step=None if step is None else check.integer(step, "verification.step", minimum=0),
        difference=float(difference),
        problem=None if problem is None else check.string(problem, "verification.problem"),
    )


@dataclass(frozen=True)
class StepLog:
    """Per-step records of a stage: learning rates and the dataset indices of each batch.

    ``lr`` is float64 [num_steps, num_groups]; batch t is
    ``indices[offsets[t]:offsets[t + 1]]`` (int64), so batches may differ in size.
    """

    lr: torch.Tensor
    offsets: torch.Tensor
    indices: torch.Tensor

    @property
    def num_steps(self) -> int:
        return self.lr.shape[0]

    @property
    def has_batch_order(self) -> bool:
        """Whether every step's batch was recorded (replays and E2 need it)."""
        return bool((self.offsets[1:] > self.offsets[:-1]).all())

    def batch(self, t: int) -> torch.Tensor:
        return self.indices[self.offsets[t] : self.offsets[t + 1]]

    @classmethod
    def from_batches(cls, lr: list[list[float]], batches: list[torch.Tensor]) -> StepLog:
        sizes = torch.tensor([0] + [len(b) for b in batches], dtype=torch.int64)
        indices = (
            torch.cat(batches).to(torch.int64) if batches else torch.zeros(0, dtype=torch.int64)
        )
        return cls(torch.tensor(lr, dtype=torch.float64), sizes.cumsum(0), indices)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"lr": self.lr, "batch_offsets": self.offsets, "batch_indices": self.indices}


class Trajectory:
    """A recorded run: its manifest and its files, on disk or in memory.

    Create with ``Trajectory.create`` (new, empty) or ``Trajectory.open`` (existing, validated).
    """

    def __init__(
        self,
        store: Store,
        manifest: dict[str, Any],
        stages: list[StageRecord],
        cache: Cache = None,
    ) -> None:
        self.store = store
        self._manifest = manifest
        self.stages = stages
        self._cache = cache
        self._memory = MemoryStore() if cache is False else None
        self._lock: FileLock | None = None

    @property
    def cache(self) -> Store:
        """Where derived results (counterfactuals, embeddings) are read and written: the
        trajectory's own store by default; for a cache directory DIR, ``DIR/<the first 16 hex
        digits of the fingerprint>`` (one folder per recording, so one DIR serves many runs);
        with ``cache=False`` memory held by this object, so nothing is written."""
        if self._memory is not None:
            return self._memory
        if self._cache is None:
            return self.store
        return DiskStore(Path(self._cache) / self.fingerprint()[:16])

    def with_cache(self, cache: Cache) -> Trajectory:
        """The same run (sharing its manifest and stages) with derived results kept in
        ``cache`` (see ``cache``); the recording lock, if any, stays with this object."""
        return Trajectory(self.store, self._manifest, self.stages, cache)

    @property
    def environment(self) -> Environment | None:
        """The recording process's environment (None for manifests written before it was
        recorded)."""
        env = self._manifest.get("environment")
        if env is None:
            return None
        return Environment(
            torch=env["torch"],
            threads=env["threads"],
            deterministic=env["deterministic_algorithms"],
            device=env.get("device", "cpu"),
            cpu=env.get("cpu_capability"),
        )

    @property
    def root(self) -> Path | None:
        return self.store.root if isinstance(self.store, DiskStore) else None

    @property
    def model(self) -> Ref:
        return Ref.from_dict(self._manifest["model"], "model")

    @property
    def pipeline(self) -> dict[str, Any] | None:
        """The declared pipeline that produced the run (None for recorder-made runs)."""
        return self._manifest.get("pipeline")

    @property
    def complete(self) -> bool:
        return bool(self._manifest.get("complete"))

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    @classmethod
    def create(
        cls,
        root: Path | str | None,
        model: Ref,
        pipeline: dict[str, Any] | None = None,
        *,
        resume: bool = False,
    ) -> Trajectory:
        """A new empty trajectory under ``root`` (None: in memory), for this process to record.

        On disk, the directory's ``.lock`` is taken first and held until ``close()`` (or the
        process ends): a directory another process records into is refused. Refuses to
        overwrite a trajectory that records any stage, except that with ``resume`` one recording
        the same ``pipeline`` is returned (locked) to be continued; one that records none (a
        run that failed in its first stage) holds no results and is replaced.
        """
        store: Store = MemoryStore() if root is None else DiskStore(root)
        lock = None if root is None else _take_recording_lock(Path(root))
        try:
            traj = cls._create_or_resume(store, model, pipeline, resume)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        traj._lock = lock
        return traj

    @classmethod
    def _create_or_resume(
        cls, store: Store, model: Ref, pipeline: dict[str, Any] | None, resume: bool
    ) -> Trajectory:
        if store.exists(MANIFEST):
            existing = cls.from_store(store)
            if existing.stages and not resume:
                raise TrajectoryError(
                    store.where(MANIFEST),
                    "a trajectory is already recorded here",
                    "choose a new directory, or delete this one to record again",
                )
            if existing.stages:
                if _canonical(existing.pipeline) != _canonical(pipeline):
                    raise TrajectoryError(
                        store.where(MANIFEST),
                        "holds a run of a different pipeline",
                        "choose a new directory for this configuration",
                        field="pipeline",
                    )
                return existing
        manifest = {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "sign_convention": SIGN_CONVENTION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "environment": Environment.current().to_dict(),
            "model": model.to_dict(),
            "pipeline": pipeline,
            "complete": False,
            "stages": [],
        }
        traj = cls(store, manifest, [])
        traj._write_manifest()
        return traj

    def close(self) -> None:
        """Release the recording lock if this object holds one (``create``); the trajectory
        stays readable. Called when a recording ends; a killed process releases it too."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @classmethod
    def open(cls, root: Path | str, cache: Cache = None) -> Trajectory:
        """Open and validate a trajectory directory; errors name the file and the field.
        Opening writes nothing; ``cache`` says where derived results go (see ``cache``)."""
        root = Path(root)
        if root.name == MANIFEST and root.is_file():
            root = root.parent
        if not (root / MANIFEST).is_file() and (root / "trajectory" / MANIFEST).is_file():
            root = root / "trajectory"
        if not (root / MANIFEST).is_file():
            raise TrajectoryError(
                root,
                "no such directory" if not root.is_dir() else f"holds no {MANIFEST}",
                "give a trajectory directory (the one holding manifest.json) or a Hydra run "
                "directory with a trajectory/ folder",
            )
        return cls.from_store(DiskStore(root), cache)

    @classmethod
    def from_store(cls, store: Store, cache: Cache = None) -> Trajectory:
        path = store.where(MANIFEST)
        manifest = store.get_json(MANIFEST)
        check = _Checker(path, "")
        check.mapping(manifest, "")
        if manifest.get("schema") != SCHEMA:
            check.fail("schema", f"expected {SCHEMA!r}, got {manifest.get('schema')!r}")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise TrajectoryError(
                path,
                f"schema_version {version!r} is not supported (this "
                f"stagetrace reads version {SCHEMA_VERSION})",
                "open it with the stagetrace version that wrote it, or re-record "
                "the run with this one",
                field="schema_version",
            )
        try:
            Ref.from_dict(manifest.get("model"), "model")
        except StagetraceError:
            check.fail("model", "expected {target, kwargs}")
        stages = []
        for i, entry in enumerate(check.list(manifest.get("stages"), "stages")):
            record = StageRecord.from_dict(entry, path, f"stages[{i}]")
            files = check.mapping(entry.get("files"), f"stages[{i}].files")
            for role in FILE_ROLES:
                check.file(store, files.get(role), f"stages[{i}].files.{role}", record.name, role)
            inner = check.list(entry.get("inner_checkpoints", []), f"stages[{i}].inner_checkpoints")
            previous = 0
            for j, info in enumerate(inner):
                field = f"stages[{i}].inner_checkpoints[{j}]"
                step = check.integer(
                    check.mapping(info, field).get("step"), f"{field}.step", minimum=previous + 1
                )
                if step >= record.num_steps:
                    check.fail(f"{field}.step", f"must be below num_steps {record.num_steps}")
                check.file(store, info, field, record.name, f"state before step {step}")
                previous = step
            stages.append(record)
        if len({s.name for s in stages}) != len(stages):
            check.fail("stages", "stage names are not unique")
        if manifest.get("environment") is not None:
            _check_environment(check, manifest["environment"])
        return cls(store, manifest, stages, cache)

    def index(self, stage: str | int) -> int:
        """The position of a stage given by name or index."""
        if isinstance(stage, int) and 0 <= stage < len(self.stages):
            return stage
        if stage in self.names:
            return self.names.index(stage)
        raise UnknownStageError(str(stage), self.names)

    def check_replayable(self, stage: str | int) -> None:
        """Refuse a stage whose recorded steps are known not to replay exactly (a Recorder
        stage whose record-time check failed, ``verified: false``): replays, retraining and the
        estimators that replay it would run other steps than the user's loop did. Stages not
        checked (``verified`` absent) pass; a missing batch order is refused where it is used.
        """
        i = self.index(stage)
        record = self.stages[i]
        if record.verified is not False:
            return
        check = record.verification
        if check is not None and check.problem is not None:
            problem = f"could not be replayed when it was recorded ({check.problem})"
        elif check is not None and check.step is not None:
            problem = (
                f"does not replay: when it was recorded, step {check.step} replayed from the "
                f"stage's start differed from the loop's result by up to {check.difference:.3g} "
                f"(of the first {check.steps} steps checked); likely cause: {REPLAY_CAUSES}"
            )
        else:
            problem = f"was recorded as not replaying exactly; likely cause: {REPLAY_CAUSES}"
        raise TrajectoryError(
            self.store.where(MANIFEST),
            problem,
            "make the replay repeat what the loop does (declare gradient clipping with "
            "Recorder.stage(..., clip_grad_norm=max_norm); remove other changes from the loop) "
            "and record the stage again; estimators that need no replay (e0, e1) can still "
            "audit this run",
            field=f"stages[{i}].verified",
            stage=record.name,
            step=None if check is None else check.step,
        )

    def _file(self, stage: str | int, role: str) -> tuple[str, str]:
        info = self._manifest["stages"][self.index(stage)]["files"][role]
        return info["path"], info.get("sha256")

    def checkpoint(self, stage: str | int, which: str) -> dict[str, torch.Tensor]:
        """Parameters and buffers at a stage's ``"start"`` or ``"end"``."""
        return self.store.get_tensors(*self._file(stage, which))

    def inner_steps(self, stage: str | int) -> list[int]:
        """The steps t (ascending) before which the stage's state was saved: empty unless it was
        recorded with ``checkpoint_every``. Step 0's state is ``start`` plus ``reinit`` actions."""
        return [c["step"] for c in self._inner(stage)]

    def inner_checkpoint(self, stage: str | int, t: int) -> dict[str, torch.Tensor]:
        """Parameters and buffers of a stage before its step ``t`` (after ``t`` of its steps)."""
        for saved in self._inner(stage):
            if saved["step"] == t:
                return self.store.get_tensors(saved["path"], saved["sha256"])
        record = self.stages[self.index(stage)]
        steps = self.inner_steps(stage)
        raise StagetraceError(
            f"stage {record.name!r} saved no state before step {t!r}. Fix: "
            + (
                f"use one of the saved steps {steps}"
                if steps
                else "record the stage with checkpoint_every: N to save states inside it"
            )
        )

    def _inner(self, stage: str | int) -> list[dict[str, Any]]:
        return self._manifest["stages"][self.index(stage)].get("inner_checkpoints", [])

    def optimizer_state(self, stage: str | int, which: str) -> OptimizerState:
        """Optimizer state by parameter name at a stage's ``"start"`` or ``"end"``."""
        flat = self.store.get_tensors(*self._file(stage, f"optimizer_{which}"))
        state: OptimizerState = {}
        for key, value in flat.items():
            param, _, slot = key.rpartition("/")
            state.setdefault(param, {})[slot] = value
        return state

    def steps(self, stage: str | int) -> StepLog:
        """The per-step learning rates and batch indices of a stage."""
        i = self.index(stage)
        name, sha = self._file(i, "steps")
        t = self.store.get_tensors(name, sha)
        try:
            log = StepLog(t["lr"], t["batch_offsets"], t["batch_indices"])
        except KeyError as exc:
            raise TrajectoryError(
                self.store.where(name), f"tensor {exc} is missing", REWRITE
            ) from exc
        record = self.stages[i]
        if log.lr.shape != (record.num_steps, len(record.groups)) or log.offsets.shape != (
            record.num_steps + 1,
        ):
            raise TrajectoryError(
                self.store.where(name),
                f"holds {log.lr.shape[0]} steps x "
                f"{log.lr.shape[1] if log.lr.ndim == 2 else '?'} groups, the "
                f"manifest says {record.num_steps} x {len(record.groups)}",
                REWRITE,
                field="lr",
            )
        return log

    def build_model(self, stage: str | int) -> nn.Module:
        """A model with the structure of ``stage`` (its and earlier stages' adapters added)."""
        ref = self.model
        model = ref.call()
        for record in self.stages[: self.index(stage) + 1]:
            for action in record.entry:
                if is_structural(action):
                    apply_entry(model, action, f"stage {record.name} entry")
        return model

    def load_model(self, stage: str | int, which: str) -> nn.Module:
        """A model holding the parameters and buffers of a stage's ``"start"`` or ``"end"``."""
        model = self.build_model(stage)
        load_state(
            model, self.checkpoint(stage, which), self.store.where(self._file(stage, which)[0])
        )
        return model

    def append_stage(
        self,
        record: StageRecord,
        start: Mapping[str, torch.Tensor],
        end: Mapping[str, torch.Tensor],
        optimizer_start: OptimizerState,
        optimizer_end: OptimizerState,
        steps: StepLog,
        inner: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """Write a finished stage's files, then list it in the manifest (atomically) with the
        inner checkpoints that ``write_inner_checkpoint`` already wrote for it."""
        folder = self._folder(record.name)
        blobs = {
            "start": dict(start),
            "end": dict(end),
            "optimizer_start": flatten_state(optimizer_start),
            "optimizer_end": flatten_state(optimizer_end),
            "steps": steps.to_tensors(),
        }
        files = {}
        for role, tensors in blobs.items():
            name = f"{folder}/{role}.safetensors"
            meta = {"schema": SCHEMA, "stage": record.name, "role": role}
            files[role] = {"path": name, "sha256": self.store.put_tensors(name, tensors, meta)}
        entry = {**record.to_dict(), "files": files}
        if record.checkpoint_every is not None or inner:
            entry["inner_checkpoints"] = [dict(c) for c in inner]
        self._manifest["stages"].append(entry)
        self.stages.append(record)
        self._write_manifest()

    def write_inner_checkpoint(
        self, stage: str, t: int, tensors: Mapping[str, torch.Tensor]
    ) -> dict[str, Any]:
        """Write the state before step ``t`` of ``stage``, the stage being recorded (not yet
        appended); return its manifest entry, to pass to ``append_stage``. Unlisted until then,
        like the stage's other files."""
        name = f"{self._folder(stage)}/inner/step-{t:06d}.safetensors"
        meta = {"schema": SCHEMA, "stage": stage, "role": "inner", "step": str(t)}
        return {
            "step": t,
            "path": name,
            "sha256": self.store.put_tensors(name, dict(tensors), meta),
        }

    def _folder(self, stage: str) -> str:
        """The folder of the next stage to be appended."""
        if stage in self.names:
            raise StagetraceError(
                f"stage {stage!r} is already recorded; Fix: give each stage a unique name"
            )
        return f"stages/{len(self.stages):02d}-{stage}"

    def mark_complete(self) -> None:
        """Record that every declared stage has run."""
        self._manifest["complete"] = True
        self._write_manifest()

    def fingerprint(self) -> str:
        """A sha256 that changes whenever the recorded run changes (used to key derived results)."""
        body = {"model": self._manifest["model"], "stages": self._manifest["stages"]}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()

    def _write_manifest(self) -> None:
        self.store.put_json(MANIFEST, self._manifest)


def _take_recording_lock(root: Path) -> FileLock:
    """The lock on ``root/.lock`` for a recording, or an error naming the directory."""
    try:
        lock = FileLock.take(root / LOCK, wait=False)
    except OSError as exc:
        raise TrajectoryError(
            root,
            f"cannot be recorded into ({exc.strerror or exc})",
            "record into a directory this process can write",
        ) from exc
    if lock is None:
        raise TrajectoryError(
            root,
            f"another recording is in progress in this directory (its lock {root / LOCK} is held)",
            "wait for that recording to finish and run again (an interrupted run resumes), or "
            "record into another directory",
        )
    return lock


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def _check_environment(check: _Checker, obj: Any) -> None:
    env = check.mapping(obj, "environment")
    check.string(env.get("torch"), "environment.torch")
    check.integer(env.get("threads"), "environment.threads", minimum=1)
    if not isinstance(env.get("deterministic_algorithms"), bool):
        check.fail(
            "environment.deterministic_algorithms",
            f"expected true or false, got {env.get('deterministic_algorithms')!r}",
        )
    check.string(env.get("device", "cpu"), "environment.device")
    if env.get("cpu_capability") is not None:
        check.string(env["cpu_capability"], "environment.cpu_capability")


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a model's parameters and buffers (never aliasing live tensors)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def load_state(model: nn.Module, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Copy ``tensors`` into ``model``; a mismatch names the keys and the file."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label} {keys[:5]}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", wrong),
            )
            if keys
        )
        raise TrajectoryError(
            where,
            f"does not fit the model ({detail})",
            "check the model reference and its arguments in the manifest",
        )
    model.load_state_dict(dict(tensors))


def flatten_state(state: OptimizerState) -> dict[str, torch.Tensor]:
    """Optimizer state as one flat dict keyed ``<parameter name>/<slot>``."""
    return {
        f"{param}/{slot}": value for param, slots in state.items() for slot, value in slots.items()
    }


class _Checker:
    """Validation helpers that raise ``TrajectoryError`` naming the file and the field."""

    def __init__(self, path: str, where: str) -> None:
        self.path = path
        self.where = where

    def fail(self, field: str, problem: str) -> None:
        name = ".".join(p for p in (self.where, field) if p) or "(top level)"
        raise TrajectoryError(self.path, problem, REPAIR, field=name)

    def mapping(self, value: Any, field: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            self.fail(field, f"expected an object, got {type(value).__name__}")
        return value

    def list(self, value: Any, field: str, nonempty: bool = False) -> list[Any]:
        if not isinstance(value, list) or (nonempty and not value):
            self.fail(field, f"expected a{' non-empty' if nonempty else ''} list, got {value!r}")
        return value

    def string(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not value:
            self.fail(field, f"expected a non-empty string, got {value!r}")
        return value

    def name(self, value: Any, field: str) -> str:
        if not is_safe_name(value):
            self.fail(
                field, f"expected a stage name of letters, digits, '_', '.', '-', got {value!r}"
            )
        return value

    def integer(self, value: Any, field: str, minimum: int) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            self.fail(field, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def file(self, store: Store, info: Any, field: str, stage: str, role: str) -> None:
        """A file entry ``{path, sha256}``: the path stays inside the trajectory and exists."""
        name = self.string(self.mapping(info, field).get("path"), f"{field}.path")
        if name.startswith("/") or ".." in name.split("/"):
            self.fail(f"{field}.path", "must stay inside the trajectory")
        self.string(info.get("sha256"), f"{field}.sha256")
        if not store.exists(name):
            raise TrajectoryError(
                store.where(name), f"file of stage {stage!r} ({role}) is missing", REWRITE
            )

    def clip(self, value: Any, field: str) -> float | None:
        """A gradient-clipping threshold (``spec.check_clip_grad_norm``): None or positive."""
        try:
            return check_clip_grad_norm(value, field)
        except SpecError:
            self.fail(field, f"expected a positive number or null, got {value!r}")

    def optional_bool(self, value: Any, field: str) -> bool | None:
        if value is not None and not isinstance(value, bool):
            self.fail(field, f"expected true, false or null, got {value!r}")
        return value

    def choice(self, value: Any, field: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            self.fail(field, f"expected one of {list(choices)}, got {value!r}")
        return value
