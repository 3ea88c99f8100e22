"""The one evaluator of a model on data: a model as a function at a checkpoint, its per-example
quantities (differentiable in its parameters and floating-point buffers), one batched runner
(results memory-mapped beyond ``MEMMAP_ABOVE`` numbers), and, for the read-outs and the
baselines, the directional derivatives (forward-mode jvps) and values of K stages at once, in
one pass vectorised over the stages.

A model is always evaluated in eval mode with the buffers of the checkpoint it stands for
(BatchNorm running statistics, ...): dropout is off and normalisation uses the recorded
statistics, so the same checkpoint gives the same numbers every time.

Evaluations and read-outs run where ``attribution.record.compute.current()`` says
(``ModelAt.placed``): on its device, and in its dtype unless that is ``float32``, the default,
which evaluates in the model's own precision. Under ``bfloat16`` the forward pass and its jvp run
in bfloat16 (parameters, tangents and floating inputs cast; the quantity itself is taken from
the logits in float32, as autocast does); under ``float64`` in float64. Results always come back
as float64 CPU tensors. A ``ModelAt`` itself holds its checkpoint as given (the CPU, recorded
precision): placing is done per evaluation.

Units: ``loss`` is cross-entropy in nats; ``margin`` is the true-class logit minus the largest
other logit, in logit units; ``correct`` is 1.0 where the largest logit is the true class's, else
0.0 (not differentiable; for accuracies).
"""

from __future__ import annotations

import inspect
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap
from torch.overrides import TorchFunctionMode

from attribution.record.compute import Compute, current, on_device
from attribution.record.contraction import NotContractible, contracted_along
from attribution.record.errors import SpecError, StagetraceError
from attribution.record.trajectory import Trajectory, load_state

QUANTITIES = ("loss", "margin")
"""The differentiable per-example quantities a behaviour can be made of."""
MEASURES = (*QUANTITIES, "correct")


@dataclass(frozen=True, eq=False)
class ModelAt:
    """A model as a function at one checkpoint: ``module`` (held in eval mode) run with the
    checkpoint's ``params`` and ``buffers``. ``point`` (parameters and floating-point buffers) is
    what stage embeddings offset and what jvps and gradients differentiate."""

    module: nn.Module
    params: Mapping[str, Tensor]
    buffers: Mapping[str, Tensor]

    @classmethod
    def of(cls, module: nn.Module, state: Mapping[str, Tensor]) -> ModelAt:
        """``module`` (set to eval mode; it is taken over) at the full state dict ``state``
        (parameters and buffers, e.g. a checkpoint); a state that does not fit is refused."""
        load_state(module, state, "the state to evaluate")  # checks names and shapes
        module.eval()
        params = {n: state[n].detach() for n, _ in module.named_parameters()}
        # a non-persistent buffer (e.g. transformers' position_ids) is no part of a state dict
        buffers = {n: state.get(n, b).detach() for n, b in module.named_buffers()}
        return cls(module, params, buffers)

    def at(self, state: Mapping[str, Tensor]) -> ModelAt:
        """The same function at another full state (e.g. a counterfactual's ``state``)."""
        return ModelAt.of(self.module, state)

    @property
    def point(self) -> dict[str, Tensor]:
        """Parameters and floating-point buffers: the coordinates offsets and tangents address."""
        floating = {n: b for n, b in self.buffers.items() if b.is_floating_point()}
        return {**self.params, **floating}

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values()), torch.zeros(0)).device

    def placed(self, compute: Compute | None = None) -> ModelAt:
        """This model where evaluations run (``compute``, default ``current()``): its parameters
        and buffers on the compute's device, floating ones in ``evaluation_dtype(compute)``
        (the model's own precision under float32). Tensors already there are not copied, so on
        the CPU in float32 this is the same model."""
        compute = current() if compute is None else compute
        cast = evaluation_dtype(compute) is not None
        return ModelAt(
            self.module,
            on_device(self.params, compute, cast=cast),
            on_device(self.buffers, compute, cast=cast),
        )

    def moved(self, offsets: Mapping[str, Tensor]) -> ModelAt:
        """The model at ``point + offsets`` (names of ``point``; others stay): added in float64
        and stored in each tensor's dtype, so the offset of two checkpoints lands exactly."""
        unknown = sorted(set(offsets) - set(self.point))
        if unknown:
            raise StagetraceError(
                f"offsets for {unknown[:5]}, which are not parameters or floating-point buffers "
                "of the model. Fix: key offsets by the model's parameter and buffer names"
            )

        def add(values: Mapping[str, Tensor]) -> dict[str, Tensor]:
            return {
                n: (v.double() + offsets[n].to(v.device, torch.float64)).to(v.dtype)
                if n in offsets
                else v
                for n, v in values.items()
            }

        return ModelAt(self.module, add(self.params), add(self.buffers))

    def logits(self, inputs: Tensor, point: Mapping[str, Tensor] | None = None) -> Tensor:
        """The model's outputs on ``inputs``, run with ``point`` (any subset of ``point``'s
        names) in place of the checkpoint's own values."""
        state = {**self.buffers, **self.params, **(point or {})}
        return functional_call(self.module, state, (inputs,))

    def values(
        self, inputs: Tensor, targets: Tensor, measure: str, batch_size: int = 512
    ) -> Tensor:
        """The per-example ``measure`` [N] float64 on the CPU, without gradients, in batches,
        run on the current compute (``placed``)."""
        placed = self.placed()
        with torch.no_grad():
            return batched(
                partial(per_example, placed, {}, quantity=measure),
                inputs,
                targets,
                batch_size,
                placed.device,
                dtype=evaluation_dtype(),
            )


