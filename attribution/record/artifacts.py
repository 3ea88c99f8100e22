"""Results derived from a trajectory, kept in its cache and reused while the recording is unchanged.

An artifact is a folder holding one safetensors file and ``meta.json`` (written last, so its
presence marks a finished result). The metadata names the schema, the sign convention and the
fingerprint of the recording it came from; a stored artifact from another recording is an error
that says to delete it, never a silent overwrite.

The folder lives in ``Trajectory.cache``: the run directory by default, another directory, or
memory (docs/trajectory.md, section 5.2). ``check_writable`` refuses an unwritable cache before
any work; ``artifact_lock`` lets one process compute a result while others wait for it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attribution.record import SIGN_CONVENTION
from attribution.record.errors import TrajectoryError
from attribution.record.store import DiskStore, FileLock
from attribution.record.trajectory import LOCK, Trajectory

FOLDERS = ("counterfactuals", "embeddings")
"""The cache's top-level folders of derived results."""
CACHE_FIX = (
    "pass --cache-dir DIR to keep derived results in a writable directory DIR, or --no-cache "
    "to keep them in memory (Python: Trajectory.open(run, cache=DIR or False))"
)


@dataclass(frozen=True)
class Artifact:
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def load_artifact(
    traj: Trajectory, folder: str, tensors_file: str, schema: str, version: int
) -> Artifact | None:
    """The artifact stored in ``folder`` of the trajectory's cache, or None if there is none;
    errors if it is stale."""
    cache = traj.cache
    meta_name = f"{folder}/meta.json"
    if not cache.exists(meta_name):
        return None
    meta = cache.get_json(meta_name)
    where, fix = cache.where(meta_name), f"delete {cache.where(folder)} to recompute it"
    if not isinstance(meta, dict) or meta.get("schema") != schema:
        raise TrajectoryError(where, f"is not {schema} metadata", fix)
    if meta.get("schema_version") != version:
        raise TrajectoryError(
            where,
            f"schema_version {meta.get('schema_version')!r} is not supported",
            fix,
            field="schema_version",
        )
    if meta.get("trajectory_fingerprint") != traj.fingerprint():
        raise TrajectoryError(
            where,
            "was computed from a different recording of this run",
            fix,
            field="trajectory_fingerprint",
        )
    for field in ("sha256", "seconds"):
        if field not in meta:
            raise TrajectoryError(where, "is incomplete", fix, field=field)
    return Artifact(meta, cache.get_tensors(f"{folder}/{tensors_file}", meta["sha256"]))


def save_artifact(
    traj: Trajectory,
    folder: str,
    tensors_file: str,
    schema: str,
    version: int,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
) -> Artifact:
    """Store ``tensors`` and then ``meta`` (with schema, sign convention and fingerprint) in
    ``folder`` of the trajectory's cache."""
    cache = traj.cache
    sha = cache.put_tensors(f"{folder}/{tensors_file}", dict(tensors), {"schema": schema})
    full = {
        "schema": schema,
        "schema_version": version,
        "sign_convention": SIGN_CONVENTION,
        "trajectory_fingerprint": traj.fingerprint(),
        **meta,
        "sha256": sha,
    }
    cache.put_json(f"{folder}/meta.json", full)
    return Artifact(full, dict(tensors))


@contextmanager
def artifact_lock(traj: Trajectory, folder: str) -> Iterator[None]:
    """Hold the lock of the result in ``folder`` (the file ``.lock`` in it, deleted on
    release), waiting while another process holds it. Wrap "load again, else compute and save"
    in it so a result is computed once however many processes ask. Memory caches need none."""
    cache = traj.cache
    if not isinstance(cache, DiskStore):
        yield
        return
    path = cache.root / folder / LOCK
    try:
        lock = FileLock.take(path, wait=True)
    except OSError as exc:
        raise TrajectoryError(
            path.parent, f"cannot be written ({exc.strerror or exc})", CACHE_FIX
        ) from exc
    assert lock is not None  # a waiting take always returns the lock
    try:
        yield
    finally:
        lock.release()


def check_writable(traj: Trajectory, *outputs: Path | str) -> None:
    """Refuse, before any computation, a cache location or an output file that cannot be
    written: the trajectory's cache directory (and its existing counterfactuals/ and
    embeddings/ folders; nothing for a memory cache) and the folder of each of ``outputs``.
    A folder that does not exist yet counts as writable when its nearest existing ancestor is.
    The error names the directory; for the cache its fix is CACHE_FIX ("pass --cache-dir DIR
    or --no-cache")."""
    cache = traj.cache
    if isinstance(cache, DiskStore):
        for folder in (cache.root, *(cache.root / f for f in FOLDERS)):
            if folder == cache.root or folder.exists():
                _check_folder(folder, "derived results (counterfactuals, embeddings)", CACHE_FIX)
    for out in outputs:
        fix = "pass --out FILE in a writable directory"
        _check_folder(Path(out).parent, f"the output {Path(out).name}", fix)


def _check_folder(folder: Path, what: str, fix: str) -> None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise TrajectoryError(existing, f"is not a directory, so {what} cannot be written", fix)
    if not os.access(existing, os.W_OK | os.X_OK):
        problem = (
            "is not writable"
            if existing == folder
            else f"cannot be created ({existing} is not writable)"
        )
        raise TrajectoryError(folder, f"{problem}, so {what} cannot be stored there", fix)
