"""Audit specs: checkpoints as people have them, turned into an in-memory trajectory.

An audit spec (``stagetrace audit SPEC.yaml``, docs/audit.md) names the model factory, the
stages in training order and, per stage, the files that hold its end (a checkpoint: a
safetensors/.pt/.bin file, a sharded ``*.index.json`` or an HF folder; or a PEFT adapter on top
of the previous stage), optionally a Trainer output folder (logged learning rates, optimizer
state) and a ``pipeline`` block (the stage's declared ``StageSpec`` settings). Paths are
relative to the spec file. Formats: docs/checkpoints.md.

``build`` reads them into a ``Trajectory`` held in memory (``MemoryStore``: the weights are read,
never written to disk): stage k starts where stage k-1 ended (with its own adapters added, as a
recording does) and ends at its checkpoint. What the files allow is recorded per stage as
``Evidence``. The spec's evidence, not the trajectory, says which estimators may run: a stage
without a declared optimizer is recorded with a placeholder step log that no estimator beyond E0
may read (``Built.held``). When every stage declares a full pipeline (data, batch size, seed,
steps, optimizer...) its records and batch order come from the pipeline's own code
(``pipeline.resolve_stage``), so the trajectory equals the one the tool would have recorded and
retraining (the truth) is possible.

Sign convention as everywhere: effect_k(f) = f(theta_T) - f(theta_T^(-k)).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from attribution.record.entry import LoRALinear, matching_modules
from attribution.record.errors import SpecError, StagetraceError
from attribution.record.loaders import (
    compare_states,
    load_model_config,
    load_peft_adapter,
    load_state_dict,
    load_trainer_run,
)
from attribution.record.optim import HYPERPARAMETERS, OptimizerState
from attribution.record.pipeline import (
    add_adapters,
    carried_state,
    reinitialised,
    resolve_stage,
)
from attribution.record.references import Ref, load_dataset, trust
from attribution.record.spec import STAGE_KINDS, PipelineSpec, StageSpec
from attribution.record.trajectory import (
    ParamGroup,
    StageRecord,
    StepLog,
    Trajectory,
    snapshot,
)

SPEC_KEYS = ("model", "trust_modules", "seed", "stages", "behaviors")
STAGE_KEYS = ("kind", "checkpoint", "adapter", "trainer", "start", "stand_in", "pipeline", "step")
KIND_ORDER = {kind: i for i, kind in enumerate(STAGE_KINDS)}
UNDECLARED_DATA = Ref("stagetrace.undeclared:data")
"""The data reference of a stage whose pipeline block names no data: it resolves to nothing, so
no estimator that reads the data or replays the steps can run."""
TRANSFORMERS_FACTORY = "attribution.record.checkpoint_spec:transformers_model"
REPLAY_EVIDENCE = ("batch_order", "stage_data")
OPTIMIZER_EVIDENCE = ("learning_rates", "optimizer_hyperparameters")


def transformers_model(config: Mapping[str, Any]) -> nn.Module:
    """A transformers model built from a ``config.json`` mapping (``model: transformers``): the
    class its ``architectures`` names, returning its logits (``_logits_of``)."""
    try:
        import transformers
    except ImportError as exc:
        raise SpecError(
            "model",
            "`model: transformers` needs the transformers package, which is not installed",
            "install transformers, or name the model factory as {target: module:attr, kwargs}",
        ) from exc
    settings = dict(config)
    kind = settings.pop("model_type", None)
    if kind is None:
        raise SpecError(
            "model", "config.json names no model_type", "give a config.json saved by transformers"
        )
    cfg = transformers.AutoConfig.for_model(kind, **settings)
    found = [getattr(transformers, n, None) for n in settings.get("architectures") or []]
    cls = next((c for c in found if c is not None), None)
    if cls is None:
        raise SpecError(
            "model",
            f"config.json's architectures {settings.get('architectures')} name no class of "
            f"transformers {transformers.__version__} with a head that gives logits",
            "give a config.json saved from a model with a head (e.g. *ForSequenceClassification),"
            " or name the model factory as {target: module:attr, kwargs}",
        )
    return _logits_of(cls)(cfg)


def _logits_of(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` whose forward returns the logits tensor (what the engine's evaluator and loss
    take) instead of a ModelOutput; parameter names, state dicts and everything else stay the
    model's own."""

    def forward(self: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return cls.forward(self, inputs).logits

    return type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})


