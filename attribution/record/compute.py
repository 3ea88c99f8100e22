"""Where work runs and in what precision: the one owner of devices and dtypes.

A ``Compute`` names a device (``auto``: CUDA when torch sees a GPU, else the CPU; ``cpu``,
``cuda``, ``cuda:N``) and a dtype (``float32``, the default; ``bfloat16``; ``float64``). The
command line and the experiments set it once around a command (``using``); the layers above read
it with ``current()`` instead of threading a parameter through every call.

What each layer does with it:

- training steps (replays, the truth, the estimators that retrain) run on the device; in
  bfloat16 when the dtype is bfloat16 (``Compute.training_dtype``: an approximation of the
  computation the record holds, named as such in results), otherwise in the recorded precision
  (float64 only affects read-outs);
- the recording itself stays on the CPU unless a device is asked explicitly
  (``Compute.recording``);
- results are handed back on the CPU, in the recorded precision, and stored artifacts
  (counterfactuals, embeddings) are always written as CPU tensors of the recorded dtype
  (``to_cpu``), so a cache is independent of the device that computed it. Results computed in
  bfloat16 are different results: they are kept apart (``Compute.cache_suffix``).

On CUDA, training runs with ``torch.use_deterministic_algorithms(True, warn_only=True)``
(``deterministic``): deterministic kernels wherever torch has one, a warning where it has none.
cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` (``:4096:8``) before its first use in the process;
``using`` sets it when unset, so set the compute before anything touches the GPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

from attribution.record.errors import SpecError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
"""The dtypes a compute may name."""

CUBLAS_WORKSPACE = ":4096:8"
"""``CUBLAS_WORKSPACE_CONFIG`` that makes cuBLAS deterministic (PyTorch's reproducibility
notes); set when unset, before CUDA starts."""


AUTO_VARIABLE = "STAGETRACE_AUTO_DEVICE"
"""Set to ``cpu``, ``auto`` means the CPU even where torch sees a GPU: a machine's default kept
on the CPU, where replays are bitwise (the test suite sets it: its bit-for-bit checks are the
CPU's; its CUDA tests name ``cuda``)."""


@dataclass(frozen=True)
class Compute:
    """A device (``auto``, ``cpu``, ``cuda``, ``cuda:N``) and a dtype (``float32``,
    ``bfloat16``, ``float64``). Nothing is checked until ``check()`` (``using`` calls it)."""

    device: str = "auto"
    dtype: str = "float32"

    @property
    def torch_device(self) -> torch.device:
        """The device work runs on: ``auto`` is ``cuda`` when torch sees a GPU, else ``cpu``
        (``cpu`` always where ``STAGETRACE_AUTO_DEVICE=cpu``)."""
        if self.device == "auto":
            pinned = os.environ.get(AUTO_VARIABLE)
            if pinned is not None and pinned != "cpu":
                raise SpecError(
                    AUTO_VARIABLE,
                    f"{pinned!r} is not a value it takes",
                    "set it to cpu or unset it",
                )
            gpu = torch.cuda.is_available() and pinned is None
            return torch.device("cuda" if gpu else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype as a torch dtype (what read-outs compute in)."""
        return DTYPES[self.dtype]

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    @property
    def training_dtype(self) -> torch.dtype | None:
        """The dtype training steps (replay, the truth) run in: bfloat16 when asked, else None:
        the recorded precision, since anything else would not be the recorded computation."""
        return torch.bfloat16 if self.dtype == "bfloat16" else None

    @property
    def cache_suffix(self) -> str:
        """Appended to the cache folder of a result that training computed: ``""`` in the
        recorded precision, ``"-bfloat16"`` for a bfloat16 one (a different, approximate
        result, never mistaken for the exact one)."""
        return "" if self.training_dtype is None else f"-{self.dtype}"

    def recording(self) -> Compute:
        """Where a recording runs: the CPU unless a device was asked explicitly (``auto``
        records on the CPU, where a replay is bit for bit), always in the model's own
        precision."""
        return Compute("cpu" if self.device == "auto" else self.device, "float32")

    def per_process(self) -> Compute:
        """Under torchrun (``LOCAL_RANK`` set) a CUDA compute becomes ``cuda:LOCAL_RANK``, each
        process on its own GPU; otherwise this compute."""
        rank = os.environ.get("LOCAL_RANK")
        if rank is None or not self.is_cuda:
            return self
        return Compute(f"cuda:{int(rank)}", self.dtype)

    def check(self, device_field: str = "device", dtype_field: str = "dtype") -> Compute:
        """Refuse an unknown dtype or device, or a CUDA device torch cannot reach, with the
        fix (``SpecError``, exit 2 from the command line); return this compute."""
        if self.dtype not in DTYPES:
            raise SpecError(
                dtype_field, f"{self.dtype!r} is not a dtype", f"use one of {', '.join(DTYPES)}"
            )
        known = "auto, cpu, cuda or cuda:N"
        try:
            device = self.torch_device
        except (RuntimeError, ValueError) as exc:
            raise SpecError(
                device_field, f"{self.device!r} is not a device", f"use {known}"
            ) from exc
        if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
            raise SpecError(device_field, f"{self.device!r} is not supported", f"use {known}")
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise SpecError(
                    device_field,
                    f"{self.device!r} asked, but torch sees no CUDA GPU here "
                    f"(torch {torch.__version__})",
                    f"ask for {device_field}=cpu, or {device_field}=auto (a GPU only where "
                    "there is one)",
                )
            count = torch.cuda.device_count()
            if device.index is not None and device.index >= count:
                raise SpecError(
                    device_field,
                    f"{self.device!r} asked, but torch sees {count} GPU(s)",
                    f"use cuda:0 to cuda:{count - 1}",
                )
        return self

    def to_json(self) -> dict[str, Any]:
        """What was asked and what it resolved to, for result files; ``approximate`` says
        that retraining (the truth) and replays ran in bfloat16, approximating the recorded
        computation."""
        return {
            "device": self.device,
            "resolved_device": str(self.torch_device),
            "dtype": self.dtype,
            "approximate": self.training_dtype is not None,
        }


# a Compute is frozen, so sharing the default is safe
_CURRENT: ContextVar[Compute] = ContextVar("stagetrace_compute", default=Compute())  # noqa: B039


def current() -> Compute:
    """The compute set by the innermost ``using`` (default ``Compute()``: auto, float32)."""
    return _CURRENT.get()


@contextmanager
def using(compute: Compute) -> Iterator[Compute]:
    """Run the body with ``compute`` as ``current()``, after checking it (nothing runs when it
    is refused). On CUDA, ``CUBLAS_WORKSPACE_CONFIG`` is set first when unset, so that cuBLAS,
    started later, is deterministic."""
    compute.check()
    if compute.is_cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    token = _CURRENT.set(compute)
    try:
        yield compute
    finally:
        _CURRENT.reset(token)


@contextmanager
def deterministic(compute: Compute) -> Iterator[None]:
    """On CUDA, run the body with deterministic algorithms where torch has them
    (``use_deterministic_algorithms(True, warn_only=True)``: a warning, not an error, for an
    operation without one), cuDNN's autotuner off and TF32 off (float32 products and
    convolutions in float32, not in TF32's 10-bit mantissa), restoring the caller's settings
    afterwards; on the CPU nothing changes (the recorded flag applies,
    ``pipeline.recorded_threads``). If cuBLAS started before ``CUBLAS_WORKSPACE_CONFIG`` was
    set, its products may still vary in the last bits: the replay's tolerance covers that."""
    if not compute.is_cuda:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn.benchmark,
        cudnn.allow_tf32,
        matmul.allow_tf32,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = False, False, False
    try:
        yield
    finally:
        enabled, warn_only, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def on_device(
    tensors: Mapping[str, torch.Tensor], compute: Compute | None = None, cast: bool = True
) -> dict[str, torch.Tensor]:
    """``tensors`` on the compute's device (default ``current()``); with ``cast``, floating
    tensors also in its dtype (integer ones keep theirs). Tensors already there are not
    copied."""
    compute = current() if compute is None else compute
    device, dtype = compute.torch_device, compute.torch_dtype
    return {
        name: t.to(device, dtype) if cast and t.is_floating_point() else t.to(device)
        for name, t in tensors.items()
    }


def to_cpu(
    tensors: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype] | None = None
) -> dict[str, torch.Tensor]:
    """``tensors`` on the CPU for storage or comparison, floating ones in ``dtypes[name]``
    where given (the recorded dtype), else float32 where they are in a lower precision.
    CPU tensors already in their dtype are returned as they are (not copied)."""
    out = {}
    for name, t in tensors.items():
        if t.is_floating_point():
            dtype = (dtypes or {}).get(name, torch.float32 if t.element_size() < 4 else t.dtype)
            out[name] = t.to("cpu", dtype)
        else:
            out[name] = t.to("cpu")
    return out
