"""Record a user's own training loop as a trajectory, without changing the loop.

The user keeps their model, optimizer, scheduler and loop, and adds three calls::

    recorder = Recorder("runs/my_run", model, Ref("my_pkg.models:build", {"width": 64}))
    with recorder.stage("finetune", kind="finetune", seed=1,
                        data=Ref("my_pkg.data:train_set", {"split": "b"})) as stage:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        stage.attach(optimizer)
        for indices in my_batches:
            inputs, targets = dataset[indices]
            stage.log_batch(indices)            # the dataset indices of this step's batch
            optimizer.zero_grad()
            loss_fn(model(inputs), targets).backward()
            optimizer.step()                    # learning rates are read by a pre-step hook
            scheduler.step()
    recorder.finish()

The model and data references must rebuild the same model and data in a fresh process, and the
loop must compute ``loss(model(inputs), targets)`` with a mean-reduced loss, as the replay does.
A loop that clips gradients declares it (``recorder.stage(..., clip_grad_norm=1.0)``) and calls
``torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)`` itself between backward and step.

When a stage ends, its first ``VERIFY_STEPS`` steps are replayed from its start and compared
with what the loop produced; a stage that differs is recorded ``verified: false`` and refused by
everything that replays or retrains it (``Trajectory.check_replayable``), so that a loop doing
something the record does not hold (undeclared clipping, gradient accumulation, a second
optimizer) cannot yield a wrong ground truth. ``stagetrace replay RUN --verify`` checks the
whole record.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn

from attribution.record.compute import Compute, using
from attribution.record.errors import StagetraceError
from attribution.record.optim import (
    OptimizerState,
    group_hyperparameters,
    optimizer_kind,
    state_by_name,
)
from attribution.record.pipeline import (
    add_adapters,
    continue_stage,
    max_abs_diff,
    recorded_threads,
    reinitialise,
)
from attribution.record.references import Ref, trust_target
from attribution.record.spec import (
    POLICIES,
    STAGE_KINDS,
    EntryAction,
    check_clip_grad_norm,
    check_stage_name,
)
from attribution.record.trajectory import (
    ParamGroup,
    StageRecord,
    StepLog,
    Trajectory,
    Verification,
    load_state,
    snapshot,
)

VERIFY_STEPS = 3
"""How many of a stage's first steps are replayed when it ends (each costs one training step and
one copy of the parameters and buffers, held until the stage ends)."""


class Recorder:
    """Writes a trajectory under ``root`` (None: in memory) for a model trained by user code.

    It holds the directory's lock from its creation until ``finish()`` (or the process ends):
    a second recording into the same directory is refused meanwhile. The references given to it
    in code (model, stage data, a loss ``module:function``) name the user's own modules, so it
    trusts them in this process (``references.trust``); other processes that open the run need
    ``--trust-module`` or ``STAGETRACE_TRUST`` for them."""

    def __init__(self, root: Path | str | None, model: nn.Module, model_ref: Ref) -> None:
        trust_target(model_ref.target)
        _check_reference(model, model_ref)
        self.model = model
        # the loop trains where the model is: the manifest says so, and verification runs there
        self.compute = Compute(str(next(model.parameters(), torch.empty(0)).device))
        with using(self.compute):
            self.trajectory = Trajectory.create(root, model_ref)

    def stage(
        self,
        name: str,
        *,
        kind: str,
        data: Ref,
        seed: int,
        loss: str = "cross_entropy",
        batch_size: int | None = None,
        entry: Sequence[Mapping[str, Any]] = (),
        optimizer_policy: str = "reset",
        log_batches: bool = True,
        clip_grad_norm: float | None = None,
    ) -> StageRecording:
        """A context in which one stage trains. Entry actions are applied on entering it;
        ``seed`` seeds the global torch RNG there and the entry actions. With
        ``log_batches=False`` no batch order is recorded: the stage cannot be replayed or
        retrained, and only estimators that need no batches (E0, E1) can audit it.
        ``clip_grad_norm`` declares the ``max_norm`` with which the loop calls
        ``torch.nn.utils.clip_grad_norm_`` on the model's parameters before every step (the
        recorder does not clip; replays do)."""
        check_stage_name(name, f"stage {name!r}")
        trust_target(data.target)
        if ":" in loss:
            trust_target(loss)
        clip = check_clip_grad_norm(clip_grad_norm, f"stage {name}.clip_grad_norm")
        if kind not in STAGE_KINDS:
            raise StagetraceError(
                f"stage kind {kind!r} is unknown. Fix: use one of {', '.join(STAGE_KINDS)}"
            )
        if optimizer_policy not in POLICIES:
            raise StagetraceError(
                f"optimizer_policy {optimizer_policy!r} is unknown. Fix: use "
                f"one of {', '.join(POLICIES)}"
            )
        actions = tuple(
            EntryAction.from_dict(a, f"stage {name} entry[{i}]", seed + 1000 * (i + 1))
            for i, a in enumerate(entry)
        )
        return StageRecording(
            self,
            name,
            kind,
            data,
            seed,
            loss,
            batch_size,
            actions,
            optimizer_policy,
            log_batches,
            clip,
        )

    def finish(self) -> Trajectory:
        """Mark the run complete, release the directory's lock and return its trajectory."""
        self.trajectory.mark_complete()
        self.trajectory.close()
        return self.trajectory