@dataclass(frozen=True)
class StageEntry:
    """One stage of an audit spec, its paths resolved against the spec's folder."""

    name: str
    kind: str
    checkpoint: Path | None = None
    adapter: Path | None = None
    trainer: Path | None = None
    start: Path | None = None
    stand_in: str | None = None
    pipeline: Mapping[str, Any] | None = None
    step: tuple[int, int] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for key in ("checkpoint", "adapter", "trainer", "start", "stand_in"):
            value = getattr(self, key)
            if value is not None:
                out[key] = str(value)
        if self.pipeline is not None:
            out["pipeline"] = dict(self.pipeline)
        if self.step is not None:
            out["step"] = list(self.step)
        return out


@dataclass(frozen=True)
class AuditSpec:
    """A parsed audit spec: the model factory (None with ``transformers``: built from the first
    checkpoint's ``config.json``), the modules its references may import, the seed the factory
    builds under (stand-in initialisations use it), the stages in training order and the
    behaviours (a mapping, or the path of a behaviours file; parsed by the analysis layer)."""

    path: Path
    model: Ref | None
    stages: tuple[StageEntry, ...]
    trust_modules: tuple[str, ...] = ()
    seed: int = 0
    behaviors: Mapping[str, Any] | Path | None = None

    @property
    def folder(self) -> Path:
        return self.path.parent

    def to_json(self) -> dict[str, Any]:
        """The resolved settings (paths absolute), as attribution.json repeats them."""
        behaviors = self.behaviors
        return {
            "path": str(self.path),
            "model": "transformers" if self.model is None else self.model.to_dict(),
            "trust_modules": list(self.trust_modules),
            "seed": self.seed,
            "stages": {s.name: s.to_json() for s in self.stages},
            "behaviors": str(behaviors) if isinstance(behaviors, Path) else behaviors,
        }


def is_spec_file(path: Path | str) -> bool:
    """Whether ``path`` names an audit spec (an existing .yaml/.yml file), not a run."""
    path = Path(path)
    return path.suffix in (".yaml", ".yml") and path.is_file()


def load_spec(path: Path | str) -> AuditSpec:
    """Read and check an audit spec: plain YAML, or a Hydra config with ``defaults:`` composed
    from the file's folder. Unknown keys, missing files and stages out of order are refused."""
    path = Path(path).resolve()
    obj = _read(path)
    where = path.name
    unknown = sorted(set(obj) - set(SPEC_KEYS))
    if unknown:
        raise SpecError(where, f"unknown key(s) {unknown}", f"use only {list(SPEC_KEYS)}")
    model = obj.get("model")
    ref = None if model == "transformers" else Ref.from_dict(model, f"{where}: model")
    modules = obj.get("trust_modules") or []
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise SpecError(
            f"{where}: trust_modules",
            f"expected a list of module names, got {modules!r}",
            "write e.g. trust_modules: [mypkg]",
        )
    seed = obj.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise SpecError(f"{where}: seed", f"expected an integer >= 0, got {seed!r}", "set seed")
    stages_obj = obj.get("stages")
    if not isinstance(stages_obj, Mapping) or not stages_obj:
        raise SpecError(
            f"{where}: stages",
            "missing or empty",
            "list the stages in training order: name: {kind, checkpoint | adapter, ...}",
        )
    stages = []
    for i, (name, stage) in enumerate(stages_obj.items()):
        stages.append(_stage(path, str(name), stage, first=i == 0))
    _check_order(where, stages)
    behaviors = obj.get("behaviors")
    if isinstance(behaviors, str):
        behaviors = _path(path, behaviors, "behaviors")
    elif behaviors is not None and not isinstance(behaviors, Mapping):
        raise SpecError(
            f"{where}: behaviors",
            f"expected a mapping of behaviours or a file path, got {behaviors!r}",
            "write behaviours as in behaviors.yaml, or give the path of such a file",
        )
    return AuditSpec(path, ref, tuple(stages), tuple(modules), seed, behaviors)


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SpecError(str(path), "no such spec file", "give the path of an audit spec (YAML)")
    try:
        obj = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(
            str(path), f"is not valid plain YAML{at}: {problem}", "write plain YAML (no tags)"
        ) from exc
    if not isinstance(obj, Mapping):
        raise SpecError(
            str(path), "expected a mapping (model, stages, ...)", "see docs/audit.md for a spec"
        )
    if "defaults" in obj:
        obj = _compose(path)
    return dict(obj)


