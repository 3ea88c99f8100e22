"""E4, reduced replay: exact at stride 1, cheaper and still close at larger strides."""

import pytest
import torch

from attribution.record.counterfactual import skip_stage
from attribution.record.pipeline import run_pipeline
from attribution.record.spec import PipelineSpec
from attribution.record.trajectory import StepLog
from estimators.e4 import E4, coarsen
from tests.attribution import tiny


def truth(traj, stage):
    final = traj.checkpoint(len(traj.stages) - 1, "end")
    skipped = skip_stage(traj, stage).state
    return {
        n: skipped[n].double() - final[n].double()
        for n, _ in traj.build_model(len(traj.stages) - 1).named_parameters()
    }


@pytest.mark.parametrize("policy", ["reset", "carry"])
def test_stride_one_is_the_ground_truth_exactly(policy):
    traj = run_pipeline(PipelineSpec.from_dict(tiny.three_stage(policy)), None)
    embeddings = E4(stride=1).embed(traj)
    for stage in traj.names:
        expected = truth(traj, stage)
        assert embeddings.offsets[stage].keys() >= expected.keys()
        for name, value in expected.items():
            assert torch.equal(embeddings.offsets[stage][name], value), (stage, name)


def test_coarse_schedule_keeps_the_learning_rate_mass_and_every_strideth_batch():
    record = run_pipeline(PipelineSpec.from_dict(tiny.three_stage()), None).stages[1]
    lr = torch.linspace(0.1, 0.6, 6, dtype=torch.float64).unsqueeze(1)
    steps = StepLog.from_batches(lr.tolist(), [torch.tensor([t, t + 10]) for t in range(6)])
    coarse_record, coarse = coarsen(record, steps, 4)
    assert coarse.num_steps == coarse_record.num_steps == 2
    assert coarse.batch(0).tolist() == [0, 10] and coarse.batch(1).tolist() == [4, 14]
    assert coarse.lr[:, 0].tolist() == pytest.approx([0.1 + 0.2 + 0.3 + 0.4, 0.5 + 0.6])
    assert coarse_record.groups == record.groups  # SGD keeps its momentum


def test_the_stride_divides_the_replayed_steps_and_keys_a_separate_artifact():
    traj = run_pipeline(PipelineSpec.from_dict(tiny.three_stage()), None)
    exact, coarse = E4(stride=1).embed(traj), E4(stride=2).embed(traj)
    # Later stages: finetune 6 steps and adapt 6, replayed twice per skipped stage.
    assert exact.counts["replayed_steps"] == 2 * (12 + 6)
    assert coarse.counts["replayed_steps"] == 2 * (6 + 3)
    assert E4(stride=2).settings() != E4(stride=1).settings()
