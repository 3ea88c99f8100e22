"""Declared pipelines: the stages a user asks for, validated before anything runs.

A ``PipelineSpec`` is what a Hydra config describes. At run time each ``StageSpec`` is resolved
against the live model into a ``StageRecord`` (explicit parameter names, seeds, per-step learning
rates), which is what the trajectory stores and what every replay reads.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from attribution.record.errors import SpecError
from attribution.record.optim import HYPERPARAMETERS
from attribution.record.references import Ref
from attribution.record.schedules import ScheduleSpec

STAGE_KINDS = ("pretrain", "finetune", "adapt")
POLICIES = ("reset", "carry")
ENTRY_KINDS = ("reinit", "add_lora")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def is_safe_name(name: Any) -> bool:
    """Stage names become folder names: letters, digits, ``_``, ``.``, ``-``; no leading dot."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def check_stage_name(name: Any, where: str) -> None:
    if not is_safe_name(name):
        raise SpecError(
            where,
            f"stage name {name!r} is not usable as a folder name",
            "use letters, digits, '_', '.' and '-' only",
        )


def check_clip_grad_norm(value: Any, where: str) -> float | None:
    """A gradient-clipping threshold: None (no clipping) or a positive finite number, the
    ``max_norm`` of ``torch.nn.utils.clip_grad_norm_`` (total 2-norm over the trained
    parameters' gradients, applied after backward and before the optimizer step)."""
    if value is None:
        return None
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise SpecError(
            where,
            f"expected a positive number (the max_norm of clip_grad_norm_), got {value!r}",
            "give the total gradient norm to clip to, e.g. 1.0, or remove the setting",
        )
    return float(value)


@dataclass(frozen=True)
class OptimizerSpec:
    """Optimizer type, base learning rate, hyperparameters, and per-pattern group overrides.

    ``groups`` is a tuple of ``(patterns, overrides)``: parameters whose name matches one of the
    glob ``patterns`` (first matching group wins) take those hyperparameter ``overrides``
    (``lr`` included); the rest form the default group.
    """

    type: str
    lr: float
    hyper: Mapping[str, Any] = field(default_factory=dict)
    groups: tuple[tuple[tuple[str, ...], Mapping[str, Any]], ...] = ()

    @classmethod
    def from_dict(cls, obj: Any, where: str) -> OptimizerSpec:
        obj = _mapping(obj or {}, where)
        kind = obj.pop("type", None)
        if kind not in HYPERPARAMETERS:
            raise SpecError(
                f"{where}.type",
                f"unknown optimizer {kind!r}",
                f"use one of {', '.join(HYPERPARAMETERS)}",
            )
        lr = obj.pop("lr", None)
        if not isinstance(lr, (int, float)) or lr <= 0:
            raise SpecError(
                f"{where}.lr",
                f"expected a positive learning rate, got {lr!r}",
                "give the stage's base learning rate",
            )
        groups = []
        for i, group in enumerate(_sequence(obj.pop("groups", None) or [], f"{where}.groups")):
            group = _mapping(group, f"{where}.groups[{i}]")
            patterns = _strings(group.pop("params", None), f"{where}.groups[{i}].params")
            _check_keys(group, (*HYPERPARAMETERS[kind], "lr"), f"{where}.groups[{i}]")
            groups.append((patterns, group))
        _check_keys(obj, HYPERPARAMETERS[kind], where)
        return cls(kind, float(lr), {**HYPERPARAMETERS[kind], **obj}, tuple(groups))

    def to_dict(self) -> dict[str, Any]:
        groups = [{"params": list(p), **o} for p, o in self.groups]
        return {"type": self.type, "lr": self.lr, **self.hyper, "groups": groups}