def _compose(path: Path) -> dict[str, Any]:
    """A Hydra config composed with hydra's compose API from the spec's own folder."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(path.parent), version_base=None):
            cfg = compose(config_name=path.stem)
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        problem = str(exc).splitlines()[0]
        raise SpecError(
            str(path),
            f"cannot be composed with Hydra ({problem})",
            "make its defaults name configs in the spec's folder",
        ) from exc


def _path(spec: Path, value: Any, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise SpecError(
            f"{spec.name}: {where}", f"expected a path, got {value!r}", "give a relative path"
        )
    found = (spec.parent / value).resolve()
    if not found.exists():
        raise SpecError(
            f"{spec.name}: {where}",
            f"{found} does not exist",
            "give a path relative to the spec file's folder",
        )
    return found


def _stage(spec: Path, name: str, obj: Any, first: bool) -> StageEntry:
    where = f"stages.{name}"
    full = f"{spec.name}: {where}"
    if not isinstance(obj, Mapping):
        raise SpecError(full, f"expected a mapping, got {obj!r}", "write {kind, checkpoint, ...}")
    unknown = sorted(set(obj) - set(STAGE_KEYS))
    if unknown:
        raise SpecError(full, f"unknown key(s) {unknown}", f"use only {list(STAGE_KEYS)}")
    kind = obj.get("kind")
    if kind not in STAGE_KINDS:
        raise SpecError(
            f"{full}.kind",
            f"expected one of {list(STAGE_KINDS)}, got {kind!r}",
            "say what the stage was",
        )
    paths = {
        key: _path(spec, obj[key], f"{where}.{key}")
        for key in ("checkpoint", "adapter", "trainer", "start")
        if obj.get(key) is not None
    }
    if "checkpoint" in paths and "adapter" in paths:
        raise SpecError(
            full,
            "gives both checkpoint and adapter",
            "give the full weights (checkpoint) or the adapter, not both",
        )
    if not {"checkpoint", "adapter", "trainer"} & set(paths):
        raise SpecError(
            full,
            "gives no checkpoint, adapter or trainer folder",
            "name the files holding the weights at the stage's end",
        )
    if "adapter" in paths and first:
        raise SpecError(
            f"{full}.adapter",
            "the first stage has no earlier weights to adapt",
            "list the stage that trained the base weights first",
        )
    stand_in = obj.get("stand_in")
    if not first and ("start" in paths or stand_in is not None):
        raise SpecError(
            full,
            "start and stand_in are for the first stage only (later stages "
            "start where the previous one ended)",
            "remove them",
        )
    if stand_in is not None:
        if "start" in paths:
            raise SpecError(
                full,
                "gives both start and stand_in",
                "give the real start, or a stand-in when it is unknown",
            )
        if stand_in != "init":
            stand_in = str(_path(spec, stand_in, f"{where}.stand_in"))
    pipeline = obj.get("pipeline")
    if pipeline is not None and not isinstance(pipeline, Mapping):
        raise SpecError(
            f"{full}.pipeline",
            f"expected a mapping, got {pipeline!r}",
            "give the stage's settings (optimizer, schedule, steps, data, ...)",
        )
    step = obj.get("step")
    if step is not None:
        if (
            not isinstance(step, list)
            or len(step) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in step)
            or not 0 <= step[0] <= step[1]
        ):
            raise SpecError(
                f"{full}.step",
                f"expected [first, last] global steps, got {step!r}",
                "give the global step range the stage covered, e.g. [0, 1000]",
            )
        step = (step[0], step[1])
    return StageEntry(
        name,
        kind,
        paths.get("checkpoint"),
        paths.get("adapter"),
        paths.get("trainer"),
        paths.get("start"),
        stand_in,
        None if pipeline is None else dict(pipeline),
        step,
    )


def _check_order(where: str, stages: list[StageEntry]) -> None:
    """Stages must be listed in training order: kinds pretrain <= finetune <= adapt, and
    declared global step ranges increasing."""
    for before, after in itertools.pairwise(stages):
        if KIND_ORDER[after.kind] < KIND_ORDER[before.kind]:
            raise SpecError(
                f"{where}: stages.{after.name}",
                f"a {after.kind} stage is listed after the {before.kind} stage {before.name!r}",
                "list the stages in training order (pretrain, finetune, adapt)",
            )
        if before.step and after.step and after.step[0] < before.step[1]:
            raise SpecError(
                f"{where}: stages.{after.name}.step",
                f"starts at global step {after.step[0]}, before {before.name!r} ends "
                f"({before.step[1]})",
                "list the stages in training order, with their own step ranges",
            )


@dataclass(frozen=True)
class Evidence:
    """What the files and the spec tell about one stage, and what they allow.

    ``start``: where the stage's starting weights come from; ``start_known`` False when nobody
    kept them (``stand_in`` says what replaced them, if the user asked). ``learning_rates``:
    ``declared`` (from the pipeline block's optimizer and schedule), ``logged`` (a Trainer log
    holds them) and ``check`` (the declared ones against the log: offset, note, largest relative
    error). ``optimizer_state`` says where the stage's optimizer states come from.
    ``batch_order`` / ``replay``: whether the stage's batches are known and its steps can be
    replayed (else ``replay_problem``). ``changes``: parameters added, removed, reshaped, frozen
    or changed since the previous stage (``compare_states``). ``held``: the evidence keys of the
    estimators' vocabulary this stage provides; ``missing``: what would allow a better answer.
    """

    stage: str
    start: str
    start_known: bool
    stand_in: str | None
    learning_rates: str
    lr_declared: bool
    lr_logged: bool
    lr_check: Mapping[str, Any] | None
    optimizer_state: str
    batch_order: str
    replay: bool
    replay_problem: str | None
    changes: Mapping[str, Any]
    change_lines: tuple[str, ...]
    held: frozenset[str]
    missing: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "start_known": self.start_known,
            "stand_in": self.stand_in,
            "learning_rates": {
                "source": self.learning_rates,
                "declared": self.lr_declared,
                "logged": self.lr_logged,
                "check": None if self.lr_check is None else dict(self.lr_check),
            },
            "optimizer_state": self.optimizer_state,
            "batch_order": self.batch_order,
            "replay": self.replay,
            "replay_problem": self.replay_problem,
            "changes": dict(self.changes),
            "held": sorted(self.held),
            "missing": list(self.missing),
        }

    def lines(self) -> list[str]:
        """Human-readable evidence, one fact per line."""
        out = [f"start: {self.start}", f"learning rates: {self.learning_rates}"]
        if self.lr_check is not None and self.lr_check.get("note"):
            out.append(f"learning-rate check: {self.lr_check['note']}")
        out += [f"optimizer state: {self.optimizer_state}", f"batch order: {self.batch_order}"]
        out.append("replay: possible" if self.replay else f"replay: no ({self.replay_problem})")
        out += list(self.change_lines)
        return out


@dataclass(frozen=True)
class Built:
    """An audit spec read into an in-memory trajectory, with each stage's evidence.

    ``held`` is the evidence (estimators' vocabulary) every stage provides: what decides which
    estimators may run. ``unknown_start`` lists the stages whose start nobody kept and no
    stand-in replaces: skipping them cannot be estimated."""

    spec: AuditSpec
    trajectory: Trajectory
    evidence: dict[str, Evidence]
    unknown_start: tuple[str, ...] = ()
    pipeline: Mapping[str, Any] | None = None

    @property
    def held(self) -> frozenset[str]:
        sets = [e.held for e in self.evidence.values()]
        return frozenset.intersection(*sets) if sets else frozenset()

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_json(),
            "evidence": {name: e.to_json() for name, e in self.evidence.items()},
            "held": sorted(self.held),
            "unknown_start": list(self.unknown_start),
            "stand_ins": {
                name: e.stand_in for name, e in self.evidence.items() if e.stand_in is not None
            },
        }


def build_trajectory(spec: AuditSpec) -> Trajectory:
    """The in-memory trajectory of an audit spec (``build(spec).trajectory``)."""
    return build(spec).trajectory


@dataclass
class _Walk:
    """State carried from stage to stage while building."""

    model: nn.Module
    end: dict[str, torch.Tensor] | None = None
    optimizer_end: OptimizerState | None = None


def build(spec: AuditSpec) -> Built:
    """Read every file the spec names, check it against the model and the previous stage, and
    record the stages in memory (see the module docstring). Errors name the file or field and
    the fix; nothing is written."""
    trust(*spec.trust_modules)
    model_ref = spec.model or _transformers_ref(spec)
    declared = [_stage_spec(spec, s) for s in spec.stages]
    full = all(d is not None and d[1] for d in declared)
    pipeline = None
    if full:
        pipeline_spec = PipelineSpec(model_ref, tuple(d[0] for d in declared), spec.seed)
        pipeline_spec.validate()
        pipeline = pipeline_spec.to_dict()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = model_ref.call()
    if not isinstance(model, nn.Module):
        raise SpecError(
            f"{spec.path.name}: model",
            f"{model_ref.target} did not return an nn.Module",
            "name a factory that returns the model",
        )
    traj = Trajectory.create(None, model_ref, pipeline)
    walk = _Walk(model)
    evidence: dict[str, Evidence] = {}
    unknown: list[str] = []
    for k, stage in enumerate(spec.stages):
        ev = _add_stage(spec, traj, walk, k, stage, declared[k])
        evidence[stage.name] = ev
        if not ev.start_known and ev.stand_in is None:
            unknown.append(stage.name)
    traj.mark_complete()
    return Built(spec, traj, evidence, tuple(unknown), pipeline)


def _transformers_ref(spec: AuditSpec) -> Ref:
    first = spec.stages[0]
    folder = first.checkpoint or first.trainer
    if folder is None or not folder.is_dir():
        raise SpecError(
            f"{spec.path.name}: model",
            "`model: transformers` needs the first "
            "stage's checkpoint to be an HF folder with config.json",
            "give the first stage's checkpoint as a folder, or name the factory",
        )
    return Ref(TRANSFORMERS_FACTORY, {"config": load_model_config(folder)})


def _stage_spec(spec: AuditSpec, stage: StageEntry) -> tuple[StageSpec, bool] | None:
    """The stage's declared settings as a ``StageSpec`` and whether they name its data (so its
    batch order is known); None without a pipeline block. A block without data still gives the
    optimizer and the per-step learning rates (placeholder data, batch size 1, seed 0)."""
    if stage.pipeline is None:
        return None
    block = dict(stage.pipeline)
    where = f"{spec.path.name}: stages.{stage.name}.pipeline"
    if block.get("kind", stage.kind) != stage.kind:
        raise SpecError(
            f"{where}.kind",
            f"says {block['kind']!r}, the stage says {stage.kind!r}",
            "remove kind from the pipeline block",
        )
    block["kind"] = stage.kind
    has_data = "data" in block
    if not has_data:
        block.setdefault("data", UNDECLARED_DATA.to_dict())
        block.setdefault("batch_size", 1)
        block.setdefault("seed", 0)
        if block.get("epochs") is not None:
            raise SpecError(
                f"{where}.epochs",
                "epochs need the stage's data to count steps",
                "give steps (optimizer steps), or the data",
            )
    return StageSpec.from_dict(stage.name, block, where), has_data


def _add_stage(
    spec: AuditSpec,
    traj: Trajectory,
    walk: _Walk,
    k: int,
    stage: StageEntry,
    declared: tuple[StageSpec, bool] | None,
) -> Evidence:
    where = f"{spec.path.name}: stages.{stage.name}"
    model = walk.model
    stage_spec = None if declared is None else declared[0]
    entry = () if stage_spec is None else stage_spec.entry
    adapter = None if stage.adapter is None else load_peft_adapter(stage.adapter)
    if adapter is not None:
        _check_adapter_modules(where, model, adapter)
    keep_adapter = adapter is not None and _matching_adapter(where, model, entry, adapter)
    # the start: the previous end (or the first stage's own start) with the adapters added
    stand_in = None
    if k == 0:
        start_text, start_known = "unknown (nobody kept the initial weights)", False
        if stage.start is not None:
            _load_into(model, load_state_dict(stage.start), str(stage.start), where)
            start_text, start_known = f"checkpoint {stage.start}", True
        elif stage.stand_in == "init":
            stand_in = f"the factory's own initialisation under seed {spec.seed}"
        elif stage.stand_in is not None:
            _load_into(model, load_state_dict(stage.stand_in), stage.stand_in, where)
            stand_in = f"the weights in {stage.stand_in}"
        if stand_in is not None:
            start_text = f"STAND-IN: {stand_in} (the real start is unknown)"
    else:
        start_text, start_known = "the previous stage's end", True
    add_adapters(model, entry, stage.name)
    run = None if stage.trainer is None else load_trainer_run(stage.trainer)
    checkpoint = stage.checkpoint
    if checkpoint is None and adapter is None and run is not None:
        if not run.checkpoints:
            raise SpecError(
                f"{where}.trainer",
                f"{stage.trainer} holds no checkpoint-N folder",
                "give the stage's checkpoint, or the Trainer folder with checkpoints",
            )
        checkpoint = run.checkpoints[max(run.checkpoints)]
    # the end
    previous = walk.end
    if adapter is not None:
        _check_adapter_base(where, model, previous or {}, adapter)
        if keep_adapter:
            end = {**snapshot(model), **adapter.as_lora_parameters(), **_saved(adapter)}
        else:
            end = {**adapter.merged(dict(previous or {})), **_saved(adapter)}
        source = str(stage.adapter)
    else:
        end = load_state_dict(checkpoint)
        source = str(checkpoint)
    if k == 0 and not start_known and stand_in is None:
        _load_into(model, end, source, where)  # placeholder start: no number is reported
    start = snapshot(model)
    _load_into(model, end, source, where)
    end = snapshot(model)
    record, steps, has_data = _record(where, stage, declared, model, start, end)
    # optimizer states
    if record.optimizer_policy == "reset":
        state_in, state_in_known = {}, True
    elif walk.optimizer_end is not None:
        state_in, state_in_known = carried_state(walk.optimizer_end, record, model), True
    else:
        state_in, state_in_known = {}, False
    state_out: OptimizerState | None = None
    lr_check = None
    if run is not None:
        _check_trainer(where, stage, run, record, declared is not None)
        last = max(run.checkpoints) if run.checkpoints else None
        if last is not None and _has_optimizer(run, last):
            state_out = _state_by_name(where, run.optimizer_state(last), record, model)
        if declared is not None and run.learning_rates:
            lr_check = run.check_learning_rates(steps.lr[:, 0].tolist(), stage.name)
    traj.append_stage(record, start, end, state_in, state_out or {}, steps)
    walk.end, walk.optimizer_end = end, state_out
    changes = (
        None
        if k == 0 and not start_known and stand_in is None
        else compare_states(previous if previous is not None else start, end)
    )
    return _evidence(
        stage,
        record,
        declared,
        has_data,
        keep_adapter,
        adapter,
        run,
        lr_check,
        start_text,
        start_known,
        stand_in,
        state_in_known,
        state_out,
        changes,
    )


def _saved(adapter: Any) -> dict[str, torch.Tensor]:
    """The full modules an adapter saved besides its LoRA matrices (``modules_to_save``)."""
    saved = adapter.modules_to_save
    return dict(saved) if isinstance(saved, Mapping) else {}


def _load_into(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str, where: str
) -> None:
    """Copy a checkpoint into the model; one that does not fit names the keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k} {list(tensors[k].shape)} (model {list(expected[k].shape)})"
        for k in sorted(set(expected) & set(tensors))
        if expected[k].shape != tensors[k].shape
    ]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label} {keys[:4]}"
            for label, keys in (
                ("wrong shape", wrong),
                ("missing", missing),
                ("unexpected", unexpected),
            )
            if keys
        )
        raise SpecError(
            where,
            f"{source} does not fit the model ({detail})",
            "check model.kwargs in the spec and that the file is this stage's checkpoint",
        )
    model.load_state_dict(dict(tensors))


