"""E0, the parameter difference: ``SE_k = delta_k``, ignoring every later stage.

Exact for the last stage (its evaluated read-out is the true effect): its embedding holds the
floating-point buffers' offset too (running statistics). A baseline elsewhere. Computed on the
current compute's device (a float64 subtraction: the same bits on every device), handed back on
the CPU.
"""

from __future__ import annotations

from attribution.record.compute import current, to_cpu
from attribution.record.trajectory import Trajectory
from estimators.base import Estimator, Offsets, final_parameter_names, stage_displacement


class E0(Estimator):
    name = "e0"
    requires = frozenset({"boundary_checkpoints"})
    version = 2  # the last stage's embedding holds floating-point buffers
    trains = False

    def offsets(self, traj: Trajectory, counts: dict[str, int]) -> dict[str, Offsets]:
        names, device = final_parameter_names(traj), current().torch_device
        return {
            r.name: to_cpu(stage_displacement(traj, k, names, device=device))
            for k, r in enumerate(traj.stages)
        }
