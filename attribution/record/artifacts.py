"""Results derived from a trajectory, stored under it and reused while the recording is unchanged.

An artifact is a folder holding one safetensors file and ``meta.json`` (written last, so its
presence marks a finished result). The metadata names the schema, the sign convention and the
fingerprint of the recording it came from; a stored artifact from another recording is an error
that says to delete it, never a silent overwrite.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from attribution.record import SIGN_CONVENTION
from attribution.record.errors import TrajectoryError
from attribution.record.trajectory import Trajectory


@dataclass(frozen=True)
class Artifact:
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def load_artifact(
    traj: Trajectory, folder: str, tensors_file: str, schema: str, version: int
) -> Artifact | None:
    """The stored artifact in ``folder``, or None if there is none; errors if it is stale."""
    meta_name = f"{folder}/meta.json"
    if not traj.store.exists(meta_name):
        return None
    meta = traj.store.get_json(meta_name)
    where, fix = traj.store.where(meta_name), f"delete {traj.store.where(folder)} to recompute it"
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
    return Artifact(meta, traj.store.get_tensors(f"{folder}/{tensors_file}", meta["sha256"]))


def save_artifact(
    traj: Trajectory,
    folder: str,
    tensors_file: str,
    schema: str,
    version: int,
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
) -> Artifact:
    """Store ``tensors`` and then ``meta`` (with schema, sign convention and fingerprint)."""
    sha = traj.store.put_tensors(f"{folder}/{tensors_file}", dict(tensors), {"schema": schema})
    full = {
        "schema": schema,
        "schema_version": version,
        "sign_convention": SIGN_CONVENTION,
        "trajectory_fingerprint": traj.fingerprint(),
        **meta,
        "sha256": sha,
    }
    traj.store.put_json(f"{folder}/meta.json", full)
    return Artifact(full, dict(tensors))