def _matching_adapter(where: str, model: nn.Module, entry: tuple[Any, ...], adapter: Any) -> bool:
    """Whether the stage's declared ``add_lora`` entry describes the adapter exactly (modules,
    rank, alpha, plain scaling alpha/r, linear layers): then it stays as the tool's lora_A and
    lora_B parameters, so its steps can be replayed. No ``add_lora`` declared: False (the adapter
    is merged). One declared that differs from the adapter is an error."""
    actions = [a for a in entry if a.kind == "add_lora"]
    if not actions:
        return False
    declared: dict[str, tuple[int, float]] = {}
    for action in actions:
        for name in matching_modules(model, action.modules, f"{where}.pipeline.entry"):
            declared[name] = (action.rank, action.alpha)
    found = {name: (m.r, m.alpha) for name, m in adapter.modules.items()}
    odd = sorted(
        name for name, m in adapter.modules.items() if m.fan_in_fan_out or m.embedding or m.rslora
    )
    if declared != found or odd:
        why = (
            f"uses rsLoRA, fan_in_fan_out or embeddings on {odd}"
            if odd
            else f"adapts {found} (module: (rank, alpha)), the entry declares {declared}"
        )
        raise SpecError(
            f"{where}.pipeline.entry",
            f"the add_lora entry does not match the adapter: it {why}",
            "make the entry name the adapter's modules, rank and alpha, or remove it to merge "
            "the adapter into the weights (its steps then cannot be replayed)",
        )
    return True


