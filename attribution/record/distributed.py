"""The process group of a run launched by ``torchrun``, and the few collectives stagetrace uses.

Work that is independent (one retraining per skipped stage, the read-out of one batch of test
examples) is shared out among the ranks of PyTorch's own process group, started from torchrun's
environment (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``, ...): gloo on the CPU, NCCL for CUDA
devices. Without an initialised group every function acts as one process (rank 0 of 1), so
single-process use needs nothing.

A rank that fails must not leave the others waiting in a collective it never joins:
``agreed(work)`` runs local work and then tells every rank whether it failed anywhere, so all
raise the same error (the first failing rank's) and exit together. Every stretch of local work
that can fail is wrapped in it before the next collective. docs/scale.md describes the rest.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

from attribution.record.errors import StagetraceError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's ``rank`` among ``size`` processes (0 of 1 without a process group)."""

    rank: int
    size: int


def world() -> World:
    """The default process group's rank and size, or rank 0 of 1 when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World(0, 1)


def init_from_env(device: torch.device | str = "cpu") -> bool:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` and
    ``RANK`` set): NCCL when ``device`` is a CUDA device and CUDA is available (each process on
    the GPU of its ``LOCAL_RANK``), else gloo. Whether it started one: not without those
    variables, nor when a group is already initialised. A group this starts lasts until the
    process exits (``python -m attribution.analysis.cli`` ends it with ``leave``; otherwise
    ``destroy`` runs at exit): a second group in the same process would rendezvous under the
    first one's store keys and can hang, so later commands reuse it."""
    launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    if not launched or not dist.is_available() or dist.is_initialized():
        return False
    cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    atexit.register(destroy)
    return True


def destroy() -> None:
    """Leave the process group (if one is initialised)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave(code: int) -> NoReturn:
    """End a process that torchrun started, once its work is done: wait for every rank (when
    in a group), flush the output and exit with ``code`` at once, without the interpreter's
    teardown. In that
    teardown gloo's worker threads can be destroyed after the interpreter and abort the process
    now and then ("terminate called without an active exception", SIGABRT) although its work
    is done; by the barrier every collective is, and every result is written."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_main() -> bool:
    """Whether this is rank 0: the one process that writes results and prints."""
    return world().rank == 0


def shard(items: Sequence[T], at: World | None = None) -> list[T]:
    """This rank's share of ``items``, round-robin: items r, r + size, r + 2 size, ...; the
    same on every run, so the owner of item i is rank ``i % size``."""
    at = at or world()
    return list(items)[at.rank :: at.size]


def rows(n: int, batch_size: int, at: World | None = None) -> slice:
    """This rank's contiguous share of ``n`` examples, in whole batches of ``batch_size`` (the
    batches one process would run, so every example is evaluated in the same batch); ranks
    in order cover 0..n."""
    at = at or world()
    batches = -(-n // batch_size)
    first, last = at.rank * batches // at.size, (at.rank + 1) * batches // at.size
    return slice(min(first * batch_size, n), min(last * batch_size, n))


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    at = world()
    if at.size == 1:
        return [obj]
    out: list[Any] = [None] * at.size
    dist.all_gather_object(out, obj)
    return out


def agreed(work: Callable[[], T]) -> T:
    """``work()``, then agree on whether it failed on any rank. If it did, every rank raises
    the first failing rank's error: that rank its own exception, the others a
    ``StagetraceError`` with the same message (or a ``RuntimeError`` naming the rank for a
    failure that is not bad input), so no rank waits for a collective the others never join."""
    if world().size == 1:
        return work()
    try:
        result, failure = work(), None
    except Exception as exc:
        result, failure = None, exc
    mine = None
    if isinstance(failure, StagetraceError):
        mine = (True, str(failure))
    elif failure is not None:
        mine = (False, f"{type(failure).__name__}: {failure}")
    reports = all_gather(mine)
    for rank, report in enumerate(reports):
        if report is None:
            continue
        if rank == world().rank and failure is not None:
            raise failure
        user_error, message = report
        if user_error:
            raise StagetraceError(message)
        raise RuntimeError(f"rank {rank} failed: {message}")
    return result  # type: ignore[return-value]


def broadcast_state(state: Mapping[str, torch.Tensor] | None, src: int) -> dict[str, torch.Tensor]:
    """Rank ``src``'s ``state`` (names -> tensors; the others pass None) on every rank, bit for
    bit: names, shapes and dtypes as one object, then all the bytes as one tensor (on the
    group's device: the GPU for NCCL). Received tensors are CPU tensors."""
    at = world()
    mine = dict(state or {}) if at.rank == src else {}
    if at.size == 1:
        return mine
    sizes = [(n, tuple(t.shape), t.dtype, t.numel() * t.element_size()) for n, t in mine.items()]
    header = [sizes]
    dist.broadcast_object_list(header, src)
    device = torch.device("cuda", torch.cuda.current_device()) if _nccl() else torch.device("cpu")
    if at.rank == src:
        parts = [t.detach().cpu().contiguous().reshape(-1).view(torch.uint8) for t in mine.values()]
        flat = torch.cat([torch.empty(0, dtype=torch.uint8), *parts]).to(device)
    else:
        flat = torch.empty(sum(size for *_, size in header[0]), dtype=torch.uint8, device=device)
    if flat.numel():
        dist.broadcast(flat, src)
    if at.rank == src:
        return mine
    flat, out, start = flat.cpu(), {}, 0
    for name, shape, dtype, size in header[0]:
        out[name] = flat[start : start + size].clone().view(dtype).reshape(shape)
        start += size
    return out


def _nccl() -> bool:
    return dist.get_backend() == "nccl"