def evaluation_dtype(compute: Compute | None = None) -> torch.dtype | None:
    """The dtype evaluations and read-outs run in under ``compute`` (default ``current()``):
    None, the model's own precision, under float32 (the default); otherwise the compute's
    dtype (bfloat16: cheaper and approximate; float64: more precise)."""
    compute = current() if compute is None else compute
    return None if compute.dtype == "float32" else compute.torch_dtype


def final_model(traj: Trajectory) -> ModelAt:
    """The final model: the last stage's structure at its ``end`` checkpoint."""
    last = len(traj.stages) - 1
    return ModelAt.of(traj.build_model(last), traj.checkpoint(last, "end"))


def per_example(
    model: ModelAt, point: Mapping[str, Tensor], inputs: Tensor, targets: Tensor, quantity: str
) -> Tensor:
    """The per-example ``quantity`` [N] of ``model`` run with ``point`` in place of its own
    parameters and floating buffers (any subset; ``{}`` for the checkpoint itself).

    ``loss``: cross-entropy in nats; ``margin``: true-class logit minus the largest other logit;
    ``correct``: 1.0 or 0.0. Differentiable in ``point`` (works under ``torch.func``) for the
    first two. Logits of a lower precision than float32 (a bfloat16 model) are taken to float32
    first, as autocast does for the loss.
    """
    if quantity not in MEASURES:
        raise SpecError("quantity", f"unknown quantity {quantity!r}", f"use one of {QUANTITIES}")
    logits = model.logits(inputs, point)
    if logits.is_floating_point() and logits.element_size() < 4:
        logits = logits.float()
    if quantity == "loss":
        return F.cross_entropy(logits, targets, reduction="none")
    if quantity == "correct":
        return (logits.argmax(-1) == targets).to(logits.dtype)
    true = logits.gather(-1, targets[:, None]).squeeze(-1)
    others = logits.masked_fill(F.one_hot(targets, logits.shape[-1]).bool(), float("-inf"))
    return true - others.amax(-1)


def directional(
    model: ModelAt,
    tangent: Mapping[str, Tensor],
    inputs: Tensor,
    targets: Tensor,
    quantity: str,
    batch_size: int = 512,
) -> Tensor:
    """<grad f_i(point), tangent> for every example's ``quantity`` f_i: one forward-mode jvp per
    batch, [N] float64 on the CPU, run on the current compute (``ModelAt.placed``). ``tangent``
    covers any subset of ``model.point`` (the rest is held fixed) and is cast to each
    coordinate's dtype and device. Floating buffers are differentiated too: eval-mode BatchNorm
    is then run as its explicit formula, since torch's kernel refuses a derivative along running
    statistics. Several tangents at once: ``derivatives_along`` (which contracts them in
    reverse mode; this is the plain jvp)."""
    placed = model.placed()
    along = derivatives_along(placed, [tangent], quantity, contract=False)
    return batched(
        along, inputs, targets, batch_size, placed.device, rows=1, dtype=evaluation_dtype()
    )[0]