def _check_adapter_modules(where: str, model: nn.Module, adapter: Any) -> None:
    """Every module the adapter adapts exists in the model."""
    modules = dict(model.named_modules())
    for name in adapter.modules:
        if name not in modules:
            known = [n for n, mod in modules.items() if isinstance(mod, (nn.Linear, LoRALinear))]
            raise SpecError(
                f"{where}.adapter",
                f"adapts module {name!r}, which the model does not have",
                f"give an adapter trained on this model (its linear layers: {known[:6]})",
            )


def _check_adapter_base(
    where: str, model: nn.Module, base: Mapping[str, torch.Tensor], adapter: Any
) -> None:
    """Every adapted module's A and B fit the previous stage's weight."""
    for name, m in adapter.modules.items():
        weight = base.get(f"{name}.weight")
        if weight is None:
            raise SpecError(
                f"{where}.adapter",
                f"adapts {name!r}, but the previous stage holds no {name}.weight",
                "list the stage that trained the base first",
            )
        out_features, in_features = weight.shape[0], weight.shape[-1]
        if m.fan_in_fan_out or m.embedding:  # stored [in, out]: Conv1D, nn.Embedding
            in_features, out_features = weight.shape[0], weight.shape[-1]
        a, b = tuple(m.A.shape), tuple(m.B.shape)
        if a[-1] != in_features or b[0] != out_features:
            raise SpecError(
                f"{where}.adapter",
                f"was trained on a {name} of another shape (A {list(a)}, B {list(b)}; the "
                f"previous stage's {name}.weight is {list(weight.shape)})",
                "list the stages in training order: the adapter goes on the weights it was "
                "trained on",
            )


