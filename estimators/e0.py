"""E0, the parameter difference: ``SE_k = delta_k``, ignoring every later stage.

Exact for the last stage (its evaluated read-out is the true effect): its embedding holds the
floating-point buffers' offset too (running statistics). A baseline elsewhere.
"""

from __future__ import annotations

from attribution.record.trajectory import Trajectory
from estimators.base import Estimator, Offsets, final_parameter_names, stage_displacement


class E0(Estimator):
    name = "e0"
    requires = frozenset({"boundary_checkpoints"})
    version = 2  # the last stage's embedding holds floating-point buffers

    def offsets(self, traj: Trajectory, counts: dict[str, int]) -> dict[str, Offsets]:
        names = final_parameter_names(traj)
        return {r.name: stage_displacement(traj, k, names) for k, r in enumerate(traj.stages)}