class StageRecording:
    """The open record of one stage; use through ``Recorder.stage``."""

    def __init__(
        self,
        recorder: Recorder,
        name: str,
        kind: str,
        data: Ref,
        seed: int,
        loss: str,
        batch_size: int | None,
        entry: tuple[EntryAction, ...],
        policy: str,
        log_batches: bool,
        clip_grad_norm: float | None = None,
    ) -> None:
        self.recorder = recorder
        self.log_batches = log_batches
        self.clip_grad_norm = clip_grad_norm
        self.name, self.kind, self.data, self.seed, self.loss = name, kind, data, seed, loss
        self.batch_size, self.entry, self.policy = batch_size, entry, policy
        self.optimizer: torch.optim.Optimizer | None = None
        self.batches: list[torch.Tensor] = []
        self.lrs: list[list[float]] = []
        self._pending: torch.Tensor | None = None
        self._early: list[dict[str, torch.Tensor]] = []

    def __enter__(self) -> StageRecording:
        model = self.recorder.model
        add_adapters(model, self.entry, self.name)
        self.start = snapshot(model)
        reinitialise(model, self.entry, self.name)
        torch.manual_seed(self.seed)
        self.names = {id(p): n for n, p in model.named_parameters()}
        return self

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Follow ``optimizer``: its groups, hyperparameters, state and per-step learning rates."""
        if self.optimizer is not None:
            raise StagetraceError(
                f"stage {self.name!r}: an optimizer is already attached. "
                "Fix: use one optimizer per stage"
            )
        try:
            self.kind_of_optimizer = optimizer_kind(optimizer)
            self.hyper = [
                group_hyperparameters(self.kind_of_optimizer, g) for g in optimizer.param_groups
            ]
        except ValueError as exc:
            raise StagetraceError(f"stage {self.name!r}: {exc}") from exc
        unknown = [
            p for g in optimizer.param_groups for p in g["params"] if id(p) not in self.names
        ]
        if unknown:
            raise StagetraceError(
                f"stage {self.name!r}: the optimizer holds {len(unknown)} "
                "tensor(s) that are not parameters of the recorded model. Fix: "
                "build the optimizer from this model's parameters"
            )
        self.groups = tuple(
            ParamGroup(
                tuple(self.names[id(p)] for p in g["params"] if p.requires_grad),
                {"lr": float(g["lr"]), **h},
            )
            for g, h in zip(optimizer.param_groups, self.hyper, strict=True)
        )
        self.optimizer_start: OptimizerState = state_by_name(optimizer, self.names)
        if self.policy == "reset" and self.optimizer_start:
            raise StagetraceError(
                f"stage {self.name!r}: the optimizer already holds state, but "
                "the stage's optimizer_policy is 'reset'. Fix: attach a fresh "
                "optimizer, or declare optimizer_policy='carry'"
            )
        self.optimizer = optimizer
        self._hook = optimizer.register_step_pre_hook(self._before_step)

    def log_batch(self, indices: torch.Tensor | Sequence[int]) -> None:
        """The dataset indices of the batch the next optimizer step trains on."""
        if not self.log_batches:
            raise StagetraceError(
                f"stage {self.name!r} was opened with log_batches=False. Fix: log every batch "
                "(log_batches=True) or none"
            )
        self._pending = torch.as_tensor(indices, dtype=torch.int64).flatten().clone()

    def _before_step(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        step = len(self.lrs)
        if 1 <= step <= VERIFY_STEPS:
            # the state after `step` steps, including anything the loop did after the last one
            self._early.append(snapshot(self.recorder.model))
        if self._pending is None and not self.log_batches:
            self._pending = torch.zeros(0, dtype=torch.int64)
        if self._pending is None:
            raise StagetraceError(
                f"stage {self.name!r} step {step}: the optimizer stepped "
                "without a batch. Fix: call stage.log_batch(indices) "
                "before every optimizer.step()"
            )
        for g, h in zip(optimizer.param_groups, self.hyper, strict=True):
            if group_hyperparameters(self.kind_of_optimizer, g) != h:
                raise StagetraceError(
                    f"stage {self.name!r} step {step}: a hyperparameter other "
                    "than lr changed during the stage. Fix: start a new stage "
                    "where hyperparameters change"
                )
        self.lrs.append([float(g["lr"]) for g in optimizer.param_groups])
        self.batches.append(self._pending)
        self._pending = None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.optimizer is not None:
            self._hook.remove()
        if exc_type is not None:
            return
        if self.optimizer is None or not self.lrs:
            raise StagetraceError(
                f"stage {self.name!r} recorded no optimizer steps. Fix: call "
                "stage.attach(optimizer) and train at least one step"
            )
        record = StageRecord(
            name=self.name,
            kind=self.kind,
            data=self.data,
            loss=self.loss,
            optimizer=self.kind_of_optimizer,
            groups=self.groups,
            num_steps=len(self.lrs),
            seed=self.seed,
            batch_size=self.batch_size,
            schedule={"name": "recorded"},
            entry=self.entry,
            optimizer_policy=self.policy,
            clip_grad_norm=self.clip_grad_norm,
        )
        end = snapshot(self.recorder.model)
        steps = StepLog.from_batches(self.lrs, self.batches)
        if steps.has_batch_order:
            check = self._verify(record, steps, [*self._early, end][:VERIFY_STEPS])
            record = replace(record, verified=check.passed, verification=check)
        self.recorder.trajectory.append_stage(
            record,
            self.start,
            end,
            self.optimizer_start,
            state_by_name(self.optimizer, self.names),
            steps,
        )

    def _verify(
        self, record: StageRecord, steps: StepLog, recorded: list[dict[str, torch.Tensor]]
    ) -> Verification:
        """Replay the stage's first ``len(recorded)`` steps from its start as every replay
        does, and compare the parameters and buffers after each with ``recorded``. The global
        RNG and the user's model are left untouched; the replay runs with the thread count
        recorded when the Recorder was created, as every later replay will, on the device the
        user's model was on then."""
        n = len(recorded)
        first = replace(record, num_steps=n, checkpoint_every=None)
        log = StepLog(steps.lr[:n], steps.offsets[: n + 1], steps.indices[: steps.offsets[n]])
        traj = self.recorder.trajectory
        differences: list[float] = []
        # building and training draw random numbers
        with torch.random.fork_rng(devices=[]), recorded_threads(traj):
            try:
                model = traj.model.call()
                for earlier in (*traj.stages, record):
                    add_adapters(model, earlier.entry, earlier.name)
                load_state(model, self.start, f"start of stage {record.name}")
                previous = traj.optimizer_state(len(traj.stages) - 1, "end") if traj.stages else {}

                def compare(_stage: str, t: int, _steps: int, _loss: float) -> None:
                    differences.append(max_abs_diff(snapshot(model), recorded[t]))

                continue_stage(model, first, log, previous, compare, self.recorder.compute)
            except StagetraceError as exc:
                return Verification(n, problem=str(exc))
        failed = [t for t, d in enumerate(differences) if d != 0]
        return Verification(n, failed[0] if failed else None, max(differences))


def _check_reference(model: nn.Module, ref: Ref) -> None:
    """Fail early if ``ref`` does not rebuild a model with the same parameter names and shapes."""
    with torch.random.fork_rng(devices=[]):  # leave the user's random state as it was
        rebuilt = {k: v.shape for k, v in ref.call().state_dict().items()}
    actual = {k: v.shape for k, v in model.state_dict().items()}
    if rebuilt != actual:
        diff = sorted(set(rebuilt) ^ set(actual)) or sorted(
            k for k in actual if rebuilt.get(k) != actual[k]
        )
        raise StagetraceError(
            f"model reference {ref.target} does not rebuild the model being "
            f"trained (differs at {diff[:5]}). Fix: pass the constructor and "
            "arguments that build this model"
        )
