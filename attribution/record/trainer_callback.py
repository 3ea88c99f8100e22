"""Record a Hugging Face ``transformers.Trainer`` run as one stage of a ``Recorder``.

The Trainer keeps its own loop, optimizer, scheduler, checkpoints and logs; three objects make
it record the stage as ``Recorder.stage`` would (docs/trajectory.md)::

    recorder = Recorder("runs/my_run", model, Ref("my_pkg.models:build", {"width": 64}))
    data = Ref("my_pkg.data:train_set", {"split": "b"})      # a dataset of (input, target)
    callback = StagetraceCallback(recorder, "finetune", kind="finetune", data=data)
    trainer = Trainer(
        model=TrainerModel(model),                 # loss = cross_entropy(model(inputs), labels)
        args=TrainingArguments(..., optim="adamw_torch"),
        train_dataset=IndexedDataset(load_dataset(data)),   # items carry their index
        callbacks=[callback],
    )
    trainer.train()
    recorder.finish()

- ``TrainerModel(model, loss)`` is what the Trainer trains: ``forward(inputs, labels, index)``
  returns ``{"loss": loss(model(inputs), labels), "logits": model(inputs)}``, the loss every
  replay computes; its ``state_dict``/``load_state_dict`` are the wrapped model's, so the
  Trainer's ``checkpoint-N/model.safetensors`` holds the model's own parameter names (as the
  record does); and it keeps the ``index`` of each training batch for the callback.
- ``IndexedDataset(dataset)`` turns items ``(input, target, ...)`` into the Trainer's
  ``{"inputs", "labels", "index"}`` dicts: the dataset indices travel with their batch, through
  any sampler, collator or prefetching, to the forward that trains on them.
- ``StagetraceCallback`` (a ``transformers.TrainerCallback``; transformers is imported only
  when the name is first used) opens the stage on train begin (entry actions, seed, batch size,
  ``clip_grad_norm = args.max_grad_norm``) and attaches the Trainer's optimizer (the Recorder
  reads each step's learning rates with a pre-step hook), logs the batch's indices before every
  optimizer step, and closes the stage on train end: the Recorder then replays the first steps
  and records ``verified: false`` (a warning, and ``callback.verification``) if they differ.

Settings the replay cannot reproduce are refused when training begins, naming the setting:
gradient accumulation, fp16/bf16 autocast, label smoothing, several processes, resuming from a
checkpoint, ``load_best_model_at_end`` (the end would not be the trained end), adapters added
by the stage's entry (the Trainer's optimizer is built before the stage opens), and optimizers
the record does not know (``optim="adamw_torch_fused"``, the default with torch >= 2.8: use
``optim="adamw_torch"``, or SGD through ``Trainer(optimizers=(...))``). With
``batch_order=False`` the first four are allowed and the stage is recorded without batch order:
learning rates, optimizer state and checkpoints only (E0 and E1 can audit it, nothing replays
it). A model with dropout draws random numbers the replay does not reproduce: its check fails
and the stage is recorded unverified.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from attribution.record.errors import StagetraceError
from attribution.record.optim import group_hyperparameters, optimizer_kind
from attribution.record.recorder import Recorder, StageRecording
from attribution.record.references import Ref, loss_function, trust_target
from attribution.record.spec import EntryAction
from attribution.record.trajectory import Verification


class IndexedDataset(Dataset):
    """``dataset`` (items ``(input, target, ...)``; the replay reads the first two) as the
    Trainer's examples ``{"inputs": input, "labels": target, "index": i}``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        return {"inputs": item[0], "labels": item[1], "index": i}


