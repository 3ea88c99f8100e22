"""Run declared stages deterministically, and replay recorded ones.

One function, ``train_stage``, performs every training step in the project: the original run,
its replay, and every skip-stage counterfactual. It reads learning rates and batch indices from a
``StepLog``, never from a sampler or scheduler, so replays see exactly the recorded numbers. Its
callers run it inside ``recorded_threads``, with the recording's thread count.
"""

from __future__ import annotations

import fnmatch
import itertools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset, default_collate

from attribution.record.entry import apply_entry, is_structural, matching_modules
from attribution.record.errors import SpecError, TrainingError, TrajectoryError
from attribution.record.optim import (
    OptimizerState,
    build_optimizer,
    load_state_by_name,
    state_by_name,
)
from attribution.record.references import load_dataset, loss_function
from attribution.record.spec import EntryAction, PipelineSpec, StageSpec
from attribution.record.trajectory import (
    MANIFEST,
    Environment,
    ParamGroup,
    StageRecord,
    StepLog,
    Trajectory,
    flatten_state,
    snapshot,
)

StepCallback = Callable[[str, int, int, float], None]
"""Called after every step with (stage name, step index, number of steps, loss)."""

CheckpointCallback = Callable[[int, dict[str, torch.Tensor]], None]
"""Called with (t, detached copy of parameters and buffers) before each step t of
``StageRecord.checkpoint_steps()``; only the recording passes one."""


def sample_batches(n: int, batch_size: int, num_steps: int, seed: int) -> list[torch.Tensor]:
    """Batch indices for ``num_steps`` steps: seeded reshuffles each epoch, last partial dropped."""
    per_epoch = n // batch_size
    generator = torch.Generator().manual_seed(seed)
    batches: list[torch.Tensor] = []
    while len(batches) < num_steps:
        order = torch.randperm(n, generator=generator)[: per_epoch * batch_size]
        batches += list(order.view(per_epoch, batch_size).unbind(0))
    return batches[:num_steps]


