"""Running, replaying and skipping stages, checked against independent truth.

Truths used: a hand-written loop over torch.optim with the recorded batches; and, for skip-stage
counterfactuals, a *declared* pipeline that simply lacks the skipped stage (a different code
path: it resolves its stages from the config instead of replaying the record).
"""

import copy

import pytest
import torch

from attribution.record.counterfactual import skip_stage
from attribution.record.errors import StagetraceError
from attribution.record.pipeline import (
    max_abs_diff,
    reinitialise,
    replay,
    run_pipeline,
    sample_batches,
)
from attribution.record.references import load_dataset
from attribution.record.spec import PipelineSpec
from attribution.record.trajectory import Trajectory
from experiments.models import MLP
from tests.attribution import tiny


def run(cfg, root=None):
    return run_pipeline(PipelineSpec.from_dict(cfg), root)


def final(traj):
    return traj.checkpoint(len(traj.stages) - 1, "end")


def without(cfg, stage):
    """The declared pipeline lacking ``stage``. The first stage starts from an empty optimizer
    state, so carrying it into the next one is the same as a reset."""
    cfg = copy.deepcopy(cfg)
    del cfg["stages"][stage]
    next(iter(cfg["stages"].values()))["optimizer_policy"] = "reset"
    return cfg


def assert_same_state(a, b):
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("optimizer", [tiny.SGD_MOMENTUM, tiny.ADAMW], ids=["sgd", "adamw"])
def test_first_stage_equals_a_hand_written_torch_loop(optimizer):
    cfg = tiny.config(
        only=tiny.stage(
            "pretrain",
            5,
            optimizer,
            0.05 if optimizer is tiny.SGD_MOMENTUM else 1e-3,
            steps=8,
            schedule={"name": "cosine"},
        )
    )
    traj = run(cfg)
    torch.manual_seed(0)
    model = MLP(hidden=[16])
    assert_same_state(model.state_dict(), traj.checkpoint("only", "start"))
    kind = optimizer["type"]
    hyper = {k: v for k, v in optimizer.items() if k != "type"}
    lr = cfg["stages"]["only"]["lr"]
    opt = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[kind](
        model.parameters(), lr=lr, **hyper
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)
    x, y = load_dataset(traj.stages[0].data).tensors
    for idx in sample_batches(len(y), 32, 8, seed=5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        sched.step()
    assert max_abs_diff(model.state_dict(), traj.checkpoint("only", "end")) < 1e-6


@pytest.mark.parametrize("optimizer", [tiny.SGD_MOMENTUM, tiny.ADAMW], ids=["sgd", "adamw"])
def test_clipped_stage_equals_a_hand_written_loop_with_clip_grad_norm(optimizer):
    """``clip_grad_norm``: ``torch.nn.utils.clip_grad_norm_`` over the model's parameters after
    backward, before the step; bit for bit (a constant rate: no scheduler arithmetic enters)."""
    lr, max_norm = (0.05 if optimizer is tiny.SGD_MOMENTUM else 1e-3), 0.2
    cfg = tiny.config(
        only=tiny.stage("pretrain", 5, optimizer, lr, steps=8, clip_grad_norm=max_norm)
    )
    traj = run(cfg)
    assert (traj.stages[0].clip_grad_norm, traj.stages[0].verified) == (max_norm, True)
    torch.manual_seed(0)
    model = MLP(hidden=[16])
    hyper = {k: v for k, v in optimizer.items() if k != "type"}
    opt = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[optimizer["type"]](
        model.parameters(), lr=lr, **hyper
    )
    x, y = load_dataset(traj.stages[0].data).tensors
    clipped = 0
    for idx in sample_batches(len(y), 32, 8, seed=5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        clipped += bool(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm) > max_norm)
        opt.step()
    assert clipped == 8
    assert_same_state(model.state_dict(), traj.checkpoint("only", "end"))
    unclipped = run(tiny.config(only=tiny.stage("pretrain", 5, optimizer, lr, steps=8)))
    assert max_abs_diff(final(unclipped), final(traj)) > 1e-4


def test_declared_clipping_replays_bit_for_bit_and_is_kept_by_counterfactuals(tmp_path):
    """Clipping in two of three stages (carry policy, a LoRA stage that trains only some
    parameters): the replay reproduces every checkpoint and optimizer state, the manifest keeps
    the setting, and skipping a stage equals declaring the pipeline without it."""
    cfg = tiny.three_stage("carry")
    cfg["stages"]["finetune"]["clip_grad_norm"] = 0.2
    cfg["stages"]["adapt"]["clip_grad_norm"] = 0.05
    traj = run(cfg, tmp_path / "run")
    reopened = Trajectory.open(tmp_path / "run")
    assert [s.clip_grad_norm for s in reopened.stages] == [None, 0.2, 0.05]
    assert [s.verified for s in reopened.stages] == [True, True, True]
    diffs = replay(reopened)
    assert [(d.start, d.end, d.optimizer) for d in diffs] == [(0.0, 0.0, 0.0)] * 3
    for stage in ("pretrain", "finetune"):
        assert_same_state(skip_stage(traj, stage).state, final(run(without(cfg, stage))))
    assert max_abs_diff(final(run(tiny.three_stage("carry"))), final(traj)) > 0


@pytest.mark.parametrize(
    "name,optimizer",
    [
        ("sgd_momentum_wd", tiny.SGD_MOMENTUM),
        ("nesterov", tiny.NESTEROV),
        ("sgdw", tiny.SGDW),
        ("adam", tiny.ADAM),
        ("adamw", tiny.ADAMW),
    ],
)
def test_replay_reproduces_every_checkpoint_bit_for_bit(name, optimizer):
    lr = 1e-3 if optimizer["type"].startswith("adam") else 0.05
    cfg = tiny.config(
        a=tiny.stage("pretrain", 1, optimizer, lr),
        b=tiny.stage("finetune", 2, optimizer, lr, optimizer_policy="carry"),
        c=tiny.stage("adapt", 3, optimizer, lr),
    )
    diffs = replay(run(cfg))
    assert [(d.stage, d.start, d.end) for d in diffs] == [(s, 0.0, 0.0) for s in "abc"]


@pytest.mark.parametrize("policies", [("reset", "reset"), ("carry", "carry"), ("reset", "carry")])
def test_skipping_a_stage_equals_declaring_the_pipeline_without_it(policies):
    cfg = tiny.three_stage(*policies)
    traj = run(cfg)
    # Skipping pretrain: fine-tune starts from the initial weights. Skipping fine-tune: adapt
    # starts from pretrain's end and, under "carry", inherits pretrain's optimizer state (even
    # when fine-tune itself had reset it).
    for stage in ("pretrain", "finetune"):
        truth = run(without(cfg, stage))
        result = skip_stage(traj, stage)
        assert_same_state(result.state, final(truth))
        assert max_abs_diff(result.state, final(traj)) > 0


def test_carry_policy_hands_over_the_state_and_reset_does_not():
    carried = run(tiny.three_stage("carry"))
    reset = run(tiny.three_stage("reset"))
    assert reset.optimizer_state("finetune", "start") == {}
    handed = carried.optimizer_state("finetune", "start")
    previous = carried.optimizer_state("pretrain", "end")
    # The head was re-initialised on entry, so its momentum is not carried.
    assert set(handed) == {"fc1.weight", "fc1.bias"}
    for name, slots in handed.items():
        assert_same_state(slots, previous[name])
    assert max_abs_diff(final(carried), final(reset)) > 0


def test_skipping_the_last_stage_yields_the_parameters_that_entered_it():
    traj = run(tiny.three_stage())
    assert_same_state(skip_stage(traj, "adapt").state, traj.checkpoint("adapt", "start"))


def test_entry_actions_are_replayed_identically_after_a_skipped_stage():
    traj = run(tiny.three_stage())
    adapt_start = traj.checkpoint("adapt", "start")
    assert torch.equal(adapt_start["fc1.lora_B"], torch.zeros(16, 2))
    cf = skip_stage(traj, "finetune")
    truth = run(without(tiny.three_stage(), "finetune"))
    # Same LoRA initialisation in the counterfactual as in the recorded run.
    assert torch.equal(truth.checkpoint("adapt", "start")["fc1.lora_A"], adapt_start["fc1.lora_A"])
    # Frozen base weights of the adapted layer are untouched by the adapt stage in both worlds.
    assert torch.equal(cf.state["fc1.weight"], traj.checkpoint("pretrain", "end")["fc1.weight"])
    # Fine-tune's head re-initialisation draws the same values whatever came before it, and the
    # start checkpoint holds the weights before it (what skipping fine-tune starts from).
    other = run(without(tiny.three_stage(), "pretrain"))
    heads = []
    for t in (traj, other):
        model = t.load_model("finetune", "start")
        reinitialise(model, t.stages[t.index("finetune")].entry, "finetune")
        heads.append(model.head.weight.detach())
    assert torch.equal(heads[0], heads[1])
    assert torch.equal(
        traj.checkpoint("finetune", "start")["head.weight"],
        traj.checkpoint("pretrain", "end")["head.weight"],
    )


def test_memory_and_disk_trajectories_are_identical(tmp_path):
    cfg = tiny.three_stage("carry")
    memory = run(cfg)
    run(cfg, tmp_path / "run")
    reopened = Trajectory.open(tmp_path / "run")
    assert reopened.stages == memory.stages
    for i in range(3):
        for which in ("start", "end"):
            assert_same_state(memory.checkpoint(i, which), reopened.checkpoint(i, which))
        assert memory.steps(i).lr.equal(reopened.steps(i).lr)
        assert memory.steps(i).indices.equal(reopened.steps(i).indices)
    for stage in ("pretrain", "finetune"):
        assert_same_state(skip_stage(memory, stage).state, skip_stage(reopened, stage).state)


def test_stored_checkpoints_never_alias_live_or_returned_tensors():
    traj = run(tiny.three_stage())
    first = traj.checkpoint("pretrain", "end")
    first["fc1.weight"].add_(1.0)
    assert not torch.equal(traj.checkpoint("pretrain", "end")["fc1.weight"], first["fc1.weight"])
    model = traj.load_model("pretrain", "end")
    with torch.no_grad():
        model.fc1.weight.zero_()
    assert traj.checkpoint("pretrain", "end")["fc1.weight"].abs().sum() > 0


def test_counterfactual_is_stored_and_reused(tmp_path):
    traj = run(tiny.three_stage(), tmp_path / "run")
    first = skip_stage(traj, "pretrain")
    again = skip_stage(Trajectory.open(tmp_path / "run"), "pretrain")
    assert not first.reused and again.reused
    assert_same_state(first.state, again.state)
    assert (tmp_path / "run/counterfactuals/skip-pretrain/final.safetensors").is_file()


class Interrupt(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_same_bits(tmp_path):
    cfg = tiny.three_stage("carry")
    spec = PipelineSpec.from_dict(cfg)

    def stop_in_adapt(stage, t, total, loss):
        if stage == "adapt" and t == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_pipeline(spec, tmp_path / "run", on_step=stop_in_adapt)
    partial = Trajectory.open(tmp_path / "run")
    assert partial.names == ["pretrain", "finetune"] and not partial.complete
    resumed = run_pipeline(spec, tmp_path / "run")
    uninterrupted = run(cfg)
    assert resumed.complete
    for i in range(3):
        assert_same_state(resumed.checkpoint(i, "end"), uninterrupted.checkpoint(i, "end"))
    assert [d.end for d in replay(resumed)] == [0.0, 0.0, 0.0]


def test_epochs_resolve_to_whole_batches_per_pass():
    cfg = tiny.config(a={**tiny.stage("pretrain", 1, tiny.SGD_MOMENTUM, 0.05), "epochs": 2})
    del cfg["stages"]["a"]["steps"]
    traj = run(cfg)
    assert traj.stages[0].num_steps == 2 * (600 // 32)
    first_epoch = traj.steps(0).indices[: (600 // 32) * 32]
    assert first_epoch.unique().numel() == first_epoch.numel()


def test_parameter_groups_take_their_overrides_and_record_per_group_rates():
    optimizer = {
        **tiny.SGD_MOMENTUM,
        "groups": [{"params": ["*.bias"], "weight_decay": 0.0, "lr": 0.01}],
    }
    cfg = tiny.config(a=tiny.stage("pretrain", 1, optimizer, 0.05, schedule={"name": "cosine"}))
    traj = run(cfg)
    biases, rest = traj.stages[0].groups
    assert biases.params == ("fc1.bias", "head.bias")
    assert biases.hyper["weight_decay"] == 0.0 and rest.hyper["weight_decay"] == 1e-3
    lr = traj.steps(0).lr
    assert lr[0].tolist() == [0.01, 0.05]
    assert torch.allclose(lr[:, 0] / lr[:, 1], torch.full((6,), 0.2, dtype=torch.float64))
    assert replay(traj)[0].end == 0.0


def test_carry_keeps_the_state_of_weights_that_an_adapter_wraps():
    cfg = tiny.config(
        a=tiny.stage("pretrain", 1, tiny.SGD_MOMENTUM, 0.05),
        b=tiny.stage(
            "adapt",
            2,
            tiny.SGD_MOMENTUM,
            0.05,
            optimizer_policy="carry",
            entry=[{"kind": "add_lora", "modules": ["fc1"], "rank": 2}],
        ),
    )
    traj = run(cfg)
    handed = traj.optimizer_state("b", "start")
    assert set(handed) == {"fc1.weight", "fc1.bias", "head.weight", "head.bias"}
    assert_same_state(handed["fc1.weight"], traj.optimizer_state("a", "end")["fc1.weight"])


def test_a_skip_that_would_carry_state_across_optimizer_types_is_refused():
    adam = {"type": "adam"}
    cfg = tiny.config(
        a=tiny.stage("pretrain", 1, tiny.SGD_MOMENTUM, 0.05),
        b=tiny.stage("finetune", 2, adam, 1e-3),
        c=tiny.stage("adapt", 3, adam, 1e-3, optimizer_policy="carry"),
    )
    traj = run(cfg)
    with pytest.raises(StagetraceError, match=r"carry sgd state from 'a' into the adam stage 'c'"):
        skip_stage(traj, "b")
    assert skip_stage(traj, "a").state.keys() == final(traj).keys()


def test_counterfactuals_of_an_incomplete_run_are_refused(tmp_path):
    spec = PipelineSpec.from_dict(tiny.three_stage())

    def stop(stage, t, total, loss):
        if stage == "adapt":
            raise Interrupt

    with pytest.raises(Interrupt):
        run_pipeline(spec, tmp_path / "run", on_step=stop)
    with pytest.raises(StagetraceError, match="incomplete"):
        skip_stage(Trajectory.open(tmp_path / "run"), "pretrain")
    assert not (tmp_path / "run" / "counterfactuals").exists()


def test_replay_compares_optimizer_state_too():
    traj = run(tiny.three_stage("carry"))
    name = traj._manifest["stages"][1]["files"]["optimizer_end"]
    tampered = {k: v + 1e-3 for k, v in traj.store.get_tensors(name["path"]).items()}
    name["sha256"] = traj.store.put_tensors(name["path"], tampered)
    diffs = replay(traj)
    assert [d.end for d in diffs] == [0.0, 0.0, 0.0]
    assert diffs[1].optimizer == pytest.approx(1e-3, rel=1e-3) and diffs[1].worst > 0
    assert diffs[0].optimizer == 0.0


def test_a_non_finite_gradient_is_named_by_its_parameter():
    from attribution.record.errors import TrainingError
    from attribution.record.pipeline import _check_finite

    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([a, b], lr=0.1)
    a.grad, b.grad = torch.ones(3), torch.tensor([1.0, float("nan")])
    with pytest.raises(TrainingError, match=r"stage 's' step 4: the gradient of b holds NaN"):
        _check_finite(torch.tensor(1.0), optimizer, {id(a): "a", id(b): "b"}, "s", 4)
    b.grad = torch.tensor([1e30, 1e30])  # finite, though its float32 norm overflows
    _check_finite(torch.tensor(1.0), optimizer, {id(a): "a", id(b): "b"}, "s", 4)