class TrainerModel(nn.Module):
    """The model a Trainer trains in place of ``inner``: the loss is the replay's own
    ``loss(inner(inputs), labels)`` (a name of ``references.LOSSES`` or ``module:function``,
    mean-reduced); state dicts are ``inner``'s (checkpoints hold its parameter names); while a
    callback records, the ``index`` of every training batch is kept until it takes them."""

    def __init__(self, inner: nn.Module, loss: str = "cross_entropy") -> None:
        super().__init__()
        if ":" in loss:
            trust_target(loss)
        self.inner = inner
        self.loss = loss
        self._loss_fn = loss_function(loss)
        self._indices: list[torch.Tensor] | None = None  # None: no callback is recording

    def forward(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{"logits": inner(inputs), "loss": loss(logits, labels)}`` (no loss without labels)."""
        logits = self.inner(inputs)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = self._loss_fn(logits, labels)
        if self.training and index is not None and self._indices is not None:
            self._indices.append(index.detach().to("cpu", torch.int64).clone())
        return out

    def take_indices(self, keep: bool = True) -> list[torch.Tensor]:
        """The indices of the training batches seen since the last call (one per forward);
        ``keep``: go on collecting them (False: stop)."""
        taken, self._indices = self._indices or [], [] if keep else None
        return taken

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """``inner``'s state dict: what the Trainer saves, under the model's own names."""
        return self.inner.state_dict(*args, **kwargs)

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load into ``inner`` (a checkpoint the Trainer saved, or the model's own)."""
        return self.inner.load_state_dict(state_dict, strict=strict, assign=assign)


class TrainerStage:
    """The logic of ``StagetraceCallback`` (which adds ``transformers.TrainerCallback``'s no-op
    events): one Trainer run recorded as stage ``name`` of ``recorder``. ``seed`` defaults to
    the Trainer's ``args.seed``; the other arguments are ``Recorder.stage``'s."""

    def __init__(
        self,
        recorder: Recorder,
        name: str,
        *,
        kind: str,
        data: Ref,
        seed: int | None = None,
        entry: Sequence[Mapping[str, Any]] = (),
        optimizer_policy: str = "reset",
        batch_order: bool = True,
    ) -> None:
        self.recorder, self.name, self.kind, self.data = recorder, name, kind, data
        self.seed, self.entry, self.policy = seed, tuple(entry), optimizer_policy
        self.batch_order = batch_order
        self.verification: Verification | None = None
        self._stage: StageRecording | None = None
        self._model: TrainerModel | None = None

    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        optimizer: Any = None,
        **_: Any,
    ) -> None:
        """Check the Trainer's settings, open the stage and attach the optimizer."""
        # accelerate wraps the optimizer; the record follows (and hooks) the torch one inside
        inner = getattr(optimizer, "optimizer", None)
        optimizer = inner if isinstance(inner, torch.optim.Optimizer) else optimizer
        self._check(args, state, model, optimizer)
        clip = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
        stage = self.recorder.stage(
            self.name,
            kind=self.kind,
            data=self.data,
            seed=args.seed if self.seed is None else self.seed,
            loss=model.loss,
            batch_size=args.per_device_train_batch_size,
            entry=self.entry,
            optimizer_policy=self.policy,
            log_batches=self.batch_order,
            clip_grad_norm=clip,
        )
        stage.__enter__()
        try:
            stage.attach(optimizer)
        except StagetraceError as exc:
            stage.__exit__(type(exc), exc, exc.__traceback__)
            raise
        model.take_indices()
        self._stage, self._model = stage, model

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        """Log the indices of the batch the coming optimizer step trains on."""
        stage, taken = self._open(), self._model.take_indices()
        if not self.batch_order:
            return
        if len(taken) != 1:
            problem = (
                "the batch carried no example indices"
                if not taken
                else f"{len(taken)} batches were trained on before one optimizer step"
            )
            exc = StagetraceError(
                f"stage {self.name!r} step {state.global_step}: {problem}. Fix: train on "
                "IndexedDataset(dataset) with gradient_accumulation_steps=1"
            )
            stage.__exit__(type(exc), exc, None)
            self._stage = None
            self._model.take_indices(keep=False)
            raise exc
        stage.log_batch(taken[0])

    def on_train_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        """Close the stage: the Recorder checks that its first steps replay exactly."""
        self._open().__exit__(None, None, None)
        self._stage = None
        self._model.take_indices(keep=False)
        record = self.recorder.trajectory.stages[-1]
        self.verification = record.verification
        if record.verified is False:
            check = record.verification
            why = check.problem or f"step {check.step} differs by up to {check.difference:.3g}"
            warnings.warn(
                f"stagetrace: stage {self.name!r} recorded from the Trainer does not replay "
                f"exactly ({why}); it is recorded verified: false and will not be replayed or "
                "retrained. Fix: train without dropout or a custom compute_loss, with the "
                "settings docs/trajectory.md lists",
                stacklevel=2,
            )

    def _open(self) -> StageRecording:
        if self._stage is None:
            raise StagetraceError(
                f"stage {self.name!r}: the callback saw no train begin. Fix: give it to the "
                "Trainer (callbacks=[...]) before trainer.train(), one callback per train()"
            )
        return self._stage

    def _check(self, args: Any, state: Any, model: Any, optimizer: Any) -> None:
        """Refuse, before anything changes, a Trainer run the record cannot hold."""
        where = f"stage {self.name!r}"
        if self._stage is not None or any(
            s.name == self.name for s in self.recorder.trajectory.stages
        ):
            raise StagetraceError(
                f"{where} is already recorded. Fix: give each trainer.train() its own callback "
                "and stage name"
            )
        if not isinstance(model, TrainerModel) or model.inner is not self.recorder.model:
            raise StagetraceError(
                f"{where}: the Trainer's model is not TrainerModel(model) around the model the "
                "Recorder follows. Fix: Trainer(model=TrainerModel(model), ...) with the model "
                "given to Recorder"
            )
        try:
            kind = optimizer_kind(optimizer)
            for group in optimizer.param_groups:
                group_hyperparameters(kind, group)
        except ValueError as exc:
            raise StagetraceError(
                f"{where}: {exc}. Fix: train with optim='adamw_torch' (not the fused default), "
                "or pass Trainer(optimizers=(torch.optim.SGD(...), scheduler))"
            ) from exc
        own = {id(p) for p in model.inner.parameters()}
        if any(id(p) not in own for g in optimizer.param_groups for p in g["params"]):
            raise StagetraceError(
                f"{where}: the Trainer's optimizer holds tensors that are not parameters of the "
                "recorded model. Fix: build it from the model given to the Recorder"
            )
        fixed = []
        if state.global_step != 0:
            fixed.append(f"resumes at step {state.global_step}")
        if args.load_best_model_at_end:
            fixed.append("sets load_best_model_at_end")
        if args.world_size > 1 or args.n_gpu > 1:
            fixed.append("trains in several processes or devices")
        if any(EntryAction.from_dict(a, where, 0).kind == "add_lora" for a in self.entry):
            fixed.append("adds adapters on entry (its optimizer already exists then)")
        if fixed:
            raise StagetraceError(
                f"{where}: the Trainer run {'; '.join(fixed)}, which a recorded stage cannot "
                "hold. Fix: record the whole run from step 0 in one process, with the adapters "
                "added before the Trainer is built and load_best_model_at_end=False"
            )
        replay = []
        if args.gradient_accumulation_steps != 1:
            replay.append(f"gradient_accumulation_steps={args.gradient_accumulation_steps}")
        if args.fp16 or args.bf16:
            replay.append("fp16/bf16 autocast")
        if args.label_smoothing_factor:
            replay.append(f"label_smoothing_factor={args.label_smoothing_factor}")
        if replay and self.batch_order:
            raise StagetraceError(
                f"{where}: the Trainer uses {', '.join(replay)}, which replays do not "
                "reproduce. Fix: turn it off, or pass batch_order=False to record the stage "
                "without batch order (learning rates and checkpoints: E0 and E1 only)"
            )


@functools.cache
def _callback_class() -> type:
    """``TrainerStage`` mixed into ``transformers.TrainerCallback`` (imported here only)."""
    try:
        from transformers import TrainerCallback
    except ImportError as exc:
        raise StagetraceError(
            "StagetraceCallback needs the transformers package, which is not installed. "
            "Fix: install transformers (the [hf] extra)"
        ) from exc
    return type(
        "StagetraceCallback",
        (TrainerStage, TrainerCallback),
        {"__module__": __name__, "__doc__": TrainerStage.__doc__},
    )


def __getattr__(name: str) -> Any:
    if name == "StagetraceCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# StagetraceCallback is built on first access (module __getattr__)
__all__ = ["IndexedDataset", "StagetraceCallback", "TrainerModel", "TrainerStage"]  # noqa: F822
