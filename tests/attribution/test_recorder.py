"""The recorder: a user's own loop, recorded, replays exactly and supports counterfactuals."""

import importlib.util
from pathlib import Path

import pytest
import torch

from attribution.record.counterfactual import skip_stage
from attribution.record.errors import StagetraceError
from attribution.record.pipeline import replay
from attribution.record.recorder import Recorder
from attribution.record.references import Ref
from attribution.record.trajectory import Trajectory

MODEL = Ref("experiments.models:MLP", {"hidden": [8]})
DATA = Ref("experiments.data:mnist", {"stop": 200})


def load_example():
    path = Path(__file__).parents[2] / "examples" / "record_own_loop.py"
    spec = importlib.util.spec_from_file_location("record_own_loop", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_loop_is_recorded_faithfully(tmp_path):
    traj = load_example().train(tmp_path / "run", steps=12)
    reopened = Trajectory.open(tmp_path / "run")
    assert reopened.names == ["pretrain", "finetune"] and reopened.complete
    pretrain, finetune = reopened.stages
    assert (pretrain.optimizer, finetune.optimizer) == ("sgd", "adamw")
    assert pretrain.groups[0].hyper["momentum"] == 0.9
    rates = reopened.steps("pretrain").lr[:, 0]
    expected = torch.optim.lr_scheduler.CosineAnnealingLR(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), T_max=12
    )
    first = [0.1]
    for _ in range(11):
        expected.optimizer.step()
        expected.step()
        first.append(expected.get_last_lr()[0])
    assert rates.tolist() == first
    assert [(d.start, d.end) for d in replay(reopened)] == [(0.0, 0.0), (0.0, 0.0)]
    assert not torch.equal(
        skip_stage(traj, "pretrain").state["fc1.weight"],
        traj.checkpoint("finetune", "end")["fc1.weight"],
    )


def make_recorder():
    torch.manual_seed(0)
    model = MODEL.call()
    return model, Recorder(None, model, MODEL)


def test_a_step_without_a_logged_batch_is_refused():
    model, recorder = make_recorder()
    with (
        pytest.raises(StagetraceError, match="log_batch"),
        recorder.stage("a", kind="pretrain", data=DATA, seed=0) as stage,
    ):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        stage.attach(optimizer)
        model(torch.zeros(1, 784)).sum().backward()
        optimizer.step()
    assert recorder.trajectory.stages == []


def test_reset_policy_with_a_stateful_optimizer_is_refused():
    model, recorder = make_recorder()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.zeros(1, 784)).sum().backward()
    optimizer.step()
    with (
        pytest.raises(StagetraceError, match="optimizer_policy"),
        recorder.stage("a", kind="pretrain", data=DATA, seed=0) as stage,
    ):
        stage.attach(optimizer)


def test_a_model_reference_that_does_not_rebuild_the_model_is_refused():
    with pytest.raises(StagetraceError, match="does not rebuild"):
        Recorder(None, MODEL.call(), Ref("experiments.models:MLP", {"hidden": [9]}))


def test_a_failed_stage_writes_nothing(tmp_path):
    torch.manual_seed(0)
    model = MODEL.call()
    recorder = Recorder(tmp_path / "run", model, MODEL)
    with (
        pytest.raises(RuntimeError, match="user bug"),
        recorder.stage("a", kind="pretrain", data=DATA, seed=0) as stage,
    ):
        stage.attach(torch.optim.SGD(model.parameters(), lr=0.1))
        raise RuntimeError("user bug")
    assert Trajectory.open(tmp_path / "run").stages == []
    assert not (tmp_path / "run" / "stages").exists()