def resolve_stage(
    spec: StageSpec, model: nn.Module, num_examples: int
) -> tuple[StageRecord, StepLog]:
    """Turn a declared stage into explicit parameter groups and per-step records."""
    where = f"pipeline.stages.{spec.name}"
    if num_examples < spec.batch_size:
        raise SpecError(
            f"{where}.batch_size",
            f"{spec.batch_size} exceeds the {num_examples} examples of the stage's data",
            "lower batch_size or use more data",
        )
    names = [n for n, _ in model.named_parameters()]
    trainable = _match(names, spec.trainable, f"{where}.trainable")
    base = {"lr": spec.optimizer.lr, **spec.optimizer.hyper}
    members: list[list[str]] = [[] for _ in range(len(spec.optimizer.groups) + 1)]
    for name in trainable:
        slot = next(
            (
                i
                for i, (patterns, _) in enumerate(spec.optimizer.groups)
                if any(fnmatch.fnmatchcase(name, p) for p in patterns)
            ),
            -1,
        )
        members[slot].append(name)
    overrides = [o for _, o in spec.optimizer.groups] + [{}]
    groups = tuple(
        ParamGroup(tuple(m), {**base, **o}) for m, o in zip(members, overrides, strict=True) if m
    )
    num_steps = spec.steps or spec.epochs * (num_examples // spec.batch_size)
    record = StageRecord(
        name=spec.name,
        kind=spec.kind,
        data=spec.data,
        loss=spec.loss,
        optimizer=spec.optimizer.type,
        groups=groups,
        num_steps=num_steps,
        seed=spec.seed,
        batch_size=spec.batch_size,
        schedule=spec.schedule.to_dict(),
        entry=spec.entry,
        optimizer_policy=spec.optimizer_policy,
        checkpoint_every=spec.checkpoint_every,
        clip_grad_norm=spec.clip_grad_norm,
    )
    multipliers = spec.schedule.multipliers(num_steps, f"{where}.schedule")
    lr = [[m * g.hyper["lr"] for g in groups] for m in multipliers]
    batches = sample_batches(num_examples, spec.batch_size, num_steps, spec.seed)
    return record, StepLog.from_batches(lr, batches)


def add_adapters(model: nn.Module, actions: Sequence[EntryAction], stage: str) -> None:
    """Apply a stage's structural entry actions (new adapter parameters, function-preserving)."""
    for i, action in enumerate(actions):
        if is_structural(action):
            apply_entry(model, action, f"stage {stage} entry[{i}]")


def reinitialise(model: nn.Module, actions: Sequence[EntryAction], stage: str) -> None:
    """Apply a stage's re-initialisations; they belong to the stage and are skipped with it."""
    for i, action in enumerate(actions):
        if not is_structural(action):
            apply_entry(model, action, f"stage {stage} entry[{i}]")


def carried_state(
    previous: OptimizerState, record: StageRecord, model: nn.Module
) -> OptimizerState:
    """The optimizer state a stage starts from: empty under ``reset``; under ``carry`` the
    previous state of parameters the stage trains, except those it re-initialises (adapter
    parameters it adds are new, so they have no previous state either)."""
    if record.optimizer_policy == "reset":
        return {}
    keep = set(record.trainable) - reinitialised(model, record)
    return {name: slots for name, slots in previous.items() if name in keep}


def reinitialised(model: nn.Module, record: StageRecord) -> set[str]:
    """Parameters that the stage's ``reinit`` actions re-create (their values, offsets and
    adjoints do not come from earlier stages)."""
    names = set()
    for action in (a for a in record.entry if not is_structural(a)):
        for module in matching_modules(model, action.modules, f"stage {record.name} entry"):
            names |= {f"{module}.{n}" for n, _ in model.get_submodule(module).named_parameters()}
    return names


def continue_stage(
    model: nn.Module,
    record: StageRecord,
    steps: StepLog,
    previous: OptimizerState,
    on_step: StepCallback | None = None,
) -> OptimizerState:
    """Run a recorded stage from its ``start`` state: re-initialise, take the optimizer state
    its policy allows from ``previous`` (the state that existed when it began), and train."""
    reinitialise(model, record.entry, record.name)
    return train_stage(model, record, steps, carried_state(previous, record, model), on_step)


def step_seconds(traj: Trajectory, j: int, probe: int = 3) -> float:
    """Wall seconds per training step of stage j, measured by replaying its first ``probe``
    steps from its start with the recorded thread count; the first step, which pays for
    warm-up, is not counted when there are more. What the audit predicts retraining from."""
    record, log = traj.stages[j], traj.steps(j)
    n = min(probe, log.num_steps)
    steps = StepLog.from_batches(log.lr[:n].tolist(), [log.batch(t) for t in range(n)])
    model = traj.load_model(j, "start")
    previous = traj.optimizer_state(j - 1, "end") if j else {}
    times: list[float] = []
    with recorded_threads(traj):
        times.append(time.perf_counter())
        continue_stage(model, record, steps, previous, lambda *_: times.append(time.perf_counter()))
    spans = [b - a for a, b in itertools.pairwise(times)]
    return sum(spans[1:]) / (len(spans) - 1) if len(spans) > 1 else spans[0]


def train_stage(
    model: nn.Module,
    record: StageRecord,
    steps: StepLog,
    state: OptimizerState,
    on_step: StepCallback | None = None,
    on_checkpoint: CheckpointCallback | None = None,
) -> OptimizerState:
    """Run a stage's recorded steps on ``model`` in place; return the final optimizer state.

    Batches use the first two tensors of each example (inputs, targets); further ones, such as
    group ids, are ignored. With ``record.clip_grad_norm`` set, the gradients are clipped after
    backward and before the step by ``torch.nn.utils.clip_grad_norm_`` over the trained
    parameters in model order, as a user loop does with ``clip_grad_norm_(model.parameters(),
    max_norm)``. ``on_checkpoint`` receives the state before each step of
    ``record.checkpoint_steps()``: the recording stores it, replays and counterfactuals pass none.
    """
    params = dict(model.named_parameters())
    unknown = sorted(set(record.trainable) - set(params))
    if unknown:
        raise TrajectoryError(
            None,
            f"trains parameters the model lacks: {unknown[:5]}",
            "check the model reference and entry actions",
            field="optimizer.groups",
            stage=record.name,
        )
    trainable = set(record.trainable)
    for name, p in params.items():
        p.requires_grad_(name in trainable)
    clipped = [p for name, p in params.items() if name in trainable]
    names = {id(p): n for n, p in params.items()}
    optimizer = build_optimizer(
        record.optimizer, [([params[n] for n in g.params], g.hyper) for g in record.groups]
    )
    load_state_by_name(optimizer, state, names)
    require_batch_order(record, steps, "replays and retraining")
    dataset = load_dataset(record.data)
    check_indices(record, steps, len(dataset))
    loss_fn = loss_function(record.loss)
    torch.manual_seed(record.seed)
    model.train()
    inner = set(record.checkpoint_steps())
    for t in range(steps.num_steps):
        if on_checkpoint is not None and t in inner:
            on_checkpoint(t, snapshot(model))
        inputs, targets = fetch_batch(dataset, steps.batch(t))
        for group, lr in zip(optimizer.param_groups, steps.lr[t].tolist(), strict=True):
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        _check_finite(loss, optimizer, names, record.name, t)
        if record.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(clipped, record.clip_grad_norm)
        optimizer.step()
        if on_step is not None:
            on_step(record.name, t, steps.num_steps, loss.item())
    return state_by_name(optimizer, names)


@contextmanager
def recorded_threads(traj: Trajectory) -> Iterator[None]:
    """Run the body with the recording process's intra-op thread count and deterministic-
    algorithms flag (the manifest's ``environment``), restoring the caller's afterwards. The
    thread count changes how CPU kernels split their sums, so exact replays and retraining need
    the recorded one. Manifests without an ``environment`` run with the caller's settings."""
    env = traj.environment
    if env is None:
        yield
        return
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(env.threads)
    torch.use_deterministic_algorithms(env.deterministic)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def run_pipeline(
    spec: PipelineSpec, root: Path | str | None, on_step: StepCallback | None = None
) -> Trajectory:
    """Train the declared stages and record them under ``root`` (None: in memory).

    If ``root`` already holds an interrupted run of the same pipeline, it resumes after the last
    recorded stage (with the thread count it was recorded with); a finished run is returned as
    it is; a different pipeline, or a directory another process records into, is refused. The
    directory's lock is released when this returns.
    """
    check_pipeline(spec)
    traj = Trajectory.create(root, spec.model, spec.to_dict(), resume=True)
    try:
        with recorded_threads(traj):
            done = len(traj.stages)
            if done:
                model = traj.load_model(done - 1, "end")
                state = traj.optimizer_state(done - 1, "end")
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(spec.seed)
                    model = spec.model.call()
                state = {}
            for stage in spec.stages[done:]:
                state = _record_stage(traj, model, stage, state, on_step)
        if not traj.complete:
            traj.mark_complete()
    finally:
        traj.close()
    return traj


def _record_stage(
    traj: Trajectory,
    model: nn.Module,
    stage: StageSpec,
    previous: OptimizerState,
    on_step: StepCallback | None,
) -> OptimizerState:
    """Train one declared stage on ``model`` and append it to ``traj``; its inner checkpoints
    are written as training reaches them and listed with the stage."""
    add_adapters(model, stage.entry, stage.name)
    start = snapshot(model)
    reinitialise(model, stage.entry, stage.name)
    record, steps = resolve_stage(stage, model, len(load_dataset(stage.data)))
    state_in = carried_state(previous, record, model)
    inner: list[dict[str, Any]] = []

    def save(t: int, tensors: dict[str, torch.Tensor]) -> None:
        inner.append(traj.write_inner_checkpoint(stage.name, t, tensors))

    state = train_stage(model, record, steps, state_in, on_step, save)
    # run by train_stage itself, which every replay runs: verified by construction
    record = replace(record, verified=True)
    traj.append_stage(record, start, snapshot(model), state_in, state, steps, inner)
    return state


def check_pipeline(spec: PipelineSpec) -> None:
    """Resolve every stage against a throwaway model, so that a bad pattern, module name or
    batch size is reported before any stage trains."""
    model = spec.model.call()
    for stage in spec.stages:
        for i, action in enumerate(stage.entry):
            where = f"pipeline.stages.{stage.name}.entry[{i}].modules"
            matching_modules(model, action.modules, where)
        add_adapters(model, stage.entry, stage.name)
        resolve_stage(stage, model, len(load_dataset(stage.data)))


@dataclass(frozen=True)
class ReplayDiff:
    """Largest absolute difference between replayed and recorded tensors of one stage:
    parameters and buffers at its start and end, and optimizer state at its end."""

    stage: str
    start: float
    end: float
    optimizer: float

    @property
    def worst(self) -> float:
        return max(self.start, self.end, self.optimizer)


@dataclass(frozen=True)
class Replay:
    """A replay's differences, one ``ReplayDiff`` per stage in training order (iterate or index
    it like a list), and ``environment``: what differs from the recording process that the
    replay could not set back (torch version, device, CPU kernels), each a phrase such as
    "recorded with torch 2.12.0, replayed with 2.13.0"; any of them may explain a difference."""

    stages: tuple[ReplayDiff, ...]
    environment: tuple[str, ...] = ()

    @property
    def worst(self) -> float:
        """The largest difference over all stages (0.0: an exact replay)."""
        return max((d.worst for d in self.stages), default=0.0)

    def __iter__(self) -> Iterator[ReplayDiff]:
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    def __getitem__(self, i: int) -> ReplayDiff:
        return self.stages[i]

    def to_json(self) -> dict[str, Any]:
        return {
            "stages": [asdict(d) for d in self.stages],
            "worst": self.worst,
            "environment": list(self.environment),
        }


def replay(traj: Trajectory, on_step: StepCallback | None = None) -> Replay:
    """Re-run the whole recorded trajectory from its first checkpoint, with the recorded thread
    count (``recorded_threads``); compare every boundary. Stages known not to replay
    (``Trajectory.check_replayable``) are refused before any runs."""
    if not traj.stages:
        raise TrajectoryError(
            traj.store.where(MANIFEST),
            "records no stage yet",
            "run the pipeline again to record its stages",
            field="stages",
        )
    for i in range(len(traj.stages)):
        traj.check_replayable(i)
    model = traj.load_model(0, "start")
    state: OptimizerState = {}
    diffs = []
    with recorded_threads(traj):
        for i, record in enumerate(traj.stages):
            add_adapters(model, record.entry if i else (), record.name)
            start = max_abs_diff(snapshot(model), traj.checkpoint(i, "start"))
            state = continue_stage(model, record, traj.steps(i), state, on_step)
            end = max_abs_diff(snapshot(model), traj.checkpoint(i, "end"))
            recorded = flatten_state(traj.optimizer_state(i, "end"))
            diffs.append(
                ReplayDiff(record.name, start, end, max_abs_diff(flatten_state(state), recorded))
            )
    return Replay(tuple(diffs), environment_notes(traj))


def environment_notes(traj: Trajectory) -> tuple[str, ...]:
    """What differs between the recording process and this one that ``recorded_threads``
    cannot set back (``Environment.differences``); for a manifest without an ``environment``,
    a note that the recording's is unknown."""
    if traj.environment is None:
        return (
            "the recording's environment is unknown (its manifest predates the environment "
            "field): an exact replay needs the same torch version, CPU and thread count",
        )
    return traj.environment.differences(Environment.current())


def max_abs_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """max |a - b| over all entries of two state dicts with the same keys (inf if keys differ)."""
    if set(a) != set(b):
        return float("inf")
    return max(
        (float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()), default=0.0
    )


def _match(names: list[str], patterns: Sequence[str], where: str) -> list[str]:
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise SpecError(
                where,
                f"no parameter matches {pattern!r}",
                f"use names such as {', '.join(names[:6])}",
            )
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def fetch_batch(dataset: Any, indices: torch.Tensor) -> tuple[Any, Any]:
    """The (inputs, targets) of the rows ``indices``; further tensors (group ids) are dropped."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0][indices], dataset.tensors[1][indices]
    inputs, targets = default_collate([dataset[i] for i in indices.tolist()])[:2]
    return inputs, targets


def require_batch_order(record: StageRecord, steps: StepLog, need: str) -> None:
    """Refuse a stage that recorded no batch order (or not for every step); ``need`` names
    what needs it (replays, example scores, filtering)."""
    if not steps.has_batch_order:
        raise TrajectoryError(
            None,
            f"recorded no batch order (or not for every step), which {need} need",
            "record the stage with stage.log_batch(indices) before every optimizer step",
            field="steps.batch_indices",
            stage=record.name,
        )


def check_indices(record: StageRecord, steps: StepLog, size: int) -> None:
    """Refuse batches that index past the ``size`` examples the stage's data reference yields."""
    if steps.indices.numel() and int(steps.indices.max()) >= size:
        raise TrajectoryError(
            None,
            f"batches use example {int(steps.indices.max())} but the data reference yields only "
            f"{size} examples",
            f"make the data reference {record.data.target} return the data the stage trained on",
            field="data",
            stage=record.name,
        )


def _check_finite(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, names: dict[int, str], stage: str, t: int
) -> None:
    fix = f"lower the learning rate of stage {stage!r} or check its data for bad values"
    if not torch.isfinite(loss):
        raise TrainingError(f"stage {stage!r} step {t}: the loss is {loss.item()}. Fix: {fix}")
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    # One fused check per step (a NaN or infinity makes its tensor's norm non-finite); the
    # culprit is looked for only when there is one.
    if not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and not torch.isfinite(p.grad).all():
                raise TrainingError(
                    f"stage {stage!r} step {t}: the gradient of {names[id(p)]} "
                    f"holds NaN or infinity. Fix: {fix}"
                )