def derivatives_along(
    model: ModelAt, tangents: Sequence[Mapping[str, Tensor]], quantity: str, contract: bool = True
) -> Callable[[Tensor, Tensor], Tensor]:
    """The batch function ``(x, y) -> [K, b]`` of the directional derivatives
    <grad f_i(point), tangents[k]> of the per-example ``quantity`` (for ``batched``).

    With ``contract`` (the default) they are computed in reverse mode, contracted where the
    parameters are used (``attribution.record.contraction``: one forward, one backward and
    about one forward per tangent), after agreeing with per-example gradients
    (``gradients_along``) on the first batch's first ``CHECKED_EXAMPLES`` examples; the jvp
    below serves where they do not agree, where the
    model is not contractible, along buffers, and in an evaluation dtype other than the
    model's own. Otherwise all K tangents go through ONE jvp, vectorised over the tangents
    (``torch.func.vmap``): the primal forward pass runs once and the K tangent passes as one
    batched pass, instead of K jvps that each redo the primal. Tangents are as
    ``directional``'s (any subset of ``model.point``; the vmapped pass covers the union of
    their names, zero where one lacks a name). Falls back to one jvp per tangent where vmap
    cannot run the model (an operation without a batching rule, such as an
    ``autograd.Function`` without a vmap rule, or too little memory for K tangents'
    activations): the same numbers at the per-stage cost. The model is placed on the current
    compute first (``ModelAt.placed``); inputs go there too (``batched`` with
    ``evaluation_dtype()``)."""
    model = model.placed()
    point = model.point
    for tangent in tangents:
        unknown = sorted(set(tangent) - set(point))
        if unknown:
            raise StagetraceError(
                f"tangent for {unknown[:5]}, which are not parameters or floating-point buffers "
                "of the model. Fix: key the direction by the model's parameter and buffer names"
            )
    names = [n for n in point if any(n in t for t in tangents)]
    stacked = {
        n: torch.stack(
            [t[n].to(point[n]) if n in t else torch.zeros_like(point[n]) for t in tangents]
        )
        for n in names
    }
    directions = [{n: stacked[n][k] for n in t} for k, t in enumerate(tangents)]  # views
    along_buffers = bool(set(names) - set(model.params))

    def one(direction: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        if not direction:
            return torch.zeros(len(y), dtype=torch.float64, device=y.device)
        primal = {n: point[n] for n in direction}
        f = partial(per_example, model, inputs=x, targets=y, quantity=quantity)
        return jvp(f, (primal,), (dict(direction),))[1]

    def all_at_once(x: Tensor, y: Tensor) -> Tensor:
        return vmap(one, in_dims=(0, None, None))(stacked, x, y)

    def one_by_one(x: Tensor, y: Tensor) -> Tensor:
        return torch.stack([one(d, x, y).to(torch.float64) for d in directions])

    def jvps(x: Tensor, y: Tensor) -> Tensor:
        if along_buffers:
            with _RunningStatisticsAsFormula():
                return vectorised(x, y)
        return vectorised(x, y)

    vectorised = _with_fallback(all_at_once, one_by_one, len(tangents) > 1 and bool(names))
    if not contract or along_buffers or not names or evaluation_dtype() is not None:
        return jvps

    def module_call(values: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return per_example(model, values, x, y, quantity)

    def gradients(x: Tensor, y: Tensor) -> Tensor:
        return gradients_along(module_call, point, stacked, x, y)

    return _checked_once(contracted_along(module_call, point, stacked), gradients, jvps)


CHECKED_EXAMPLES = 4
"""How many examples of the first batch the contracted read-out is checked on."""


def gradients_along(
    module_call: Callable[[Mapping[str, Tensor], Tensor, Tensor], Tensor],
    point: Mapping[str, Tensor],
    stacked: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
) -> Tensor:
    """[K, b]: <grad f_i, t_k> from each example's own gradient (one backward pass per example,
    alone in its batch), the tangents ``stacked[name]`` [K, *shape]: the reference the
    contraction is checked against, exact and independent of forward-mode support. An
    embedding's ``padding_idx`` and ``scale_grad_by_freq`` are training conventions that change
    only its backward pass; they are off here, so this is the function's own derivative, as
    the read-outs take it."""
    first = next(iter(stacked.values()))
    out = torch.zeros(len(first), len(y), dtype=torch.float64, device=first.device)
    with torch.enable_grad(), _PlainEmbeddingGradients():
        for i in range(len(y)):
            values = {n: point[n].detach().requires_grad_(True) for n in stacked}
            f = module_call(values, x[i : i + 1], y[i : i + 1]).sum()
            grads = torch.autograd.grad(f, list(values.values()), allow_unused=True)
            for name, g in zip(stacked, grads, strict=True):
                if g is not None:
                    out[:, i] += (stacked[name] * g).flatten(1).sum(1).double()
    return out


def _checked_once(
    contracted: Callable[[Tensor, Tensor], Tensor],
    reference: Callable[[Tensor, Tensor], Tensor],
    jvps: Callable[[Tensor, Tensor], Tensor],
) -> Callable[[Tensor, Tensor], Tensor]:
    """``contracted`` once it agreed with ``reference`` (per-example gradients) on the first
    batch's first ``CHECKED_EXAMPLES`` examples (within float32 rounding: 1e-3 of the largest
    derivative); ``jvps`` from then on where it did not, or where the model is not
    contractible. The three compute the same derivatives; the check guards against a model the
    contraction misreads (an operation mixing examples, say)."""
    state: list[bool | None] = [None]

    def run(x: Tensor, y: Tensor) -> Tensor:
        if state[0] is False:
            return jvps(x, y)
        try:
            out = contracted(x, y)
        except (NotContractible, RuntimeError):  # the jvp raises it again if the model is at fault
            state[0] = False
            return jvps(x, y)
        if state[0] is None:
            m = min(CHECKED_EXAMPLES, len(y))
            expected = reference(x[:m], y[:m]).to(out)
            scale = float(expected.abs().max()) if expected.numel() else 0.0
            state[0] = bool((out[:, :m] - expected).abs().max() <= 1e-3 * scale + 1e-12)
            if not state[0]:
                return jvps(x, y)
        return out

    return run


def values_along(
    model: ModelAt, offsets: Sequence[Mapping[str, Tensor]], measure: str
) -> Callable[[Tensor, Tensor], Tensor]:
    """The batch function ``(x, y) -> [K, b]`` of the per-example ``measure`` of the model at
    ``point + offsets[k]`` for every k (``{}``: the checkpoint itself), for ``batched``.

    One forward pass per set, so K + 1 passes for K stages and theta_T. Unlike the linear
    read-out's tangents, the sets are not vectorised with ``torch.func.vmap``: measured in
    ``make bench``, K plain passes were faster than one vmapped pass on both the MLP and the
    text transformer (vmap has no batching rule for CPU attention and runs it example by
    example), so the floor is (K + 1) / K inference passes per stage (``docs/scale.md``).
    Dropout is off and BatchNorm uses each set's running statistics (eval mode). The sets are
    formed as ``moved`` forms them (added in float64, stored in the tensor's dtype), in the
    model's own precision where it is, and then placed on the current compute
    (``ModelAt.placed``): a bfloat16 set is that set rounded to bfloat16, not a bfloat16 theta
    plus the offset. Inputs go there too (``batched`` with ``evaluation_dtype()``)."""
    placed = model.placed()
    point = model.point
    names = [n for n in point if any(n in o for o in offsets)]
    moved = [model.moved(offset).point for offset in offsets]
    points = [
        on_device({n: m[n] for n in names}, cast=evaluation_dtype() is not None) for m in moved
    ]
    del moved

    def one_by_one(x: Tensor, y: Tensor) -> Tensor:
        return torch.stack(
            [per_example(placed, p, x, y, measure).to(torch.float64) for p in points]
        )

    return one_by_one


def _with_fallback(
    vectorised: Callable[[Tensor, Tensor], Tensor],
    looped: Callable[[Tensor, Tensor], Tensor],
    vectorise: bool,
) -> Callable[[Tensor, Tensor], Tensor]:
    """``vectorised`` until it fails with a ``RuntimeError`` (vmap cannot run the model, or it
    ran out of memory), from then on ``looped``, which computes the same (and raises the error
    itself if the model is at fault)."""
    works = [vectorise]

    def run(x: Tensor, y: Tensor) -> Tensor:
        if works[0]:
            try:
                return vectorised(x, y)
            except RuntimeError:
                works[0] = False
        return looped(x, y)

    return run


MEMMAP_ABOVE = 10_000_000
"""Per-example results of more float64 numbers than this go to a memory-mapped temporary file
(``numpy.memmap`` in ``tempfile.gettempdir()``, i.e. ``$TMPDIR``) instead of RAM; the
environment variable ``STAGETRACE_MEMMAP_ABOVE`` overrides it (0: always on disk)."""
MEMMAP_VARIABLE = "STAGETRACE_MEMMAP_ABOVE"


def memmap_above() -> int:
    """The number of float64 results beyond which they are memory-mapped: ``MEMMAP_ABOVE``, or
    the environment's ``STAGETRACE_MEMMAP_ABOVE``; a value that is not a whole number >= 0 is
    refused."""
    raw = os.environ.get(MEMMAP_VARIABLE)
    if raw is None:
        return MEMMAP_ABOVE
    if not raw.strip().isdigit():
        raise StagetraceError(
            f"{MEMMAP_VARIABLE}={raw!r} is not a whole number of floats. Fix: set it to the "
            f"number of per-example results to keep in RAM, e.g. {MEMMAP_ABOVE}, or unset it"
        )
    return int(raw)


class Results:
    """Per-example results of ``shape`` (float64, the examples last), written batch by batch
    with ``write`` and handed back by ``tensor``: in RAM, or beyond ``above`` numbers (default
    ``memmap_above()``) in an anonymous temporary file (deleted at once; its space is freed with
    the tensor). The file is written with ``os.pwrite``, through the page cache rather than the
    process's memory, and mapped copy-on-write at the end, so that its pages become resident
    only as they are read: the read-outs' peak memory does not grow with the test set."""

    def __init__(self, shape: tuple[int, ...], above: int | None = None) -> None:
        above = memmap_above() if above is None else above
        self.shape, self.count = shape, math.prod(shape)
        # closed by ``tensor`` (or, after an error, with this object): it spans the batches
        self.file = tempfile.TemporaryFile() if self.count > above else None  # noqa: SIM115
        self.memory = None if self.file else torch.empty(shape, dtype=torch.float64)

    def write(self, start: int, part: Tensor) -> None:
        """Examples ``start ..`` of every row: ``part`` [b] or [rows, b]."""
        part = part.detach().to("cpu", torch.float64)
        if self.memory is not None:
            self.memory[..., start : start + part.shape[-1]] = part
            return
        n = self.shape[-1]
        for row, values in enumerate(part.reshape(-1, part.shape[-1]).numpy()):
            os.pwrite(self.file.fileno(), values.tobytes(), (row * n + start) * 8)

    def tensor(self) -> Tensor:
        if self.memory is not None:
            return self.memory
        with self.file as handle:  # the mapping outlives the handle
            handle.truncate(self.count * 8)
            array = np.memmap(handle, dtype=np.float64, mode="c", shape=self.shape)
        return torch.from_numpy(array)


def batched(
    fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    batch_size: int,
    device: torch.device,
    rows: int | None = None,
    memmap_above: int | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``fn(inputs, targets)``, run on ``device`` over batches of at most ``batch_size``
    examples (memory: one batch's forward pass) and written batch by batch into one float64
    CPU tensor: [N] (``fn`` gives [b]) or, with ``rows``, [rows, N] (``fn`` gives [rows, b]).
    With ``dtype``, floating inputs are cast to it (``evaluation_dtype``); integer inputs (token
    ids) and the targets keep theirs. The result is memory-mapped beyond ``memmap_above``
    numbers (``Results``)."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise StagetraceError(
            f"batch_size {batch_size!r} is not a positive integer. Fix: give the number of "
            "examples per forward pass, e.g. 512"
        )
    n = len(targets)
    out = Results((n,) if rows is None else (rows, n), memmap_above)
    cast = dtype if dtype is not None and inputs.is_floating_point() else inputs.dtype
    for i in range(0, n, batch_size):
        x = inputs[i : i + batch_size].to(device, cast)
        out.write(i, fn(x, targets[i : i + batch_size].to(device)))
    return out.tensor()


class _PlainEmbeddingGradients(TorchFunctionMode):
    """``F.embedding`` without ``padding_idx`` and ``scale_grad_by_freq``: the same outputs,
    and the derivative of the lookup itself (the padding row's and repeated rows' gradients not
    altered by training conventions)."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.embedding:
            bound = _EMBEDDING.bind(*args, **kwargs)
            bound.arguments.update(padding_idx=None, scale_grad_by_freq=False)
            return func(*bound.args, **bound.kwargs)
        return func(*args, **kwargs)


_EMBEDDING = inspect.signature(F.embedding)
_BATCH_NORM = inspect.signature(F.batch_norm)


class _RunningStatisticsAsFormula(TorchFunctionMode):
    """Eval-mode ``F.batch_norm`` as ``(x - mean) / sqrt(var + eps) * weight + bias``, which is
    differentiable along the running statistics (the same function; other calls untouched)."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            bound = _BATCH_NORM.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            if not a["training"] and a["running_mean"] is not None:
                x = a["input"]
                shape = (1, -1) + (1,) * (x.ndim - 2)
                y = (x - a["running_mean"].view(shape)) * torch.rsqrt(
                    a["running_var"].view(shape) + a["eps"]
                )
                if a["weight"] is not None:
                    y = y * a["weight"].view(shape)
                return y if a["bias"] is None else y + a["bias"].view(shape)
        return func(*args, **kwargs)
