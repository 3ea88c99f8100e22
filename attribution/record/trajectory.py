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

Files are written before the manifest that lists them, each atomically, so an interrupted run
leaves a manifest that lists only complete stages.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attribution.record import SIGN_CONVENTION
from attribution.record.entry import apply_entry, is_structural
from attribution.record.errors import StagetraceError, TrajectoryError, UnknownStageError
from attribution.record.optim import HYPERPARAMETERS, OptimizerState
from attribution.record.references import Ref
from attribution.record.spec import ENTRY_KINDS, POLICIES, STAGE_KINDS, EntryAction, is_safe_name
from attribution.record.store import REWRITE, DiskStore, MemoryStore, Store

SCHEMA = "stagetrace.trajectory"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
FILE_ROLES = ("start", "end", "optimizer_start", "optimizer_end", "steps")
REPAIR = "re-record the run, or repair the manifest by hand following docs/trajectory.md"


@dataclass(frozen=True)
class ParamGroup:
    """Parameters (by name) sharing hyperparameters; ``hyper['lr']`` is the base learning rate."""

    params: tuple[str, ...]
    hyper: Mapping[str, Any]


@dataclass(frozen=True)
class StageRecord:
    """What a stage did, resolved to explicit parameter names, seeds and counts."""

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

    @property
    def trainable(self) -> tuple[str, ...]:
        """Names of the parameters this stage updated; all others were frozen."""
        return tuple(n for g in self.groups for n in g.params)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's stage object, less ``files`` (``checkpoint_every`` only when set)."""
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

    def __init__(self, store: Store, manifest: dict[str, Any], stages: list[StageRecord]) -> None:
        self.store = store
        self._manifest = manifest
        self.stages = stages

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
        cls, root: Path | str | None, model: Ref, pipeline: dict[str, Any] | None = None
    ) -> Trajectory:
        """A new empty trajectory under ``root`` (None: in memory).

        Refuses to overwrite a trajectory that records any stage; one that records none (a run
        that failed in its first stage) holds no results and is replaced.
        """
        store: Store = MemoryStore() if root is None else DiskStore(root)
        if store.exists(MANIFEST) and cls.from_store(store).stages:
            raise TrajectoryError(
                store.where(MANIFEST),
                "a trajectory is already recorded here",
                "choose a new directory, or delete this one to record again",
            )
        manifest = {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "sign_convention": SIGN_CONVENTION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": model.to_dict(),
            "pipeline": pipeline,
            "complete": False,
            "stages": [],
        }
        traj = cls(store, manifest, [])
        traj._write_manifest()
        return traj

    @classmethod
    def open(cls, root: Path | str) -> Trajectory:
        """Open and validate a trajectory directory; errors name the file and the field."""
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
        return cls.from_store(DiskStore(root))

    @classmethod
    def from_store(cls, store: Store) -> Trajectory:
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
        return cls(store, manifest, stages)

    def index(self, stage: str | int) -> int:
        """The position of a stage given by name or index."""
        if isinstance(stage, int) and 0 <= stage < len(self.stages):
            return stage
        if stage in self.names:
            return self.names.index(stage)
        raise UnknownStageError(str(stage), self.names)

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

    def choice(self, value: Any, field: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            self.fail(field, f"expected one of {list(choices)}, got {value!r}")
        return value
