"""E0 and E1 against real skip-stage retraining where they must be exact."""

import pytest

from attribution.record.pipeline import run_pipeline
from attribution.record.spec import PipelineSpec
from estimators.e0 import E0
from estimators.e1 import E1
from tests.attribution import tiny
from tests.estimators import toy
from tests.helpers import ADAMW, NESTEROV, SGD, SGDW, assert_offsets_equal, true_offsets


@pytest.mark.parametrize(
    "optimizers,policies",
    [
        ([SGD, SGD, SGD], ["reset", "reset", "reset"]),
        ([SGD, NESTEROV, NESTEROV], ["reset", "carry", "carry"]),
        ([SGDW, SGDW, SGDW], ["reset", "reset", "carry"]),
        ([ADAMW, ADAMW, SGD], ["reset", "reset", "reset"]),
    ],
    ids=["sgd-reset", "nesterov-carry", "sgdw-carry", "adamw"],
)
def test_e1_is_exact_when_the_loss_is_linear_in_theta(optimizers, policies):
    cfg = toy.pipeline(
        "tests.estimators.toy:linear_loss", optimizers, policies, [0.1, 0.3, 0.2], reinit_head_in=1
    )
    traj = run_pipeline(PipelineSpec.from_dict(cfg), None)
    embeddings = E1().embed(traj)
    assert embeddings.estimator == "e1" and embeddings.seconds >= 0
    for stage in traj.names:
        assert_offsets_equal(embeddings.offsets[stage], true_offsets(traj, stage), atol=1e-12)


def test_e1_differs_from_e0_where_later_stages_decay_the_offset():
    cfg = toy.pipeline(
        "tests.estimators.toy:linear_loss", [SGD, SGD], ["reset", "reset"], [0.1, 0.5]
    )
    traj = run_pipeline(PipelineSpec.from_dict(cfg), None)
    e0, e1 = E0().embed(traj).offsets["s0"], E1().embed(traj).offsets["s0"]
    truth = true_offsets(traj, "s0")
    ratio = float(e1["body.weight"].norm() / e0["body.weight"].norm())
    assert 0.0 < ratio < 1.0
    assert_offsets_equal(e1, truth, atol=1e-12)


def test_for_the_last_stage_e0_and_e1_equal_the_truth_on_a_real_network():
    traj = run_pipeline(PipelineSpec.from_dict(tiny.three_stage("carry")), None)
    truth = true_offsets(traj, "adapt")
    assert_offsets_equal(E0().embed(traj).offsets["adapt"], truth, atol=0)
    assert_offsets_equal(E1().embed(traj).offsets["adapt"], truth, atol=0)