def _record(
    where: str,
    stage: StageEntry,
    declared: tuple[StageSpec, bool] | None,
    model: nn.Module,
    start: dict[str, torch.Tensor],
    end: dict[str, torch.Tensor],
) -> tuple[StageRecord, StepLog, bool]:
    """The stage's record and step log: the pipeline's own resolution when declared (the batch
    order only when its data is named), else a placeholder no estimator beyond E0 reads."""
    params = [n for n, _ in model.named_parameters()]
    changed = [n for n in params if n in start and not torch.equal(start[n], end[n])]
    if declared is None:
        hyper = {"lr": 0.0, **HYPERPARAMETERS["sgd"]}
        record = StageRecord(
            name=stage.name,
            kind=stage.kind,
            data=UNDECLARED_DATA,
            loss="cross_entropy",
            optimizer="sgd",
            groups=(ParamGroup(tuple(changed or params), hyper),),
            num_steps=1,
            seed=0,
        )
        return record, _no_batches([[0.0]]), False
    stage_spec, has_data = declared
    examples = len(load_dataset(stage_spec.data)) if has_data else stage_spec.batch_size
    record, steps = resolve_stage(stage_spec, model, examples)
    untrained = sorted(set(changed) - set(record.trainable) - reinitialised(model, record))
    if untrained:
        raise SpecError(
            f"{where}.pipeline.trainable",
            f"the checkpoints change parameters the stage does not train: {untrained[:5]}",
            "declare every parameter the stage trained in trainable, or check that the "
            "checkpoints are listed in training order",
        )
    if not has_data:
        record = replace(record, batch_size=None)
        steps = _no_batches(steps.lr.tolist())
    return record, steps, has_data


