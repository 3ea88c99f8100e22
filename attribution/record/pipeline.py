"""Run declared stages deterministically, and replay recorded ones.

One function, ``train_stage``, performs every training step in the project: the original run,
its replay, and every skip-stage counterfactual. It reads learning rates and batch indices from a
``StepLog``, never from a sampler or scheduler, so replays see exactly the recorded numbers. Its
callers run it inside ``recorded_threads``, with the recording's thread count. It trains on the
device (and, for bfloat16, in the dtype) of ``attribution.record.compute.current()``, or of the
compute a caller passes, and hands the model and its optimizer state back on the CPU in their
own precision.
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

from attribution.record.compute import Compute, current, deterministic, to_cpu
from attribution.record.entry import apply_entry, is_structural, matching_modules
from attribution.record.errors import SpecError, TrainingError, TrajectoryError
from attribution.record.optim import (
    OptimizerState,
    build_optimizer,
    load_state_by_name,
    state_by_name,
    steps_with_frozen_gradient,
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
    compute: Compute | None = None,
    merge: int = 1,
) -> OptimizerState:
    """Run a recorded stage from its ``start`` state: re-initialise, take the optimizer state
    its policy allows from ``previous`` (the state that existed when it began), and train (on
    ``compute``, default ``current()``, and with ``merge``; see ``train_stage``)."""
    reinitialise(model, record.entry, record.name)
    state = carried_state(previous, record, model)
    return train_stage(model, record, steps, state, on_step, compute=compute, merge=merge)


def step_seconds(
    traj: Trajectory, j: int, probe: int = 3, fraction: float = 1.0, merge: int = 1
) -> float:
    """Wall seconds per training step of stage j, measured by replaying its first ``probe``
    whole runs of ``merge`` steps (``train_stage``; fewer if the stage is shorter, at least
    one) from its start with the recorded thread count, each step on the first ``fraction`` of
    its batch (at least one example); the first run, which pays for warm-up, is not counted
    when there are more. What the audit predicts retraining (``fraction`` 1) and subset replays
    from: a step's cost is not proportional to its examples (the optimizer step and the
    per-operation overhead stay)."""
    record, log = traj.stages[j], traj.steps(j)
    n = min(max(1, min(probe, log.num_steps // merge)) * merge, log.num_steps)
    batches = [log.batch(t) for t in range(n)]
    batches = [b[: max(1, round(fraction * len(b)))] for b in batches]
    steps = StepLog.from_batches(log.lr[:n].tolist(), batches)
    model = traj.load_model(j, "start")
    previous = traj.optimizer_state(j - 1, "end") if j else {}
    times: list[float] = []
    with recorded_threads(traj):
        times.append(time.perf_counter())
        continue_stage(
            model,
            record,
            steps,
            previous,
            lambda *_: times.append(time.perf_counter()),
            merge=merge,
        )
    # a run's steps report together at its end: the spans are a run's seconds, then zeros
    spans = [b - a for a, b in itertools.pairwise(times)]
    counted = spans[merge:] if len(spans) > merge else spans
    return sum(counted) / len(counted)


def train_stage(
    model: nn.Module,
    record: StageRecord,
    steps: StepLog,
    state: OptimizerState,
    on_step: StepCallback | None = None,
    on_checkpoint: CheckpointCallback | None = None,
    compute: Compute | None = None,
    merge: int = 1,
) -> OptimizerState:
    """Run a stage's recorded steps on ``model`` in place; return the final optimizer state.

    The steps run on ``compute`` (default ``current()``): the model, its optimizer state and
    the batches are moved to its device, and to bfloat16 when its ``training_dtype`` says so
    (floating inputs and targets cast; an approximation of the recorded computation). On CUDA
    deterministic algorithms are on (``compute.deterministic``). The model is handed back on the
    CPU with every tensor in the dtype it came in, and so is the returned state, so callers
    (and entry actions, which draw from the CPU generator) never see the device.

    Batches use the first two tensors of each example (inputs, targets); further ones, such as
    group ids, are ignored. With ``record.clip_grad_norm`` set, the gradients are clipped after
    backward and before the step by ``torch.nn.utils.clip_grad_norm_`` over the trained
    parameters in model order, as a user loop does with ``clip_grad_norm_(model.parameters(),
    max_norm)``. ``on_checkpoint`` receives the state before each step of
    ``record.checkpoint_steps()``: the recording stores it, replays and counterfactuals pass none.

    ``merge`` > 1 approximates (the subset replay's ``merge``, docs/estimators.md): each run of
    ``merge`` consecutive steps computes one gradient, at its first step, on the union of their
    batches, and takes its steps with that gradient held fixed, each with its own learning rate
    (``steps_with_frozen_gradient``); 1 runs every step as recorded.
    """
    if merge < 1 or (merge > 1 and on_checkpoint is not None):
        raise ValueError(f"merge={merge}: give 1, or more without on_checkpoint")
    unknown = sorted(set(record.trainable) - {n for n, _ in model.named_parameters()})
    if unknown:
        raise TrajectoryError(
            None,
            f"trains parameters the model lacks: {unknown[:5]}",
            "check the model reference and entry actions",
            field="optimizer.groups",
            stage=record.name,
        )
    require_batch_order(record, steps, "replays and retraining")
    dataset = load_dataset(record.data)
    check_indices(record, steps, len(dataset))
    loss_fn = loss_function(record.loss)
    compute = current() if compute is None else compute
    device, dtype = compute.torch_device, compute.training_dtype
    native = _dtypes(model)
    model.to(device=device, dtype=dtype)
    try:
        params = dict(model.named_parameters())
        trainable = set(record.trainable)
        for name, p in params.items():
            p.requires_grad_(name in trainable)
        clipped = [p for name, p in params.items() if name in trainable]
        names = {id(p): n for n, p in params.items()}
        optimizer = build_optimizer(
            record.optimizer, [([params[n] for n in g.params], g.hyper) for g in record.groups]
        )
        load_state_by_name(optimizer, state, names)
        _place_state(optimizer)
        torch.manual_seed(record.seed)
        model.train()
        inner = set(record.checkpoint_steps())
        with deterministic(compute):
            for first in range(0, steps.num_steps, merge):
                block = range(first, min(first + merge, steps.num_steps))
                if on_checkpoint is not None and first in inner:
                    on_checkpoint(first, to_cpu(snapshot(model), native))
                batch = torch.cat([steps.batch(t) for t in block])
                inputs, targets = (_placed(x, device, dtype) for x in fetch_batch(dataset, batch))
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(inputs), targets)
                loss.backward()
                _check_finite(loss, optimizer, names, record.name, first)
                if record.clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(clipped, record.clip_grad_norm)
                steps_with_frozen_gradient(optimizer, steps.lr[first : block.stop].tolist())
                if on_step is not None:
                    value = loss.item()
                    for t in block:
                        on_step(record.name, t, steps.num_steps, value)
        final = state_by_name(optimizer, names)
    finally:
        _restore(model, native)
    return {
        name: to_cpu(slots, {k: native[name] for k in slots if k != "step"})
        for name, slots in final.items()
    }


def _dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """Every parameter's and buffer's dtype by name (what ``_restore`` puts back)."""
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    return {name: t.dtype for name, t in tensors}


def _restore(model: nn.Module, dtypes: Mapping[str, torch.dtype]) -> None:
    """Move ``model`` back to the CPU with each tensor in its dtype of ``dtypes`` (in place:
    the same parameter objects, as ``nn.Module.to`` keeps them; a no-op for a CPU model that
    never left its precision)."""
    model.to("cpu")
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if name in dtypes and t.dtype != dtypes[name]:
            t.grad = None  # a gradient of the lower precision no longer fits
            t.data = t.data.to(dtypes[name])


def _place_state(optimizer: torch.optim.Optimizer) -> None:
    """Put each loaded optimizer state tensor on its parameter's device and, if floating, in
    its dtype, as ``Optimizer.load_state_dict`` does; ``step`` stays where torch keeps it (a CPU
    scalar). On the CPU in the recorded precision nothing is copied."""
    for p, slots in optimizer.state.items():
        for key, value in slots.items():
            if key != "step" and isinstance(value, torch.Tensor):
                dtype = p.dtype if value.is_floating_point() else value.dtype
                slots[key] = value.to(p.device, dtype)


def _placed(x: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """A batch tensor on ``device``, floating ones in ``dtype`` (None: as they are)."""
    if not isinstance(x, torch.Tensor):
        return x
    return x.to(device, dtype) if dtype is not None and x.is_floating_point() else x.to(device)


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
    directory's lock is released when this returns. It trains on the CPU unless the current
    compute names a device explicitly (``Compute.recording``), always in the model's precision.
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
            compute = current().recording()
            for stage in spec.stages[done:]:
                state = _record_stage(traj, model, stage, state, on_step, compute)
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
    compute: Compute,
) -> OptimizerState:
    """Train one declared stage on ``model`` (on ``compute``) and append it to ``traj``; its
    inner checkpoints are written as training reaches them and listed with the stage."""
    add_adapters(model, stage.entry, stage.name)
    start = snapshot(model)
    reinitialise(model, stage.entry, stage.name)
    record, steps = resolve_stage(stage, model, len(load_dataset(stage.data)))
    state_in = carried_state(previous, record, model)
    inner: list[dict[str, Any]] = []

    def save(t: int, tensors: dict[str, torch.Tensor]) -> None:
        inner.append(traj.write_inner_checkpoint(stage.name, t, tensors))

    state = train_stage(model, record, steps, state_in, on_step, save, compute)
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


CUDA_REPLAY_RTOL = 1e-5
"""The tolerance of a replay on CUDA, relative to the largest magnitude of the recorded tensors
compared: GPU kernels need not reproduce the recording's sums bit for bit (a CPU recording, or
operations without a deterministic CUDA kernel), so ``replay --verify`` there passes when every
difference is at most this fraction of that magnitude. On the CPU a replay is compared bit for
bit (tolerance 0)."""


@dataclass(frozen=True)
class ReplayDiff:
    """Largest absolute difference between replayed and recorded tensors of one stage:
    parameters and buffers at its start and end, and optimizer state at its end; and the scale
    they are measured against, the largest magnitude of the recorded parameters and buffers
    (``params_scale``, start and end) and of the recorded optimizer state
    (``optimizer_scale``)."""

    stage: str
    start: float
    end: float
    optimizer: float
    params_scale: float = 0.0
    optimizer_scale: float = 0.0

    @property
    def worst(self) -> float:
        return max(self.start, self.end, self.optimizer)

    @property
    def relative(self) -> float:
        """The largest difference as a fraction of its scale (0.0: an exact replay; inf: a
        difference where the recorded tensors are all zero, or keys that differ)."""
        return max(
            _ratio(self.start, self.params_scale),
            _ratio(self.end, self.params_scale),
            _ratio(self.optimizer, self.optimizer_scale),
        )


def _ratio(difference: float, scale: float) -> float:
    if difference == 0.0:
        return 0.0
    return difference / scale if scale > 0.0 else float("inf")


@dataclass(frozen=True)
class Replay:
    """A replay's differences, one ``ReplayDiff`` per stage in training order (iterate or index
    it like a list), and ``environment``: what differs from the recording process that the
    replay could not set back (torch version, device, CPU kernels, precision), each a phrase such
    as "recorded with torch 2.12.0, replayed with 2.13.0"; any of them may explain a difference.
    ``tolerance`` is the relative difference it allows (0.0 on the CPU: bit for bit;
    ``CUDA_REPLAY_RTOL`` on CUDA) and ``device`` where it ran."""

    stages: tuple[ReplayDiff, ...]
    environment: tuple[str, ...] = ()
    tolerance: float = 0.0
    device: str = "cpu"

    @property
    def worst(self) -> float:
        """The largest difference over all stages (0.0: an exact replay)."""
        return max((d.worst for d in self.stages), default=0.0)

    @property
    def passed(self) -> bool:
        """Whether every stage's relative difference is within ``tolerance`` (on the CPU:
        whether the replay is exact)."""
        return all(d.relative <= self.tolerance for d in self.stages)

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
            "tolerance": self.tolerance,
            "device": self.device,
            "passed": self.passed,
            "environment": list(self.environment),
        }


def replay(traj: Trajectory, on_step: StepCallback | None = None) -> Replay:
    """Re-run the whole recorded trajectory from its first checkpoint, with the recorded thread
    count (``recorded_threads``), on the current compute's device (and in bfloat16 if it says
    so); compare every boundary. On CUDA deterministic algorithms are on and the comparison
    allows ``CUDA_REPLAY_RTOL``; on the CPU it is bit for bit. Stages known not to replay
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
    compute = current()
    model = traj.load_model(0, "start")
    state: OptimizerState = {}
    diffs = []
    with recorded_threads(traj):
        for i, record in enumerate(traj.stages):
            add_adapters(model, record.entry if i else (), record.name)
            start, end = traj.checkpoint(i, "start"), traj.checkpoint(i, "end")
            start_diff = max_abs_diff(snapshot(model), start)
            state = continue_stage(model, record, traj.steps(i), state, on_step, compute)
            recorded = flatten_state(traj.optimizer_state(i, "end"))
            diffs.append(
                ReplayDiff(
                    record.name,
                    start_diff,
                    max_abs_diff(snapshot(model), end),
                    max_abs_diff(flatten_state(state), recorded),
                    max(_magnitude(start), _magnitude(end)),
                    _magnitude(recorded),
                )
            )
    tolerance = CUDA_REPLAY_RTOL if compute.is_cuda else 0.0
    notes = environment_notes(traj, compute.torch_device.type)
    if compute.training_dtype is not None:
        notes += (f"replayed in {compute.dtype}, an approximation of the recorded precision",)
    return Replay(tuple(diffs), notes, tolerance, str(compute.torch_device))


def _magnitude(tensors: Mapping[str, torch.Tensor]) -> float:
    """The largest |value| of the floating tensors of a state dict (0.0 if none)."""
    return max(
        (float(t.abs().max()) for t in tensors.values() if t.is_floating_point() and t.numel()),
        default=0.0,
    )


def environment_notes(traj: Trajectory, device: str = "cpu") -> tuple[str, ...]:
    """What differs between the recording process and this one, replaying on ``device`` (a
    device type), that ``recorded_threads`` cannot set back (``Environment.differences``); for
    a manifest without an ``environment``, a note that the recording's is unknown."""
    if traj.environment is None:
        return (
            "the recording's environment is unknown (its manifest predates the environment "
            "field): an exact replay needs the same torch version, CPU and thread count",
        )
    return traj.environment.differences(Environment.current(device))


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