@dataclass(frozen=True)
class EntryAction:
    """A change made to the model when a stage starts, replayed identically in counterfactuals.

    ``reinit``: re-initialise the named modules (``reset_parameters``) from ``seed``.
    ``add_lora``: wrap the named ``nn.Linear`` modules with rank-``rank`` LoRA adapters
    (``lora_A`` from ``seed``, ``lora_B`` zero, scale ``alpha / rank``).
    """

    kind: str
    modules: tuple[str, ...]
    seed: int = 0
    rank: int = 4
    alpha: float = 8.0

    @classmethod
    def from_dict(cls, obj: Any, where: str, seed: int) -> EntryAction:
        obj = _mapping(obj, where)
        kind = obj.pop("kind", None)
        if kind not in ENTRY_KINDS:
            raise SpecError(
                f"{where}.kind",
                f"unknown entry action {kind!r}",
                f"use one of {', '.join(ENTRY_KINDS)}",
            )
        modules = _strings(obj.pop("modules", None), f"{where}.modules")
        allowed = ("seed", "rank", "alpha") if kind == "add_lora" else ("seed",)
        _check_keys(obj, allowed, where)
        action = cls(kind, modules, **{"seed": seed, **obj})
        if action.rank < 1:
            raise SpecError(f"{where}.rank", f"must be >= 1, got {action.rank}", "use rank >= 1")
        return action

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind, "modules": list(self.modules), "seed": self.seed}
        return {**out, "rank": self.rank, "alpha": self.alpha} if self.kind == "add_lora" else out


@dataclass(frozen=True)
class StageSpec:
    """One declared stage. Exactly one of ``steps`` and ``epochs`` is set.

    ``checkpoint_every = N`` saves the state before steps N, 2N, ... of the stage (see
    ``Trajectory.inner_steps``); None saves only the stage's boundaries. ``clip_grad_norm``
    clips the gradients of the trained parameters to that total norm before every step (None:
    no clipping).
    """

    name: str
    kind: str
    data: Ref
    optimizer: OptimizerSpec
    batch_size: int
    seed: int
    steps: int | None = None
    epochs: int | None = None
    loss: str = "cross_entropy"
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    trainable: tuple[str, ...] = ("*",)
    entry: tuple[EntryAction, ...] = ()
    optimizer_policy: str = "reset"
    checkpoint_every: int | None = None
    clip_grad_norm: float | None = None

    @classmethod
    def from_dict(cls, name: str, obj: Any, where: str) -> StageSpec:
        obj = _mapping(obj, where)
        _check_keys(obj, (*cls.__dataclass_fields__, "lr"), where)
        seed = _integer(obj, "seed", where, minimum=0)
        optimizer = dict(obj.pop("optimizer", None) or {})
        if "lr" in obj:
            optimizer["lr"] = obj.pop("lr")
        entry = tuple(
            EntryAction.from_dict(a, f"{where}.entry[{i}]", seed + 1000 * (i + 1))
            for i, a in enumerate(_sequence(obj.get("entry") or [], f"{where}.entry"))
        )
        stage = cls(
            name=name,
            kind=obj.get("kind", "finetune"),
            data=Ref.from_dict(obj.get("data"), f"{where}.data"),
            optimizer=OptimizerSpec.from_dict(optimizer, f"{where}.optimizer"),
            batch_size=_integer(obj, "batch_size", where, minimum=1),
            seed=seed,
            steps=obj.get("steps"),
            epochs=obj.get("epochs"),
            loss=obj.get("loss", "cross_entropy"),
            schedule=ScheduleSpec.from_dict(obj.get("schedule"), f"{where}.schedule"),
            trainable=_strings(obj.get("trainable", ["*"]), f"{where}.trainable"),
            entry=entry,
            optimizer_policy=obj.get("optimizer_policy", "reset"),
            checkpoint_every=obj.get("checkpoint_every"),
            clip_grad_norm=check_clip_grad_norm(
                obj.get("clip_grad_norm"), f"{where}.clip_grad_norm"
            ),
        )
        stage.validate(where)
        return stage

    def validate(self, where: str) -> None:
        check_stage_name(self.name, where)
        if self.kind not in STAGE_KINDS:
            raise SpecError(
                f"{where}.kind",
                f"unknown stage kind {self.kind!r}",
                f"use one of {', '.join(STAGE_KINDS)}",
            )
        if self.optimizer_policy not in POLICIES:
            raise SpecError(
                f"{where}.optimizer_policy",
                f"unknown policy {self.optimizer_policy!r}",
                f"use one of {', '.join(POLICIES)}",
            )
        if (self.steps is None) == (self.epochs is None):
            raise SpecError(
                where,
                "give exactly one of steps and epochs",
                "set steps (optimizer steps) or epochs (passes over the data)",
            )
        every = self.checkpoint_every
        if every is not None and (
            not isinstance(every, int) or isinstance(every, bool) or every < 1
        ):
            raise SpecError(
                f"{where}.checkpoint_every",
                f"expected an integer >= 1, got {every!r}",
                "set the number of steps between saved states inside the stage, or remove it",
            )
        check_clip_grad_norm(self.clip_grad_norm, f"{where}.clip_grad_norm")
        length = "steps" if self.steps is not None else "epochs"
        value = getattr(self, length)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SpecError(
                f"{where}.{length}",
                f"a stage must train at least once, got {value!r}",
                f"set {length} to a positive integer or remove the stage",
            )