def _no_batches(lr: list[list[float]]) -> StepLog:
    """A step log of learning rates without batch order (every batch empty)."""
    return StepLog(
        torch.tensor(lr, dtype=torch.float64),
        torch.zeros(len(lr) + 1, dtype=torch.int64),
        torch.zeros(0, dtype=torch.int64),
    )


def _check_trainer(
    where: str, stage: StageEntry, run: Any, record: StageRecord, declared: bool
) -> None:
    """A Trainer log must describe this stage: its last checkpoint at its global step, and as
    many steps as the pipeline declares."""
    last = max(run.checkpoints) if run.checkpoints else None
    if last is not None and last != run.global_step:
        raise SpecError(
            f"{where}.trainer",
            f"{stage.trainer}: the log ends at global step {run.global_step} but its last "
            f"checkpoint is checkpoint-{last}",
            "give the Trainer folder of this stage's run, with its final checkpoint",
        )
    if declared and run.global_step != record.num_steps:
        raise SpecError(
            f"{where}.trainer",
            f"{stage.trainer}: the log records {run.global_step} steps, the pipeline block "
            f"declares {record.num_steps}",
            "give the Trainer folder of this stage (stages in training order), or correct steps",
        )


def _has_optimizer(run: Any, step: int) -> bool:
    return (Path(run.checkpoints[step]) / "optimizer.pt").is_file()


def _state_by_name(
    where: str, state: Mapping[str, Any], record: StageRecord, model: nn.Module
) -> OptimizerState:
    """A ``torch.optim`` state dict keyed by parameter name: by its groups' ``param_names``
    when saved, else in the order of the stage's declared parameter groups (the order the
    optimizer was given them). Each slot's shape must fit its parameter."""
    groups = state.get("param_groups", [])
    ids = [i for g in groups for i in g["params"]]
    names = [n for g in groups for n in g.get("param_names", [])]
    if len(names) != len(ids):
        names = list(record.trainable)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    if len(names) != len(ids) or any(n not in shapes for n in names):
        raise SpecError(
            f"{where}.trainer",
            f"the optimizer state holds {len(ids)} parameters, the stage trains {len(names)}",
            "declare the stage's trainable parameters and optimizer groups as the run had them",
        )
    out: OptimizerState = {}
    for i, name in zip(ids, names, strict=True):
        slots = state.get("state", {}).get(i)
        if not slots:
            continue
        for slot, value in slots.items():
            if value.dim() and value.shape != shapes[name]:
                raise SpecError(
                    f"{where}.trainer",
                    f"optimizer slot {slot} of {name} has shape {list(value.shape)}, the "
                    f"parameter {list(shapes[name])}",
                    "declare the stage's trainable parameters in the order the optimizer had them",
                )
        out[name] = {slot: value.detach().clone() for slot, value in slots.items()}
    return out


