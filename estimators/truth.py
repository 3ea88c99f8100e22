"""The truth as stage embeddings: ``SE_k = theta_T^(-k) - theta_T`` from actually retraining
without each stage (``attribution.record.counterfactual.skip_stage``, stored and reused).

Not an estimate: with the evaluated read-out it gives the true effects exactly, over the final
model's parameters and floating-point buffers. It lets the audit answer with the truth through
the same read-outs, labels and result files as the estimators, when retraining is affordable.

Under torchrun the retrainings are shared out by stage before the embeddings are asked for
(``counterfactual.skip_stages``, as ``validate`` does), so that here every rank only reads them:
embeddings are computed under the cache's lock, where no collective may run (docs/scale.md).

The retrainings run on the current compute and come back on the CPU; under a bfloat16 compute
they, and so these embeddings, are the approximate bfloat16 truth, stored apart
(``Estimator.trains``).
"""

from __future__ import annotations

from attribution.record.counterfactual import skip_stage
from attribution.record.trajectory import Trajectory
from estimators.base import EVIDENCE, Estimator, Offsets, final_buffer_names, final_parameter_names


class Truth(Estimator):
    name = "truth"
    requires = frozenset(EVIDENCE)
    trains = True  # the retrainings follow Compute.training_dtype

    def offsets(self, traj: Trajectory, counts: dict[str, int]) -> dict[str, Offsets]:
        names = [*final_parameter_names(traj), *final_buffer_names(traj)]
        final = traj.checkpoint(len(traj.stages) - 1, "end")
        out = {}
        for k, record in enumerate(traj.stages):
            skipped = skip_stage(traj, k)
            out[record.name] = {n: skipped.state[n].double() - final[n].double() for n in names}
            counts["retrained_steps"] = counts.get("retrained_steps", 0) + sum(
                r.num_steps for r in traj.stages[k + 1 :]
            )
        return out
