"""The recorder: a user's own loop, recorded, replays exactly and supports counterfactuals."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attribution.analysis.cli import main
from attribution.record.counterfactual import skip_stage
from attribution.record.errors import SpecError, StagetraceError, TrajectoryError
from attribution.record.pipeline import max_abs_diff, replay
from attribution.record.recorder import Recorder
from attribution.record.references import Ref
from attribution.record.trajectory import Trajectory, Verification
from estimators.registry import build

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
    assert (pretrain.clip_grad_norm, finetune.clip_grad_norm) == (None, 1.0)
    assert (pretrain.verified, finetune.verified) == (True, True)
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


# Loops the replay must repeat: gradient clipping declared, or caught when it is not.

MAX_NORM = 0.1
STEPS = 4


def two_stage_loop(root, variant="plain", declare=None):
    """A user loop: "pretrain" (SGD, plain), then "finetune" (AdamW) where the loop does
    ``variant``: "plain", "clip" (clip_grad_norm_ to MAX_NORM), "accumulate" (two half batches,
    each loss halved), "edit" (clamps head.weight after each step). ``declare`` is the
    clip_grad_norm finetune declares to the recorder."""
    torch.manual_seed(0)
    model = MODEL.call()
    recorder = Recorder(root, model, MODEL)
    inputs, targets = DATA.call().tensors
    for seed, name in enumerate(("pretrain", "finetune"), start=1):
        tuned = name == "finetune"
        with recorder.stage(
            name,
            kind=name,
            data=DATA,
            seed=seed,
            batch_size=16,
            clip_grad_norm=declare if tuned else None,
        ) as stage:
            if tuned:
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
            else:
                optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            stage.attach(optimizer)
            shuffler = torch.Generator().manual_seed(seed)
            for _ in range(STEPS):
                batch = torch.randint(len(targets), (16,), generator=shuffler)
                stage.log_batch(batch)
                optimizer.zero_grad()
                if tuned and variant == "accumulate":
                    for half in batch.chunk(2):
                        (F.cross_entropy(model(inputs[half]), targets[half]) / 2).backward()
                else:
                    F.cross_entropy(model(inputs[batch]), targets[batch]).backward()
                if tuned and variant == "clip":
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
                    assert norm > MAX_NORM  # the clipping is active
                optimizer.step()
                if tuned and variant == "edit":
                    with torch.no_grad():
                        model.head.weight.clamp_(-0.05, 0.05)
    return recorder.finish()


def retrain_finetune(traj, clip):
    """finetune retrained by hand from pretrain's start (pretrain skipped): AdamW on its
    recorded batches, clipping to ``clip`` (None: not) between backward and step."""
    model = MODEL.call()
    model.load_state_dict(traj.checkpoint("pretrain", "start"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    inputs, targets = DATA.call().tensors
    log = traj.steps("finetune")
    for t in range(log.num_steps):
        batch = log.batch(t)
        optimizer.zero_grad()
        F.cross_entropy(model(inputs[batch]), targets[batch]).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
    return model.state_dict()


def test_declared_clipping_is_verified_replayed_and_retrained_exactly(tmp_path):
    two_stage_loop(tmp_path / "run", "clip", declare=MAX_NORM)
    traj = Trajectory.open(tmp_path / "run")
    assert [s.clip_grad_norm for s in traj.stages] == [None, MAX_NORM]
    assert [s.verified for s in traj.stages] == [True, True]
    assert traj.stages[1].verification == Verification(steps=3, step=None, difference=0.0)
    assert [(d.start, d.end, d.optimizer) for d in replay(traj)] == [(0.0, 0.0, 0.0)] * 2
    counterfactual = skip_stage(traj, "pretrain").state
    truth = retrain_finetune(traj, MAX_NORM)
    assert set(counterfactual) == set(truth)
    assert all(torch.equal(counterfactual[k], truth[k]) for k in truth)
    unclipped = retrain_finetune(traj, None)
    assert max_abs_diff(unclipped, truth) > 1e-4  # clipping changed the retraining


@pytest.mark.parametrize(
    ("variant", "declare"),
    [("clip", None), ("plain", MAX_NORM), ("accumulate", None), ("edit", None)],
    ids=["undeclared-clipping", "declared-not-clipped", "accumulation", "post-step-edit"],
)
def test_a_loop_the_replay_does_not_repeat_is_unverified_and_refused(tmp_path, variant, declare):
    root = tmp_path / "run"
    two_stage_loop(root, variant, declare)
    traj = Trajectory.open(root)
    assert [s.verified for s in traj.stages] == [True, False]
    check = traj.stages[1].verification
    assert (check.steps, check.step, check.problem) == (3, 0, None) and check.difference > 0
    manifest = json.loads((root / "manifest.json").read_text())["stages"][1]
    assert manifest["verified"] is False and manifest["verification"]["step"] == 0

    for attempt in (lambda: skip_stage(traj, "pretrain"), lambda: replay(traj)):
        with pytest.raises(TrajectoryError) as info:
            attempt()
        assert (info.value.stage, info.value.step) == ("finetune", 0)
        assert info.value.path == root / "manifest.json"
        message = str(info.value)
        for named in ("'finetune'", "step 0", "gradient clipping not declared", "Fix:"):
            assert named in message, message
    assert not (root / "counterfactuals").exists()
    # skipping finetune itself retrains nothing: its truth is its start, still available
    skipped = skip_stage(traj, "finetune").state
    start = traj.checkpoint("finetune", "start")
    assert all(torch.equal(skipped[k], start[k]) for k in start)
    # estimators that need no replay still embed the run
    for name in ("e0", "e1"):
        offsets = build(name).embed(traj).offsets
        assert set(offsets) == {"pretrain", "finetune"}


def test_the_cli_refuses_to_retrain_an_unverified_stage(tmp_path, capsys):
    root = tmp_path / "run"
    two_stage_loop(root, "clip")
    for argv in (["counterfactual", root, "--skip", "pretrain"], ["replay", root, "--verify"]):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        assert (code, out) == (2, ""), argv
        assert err.startswith("stagetrace: error:") and "Fix:" in err, err
        for named in ("'finetune'", "step 0", "clip_grad_norm"):
            assert named in err, err


def test_a_stage_whose_data_cannot_be_loaded_is_unverified(tmp_path):
    torch.manual_seed(0)
    model = MODEL.call()
    recorder = Recorder(None, model, MODEL)
    inputs, targets = DATA.call().tensors
    missing = Ref("experiments.data:no_such_dataset", {})
    with recorder.stage("only", kind="pretrain", data=missing, seed=0) as stage:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        stage.attach(optimizer)
        stage.log_batch(torch.arange(8))
        F.cross_entropy(model(inputs[:8]), targets[:8]).backward()
        optimizer.step()
    traj = recorder.finish()
    record = traj.stages[0]
    assert record.verified is False and "no_such_dataset" in record.verification.problem
    with pytest.raises(TrajectoryError, match="could not be replayed when it was recorded"):
        replay(traj)


def test_verification_leaves_the_global_random_state_alone():
    model, recorder = make_recorder()
    inputs, targets = DATA.call().tensors
    with recorder.stage("only", kind="pretrain", data=DATA, seed=3) as stage:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        stage.attach(optimizer)
        for t in range(2):
            stage.log_batch(torch.arange(8 * t, 8 * t + 8))
            optimizer.zero_grad()
            F.cross_entropy(model(inputs[8 * t : 8 * t + 8]), targets[8 * t : 8 * t + 8]).backward()
            optimizer.step()
        before = torch.get_rng_state()
    assert recorder.trajectory.stages[0].verified is True
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("value", [0, -1.0, "1", float("nan")])
def test_a_bad_clip_grad_norm_declaration_is_refused(value):
    _, recorder = make_recorder()
    with pytest.raises(SpecError, match="clip_grad_norm"):
        recorder.stage("a", kind="pretrain", data=DATA, seed=0, clip_grad_norm=value)