def _evidence(
    stage: StageEntry,
    record: StageRecord,
    declared: tuple[StageSpec, bool] | None,
    has_data: bool,
    keep_adapter: bool,
    adapter: Any,
    run: Any,
    lr_check: Any,
    start_text: str,
    start_known: bool,
    stand_in: str | None,
    state_in_known: bool,
    state_out: OptimizerState | None,
    changes: Any,
) -> Evidence:
    held = {"boundary_checkpoints"}
    missing = []
    logged = bool(run is not None and run.learning_rates)
    if declared is not None:
        held |= set(OPTIMIZER_EVIDENCE)
        schedule = record.schedule or {"name": "constant"}
        lr_text = (
            f"declared ({record.optimizer}, {schedule['name']} schedule, {record.num_steps} steps)"
        )
    else:
        lr_text = "unknown (no pipeline block declares the optimizer)"
        missing.append(
            "a pipeline block with the optimizer, schedule and steps (learning rates "
            "and hyperparameters: E1)"
        )
    if logged:
        lr_text += f"; logged by the Trainer ({len(run.learning_rates)} values)"
    if lr_check is not None:
        lr_text += (
            f"; checked against the log (largest relative error {lr_check.max_rel_error:.2g})"
        )
    needs_end = record.optimizer == "adam"
    if state_out is not None:
        state_text = "the Trainer's optimizer.pt at the stage's end"
    elif record.optimizer_policy == "reset":
        state_text = "starts empty (reset policy); the end state is not known"
    else:
        state_text = "unknown"
    if declared is not None and state_in_known and (state_out is not None or not needs_end):
        held.add("optimizer_state")
    elif declared is not None:
        missing.append(
            "the Trainer's optimizer.pt (the optimizer state Adam and the carry policy need)"
        )
    problem = None
    if declared is None:
        problem = "no pipeline block"
    elif not has_data:
        problem = "the pipeline block names no data (batch order and data unknown)"
        missing.append(
            "the batch order the Trainer drew: record it with StagetraceCallback "
            "(docs/audit.md, section 8) for replay and the truth"
            if run is not None
            else "data, batch_size and seed in the pipeline block (the batch order: "
            "replay and the truth)"
        )
    elif adapter is not None and not keep_adapter:
        problem = (
            "the adapter is merged into the weights (no add_lora entry matches it), so "
            "its steps cannot be replayed"
        )
        missing.append("an add_lora entry matching the adapter in the pipeline block")
    else:
        held |= set(REPLAY_EVIDENCE)
    if not start_known:
        missing.append("the weights the stage started from (start:), to estimate skipping it")
    return Evidence(
        stage=stage.name,
        start=start_text,
        start_known=start_known,
        stand_in=stand_in,
        learning_rates=lr_text,
        lr_declared=declared is not None,
        lr_logged=logged,
        lr_check=None if lr_check is None else lr_check.to_json(),
        optimizer_state=state_text,
        batch_order=(
            "declared (the pipeline's own batch sampler"
            + (
                "; a Trainer draws its own: right only if this run used that sampler)"
                if run is not None
                else ")"
            )
        )
        if has_data and problem is None
        else "unknown",
        replay=problem is None,
        replay_problem=problem,
        changes={} if changes is None else changes.to_json(),
        change_lines=("changes: unknown (the start is unknown)",)
        if changes is None
        else tuple(changes.describe()),
        held=frozenset(held),
        missing=tuple(missing),
    )


def check_estimator(
    built: Built, requires: frozenset[str], label: str, describe: Mapping[str, str]
) -> None:
    """Refuse an estimator whose evidence some stage of the spec lacks, naming the stage, what
    it lacks (``describe``: evidence key -> text) and what would supply it."""
    for name, ev in built.evidence.items():
        lacking = sorted(requires - ev.held)
        if lacking:
            raise StagetraceError(
                f"estimator {label} needs {'; '.join(describe.get(m, m) for m in lacking)} of "
                f"stage {name!r}, which the spec does not give. Fix: "
                + ("; ".join(ev.missing) or "give a fuller spec")
                + " (or use an estimator the evidence supports, e.g. e0)"
            )


__all__ = [
    "AuditSpec",
    "Built",
    "Evidence",
    "StageEntry",
    "build",
    "build_trajectory",
    "check_estimator",
    "is_spec_file",
    "load_spec",
    "transformers_model",
]