@dataclass(frozen=True)
class PipelineSpec:
    """A model constructor (built under ``seed``) and its stages, in training order."""

    model: Ref
    stages: tuple[StageSpec, ...]
    seed: int = 0

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> PipelineSpec:
        stages_obj = obj.get("stages")
        if not isinstance(stages_obj, Mapping) or not stages_obj:
            raise SpecError(
                "pipeline.stages",
                "missing or empty",
                "declare stages as a mapping from stage name to settings, in order",
            )
        stages = tuple(
            StageSpec.from_dict(str(n), s, f"pipeline.stages.{n}") for n, s in stages_obj.items()
        )
        seed = _integer({"seed": 0, **obj}, "seed", "pipeline", minimum=0)
        spec = cls(Ref.from_dict(obj.get("model"), "pipeline.model"), stages, seed)
        spec.validate()
        return spec

    def validate(self) -> None:
        for i, stage in enumerate(self.stages):
            where = f"pipeline.stages.{stage.name}"
            stage.validate(where)
            if stage.optimizer_policy != "carry":
                continue
            if i == 0:
                raise SpecError(
                    f"{where}.optimizer_policy",
                    "the first stage has nothing to carry",
                    "use optimizer_policy: reset for the first stage",
                )
            previous = self.stages[i - 1].optimizer.type
            if previous != stage.optimizer.type:
                raise SpecError(
                    f"{where}.optimizer_policy",
                    f"cannot carry {previous} state into this {stage.optimizer.type} stage",
                    "use the same optimizer type or optimizer_policy: reset",
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "seed": self.seed,
            "stages": {s.name: _stage_dict(s) for s in self.stages},
        }


def _stage_dict(stage: StageSpec) -> dict[str, Any]:
    out = {
        "kind": stage.kind,
        "data": stage.data.to_dict(),
        "loss": stage.loss,
        "optimizer": stage.optimizer.to_dict(),
        "schedule": stage.schedule.to_dict(),
        "batch_size": stage.batch_size,
        "seed": stage.seed,
        "trainable": list(stage.trainable),
        "entry": [a.to_dict() for a in stage.entry],
        "optimizer_policy": stage.optimizer_policy,
    }
    if stage.checkpoint_every is not None:
        out["checkpoint_every"] = stage.checkpoint_every
    if stage.clip_grad_norm is not None:
        out["clip_grad_norm"] = stage.clip_grad_norm
    return (
        {**out, "steps": stage.steps}
        if stage.steps is not None
        else {**out, "epochs": stage.epochs}
    )


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(
            where,
            f"expected a mapping of settings, got {value!r}",
            "write the settings as key: value pairs",
        )
    return dict(value)


def _sequence(value: Any, where: str) -> list[Any]:
    if isinstance(value, (str, Mapping)) or not isinstance(value, Sequence):
        raise SpecError(where, f"expected a list, got {value!r}", "write a list, e.g. [a, b]")
    return list(value)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    items = _sequence(value, where)
    if not items or not all(isinstance(v, str) and v for v in items):
        raise SpecError(
            where,
            f"expected a non-empty list of names, got {value!r}",
            "list names or glob patterns, e.g. [head, '*.lora_*']",
        )
    return tuple(items)


def _check_keys(obj: Mapping[str, Any], allowed: Any, where: str) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise SpecError(where, f"unknown setting(s) {unknown}", f"use only {sorted(allowed)}")


def _integer(obj: Mapping[str, Any], key: str, where: str, minimum: int) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SpecError(
            f"{where}.{key}", f"expected an integer >= {minimum}, got {value!r}", f"set {key}"
        )
    return value
