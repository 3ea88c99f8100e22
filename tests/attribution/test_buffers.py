"""Models with BatchNorm and dropout: every behaviour is evaluated in eval mode with each
checkpoint's own buffers, so the truth is deterministic and the last stage (whose embedding
carries the running statistics' offset) is exact.

Independent truth: plain forward passes of modules holding the final and the counterfactual
states (``load_state_dict``, ``.eval()``), group means by hand, finite differences.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attribution.analysis.audit import audit
from attribution.analysis.behaviors import Behavior
from attribution.analysis.readout import evaluated_effects, linear_effects
from attribution.analysis.validate import true_effects, validate
from attribution.record.counterfactual import as_model, skip_stage
from attribution.record.errors import StagetraceError
from attribution.record.evaluation import ModelAt, final_model
from attribution.record.pipeline import run_pipeline
from attribution.record.references import Ref
from attribution.record.spec import PipelineSpec
from attribution.record.trajectory import Trajectory
from estimators import E0, E4, stored_embeddings
from experiments.data import mnist
from tests.attribution import normnet

N = 120
TEST = Ref("experiments.data:mnist", {"split": "test", "stop": N})
GROUPS = {"low": (0, 1, 2, 3, 4), "high": (5, 6, 7, 8, 9)}
BEHAVIORS = {
    "test_loss": Behavior("test_loss", TEST),
    "test_margin": Behavior("test_margin", TEST, "margin"),
    "groups": Behavior("groups", TEST, aggregate="group_mean", groups=GROUPS),
    "gap": Behavior("gap", TEST, "margin", "group_gap", GROUPS, ("high", "low")),
}
STAGES = ["pretrain", "finetune", "adapt"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("normnet") / "run"
    run_pipeline(PipelineSpec.from_dict(normnet.three_stage()), root)
    return root


def eval_quantity(module: torch.nn.Module, quantity: str) -> np.ndarray:
    """Per-example loss or margin of a module in eval mode, written out independently."""
    inputs, targets = mnist(split="test", stop=N).tensors
    module.eval()
    with torch.no_grad():
        logits = module(inputs).double()
    if quantity == "loss":
        return F.cross_entropy(logits, targets, reduction="none").numpy()
    true = logits[torch.arange(N), targets]
    others = logits.clone()
    others[torch.arange(N), targets] = -torch.inf
    return (true - others.max(1).values).numpy()


def independent_effects(run: Path, quantity: str) -> dict[str, np.ndarray]:
    traj = Trajectory.open(run)
    final = eval_quantity(as_model(traj, traj.checkpoint("adapt", "end")), quantity)
    return {
        s: final - eval_quantity(as_model(traj, skip_stage(traj, s).state), quantity)
        for s in traj.names
    }


def test_the_model_depends_on_its_mode_and_buffers(run):
    # Without this the tests below could not fail: dropout and batch statistics change the
    # outputs, and the stages move the running statistics.
    traj = Trajectory.open(run)
    end, start = traj.checkpoint("adapt", "end"), traj.checkpoint("adapt", "start")
    assert not torch.equal(end["norm1.running_mean"], start["norm1.running_mean"])
    trained = as_model(traj, end).train()
    inputs = mnist(split="test", stop=N).tensors[0]
    with torch.no_grad():
        assert not torch.allclose(trained(inputs), trained(inputs))  # dropout
    model = final_model(traj)
    assert not model.module.training
    torch.testing.assert_close(
        model.values(inputs, mnist(split="test", stop=N).tensors[1], "loss", 7),
        torch.from_numpy(eval_quantity(as_model(traj, end), "loss")),
        atol=1e-6,
        rtol=0,
    )


def test_last_stage_embeddings_carry_the_float_buffers(run):
    traj = Trajectory.open(run)
    offsets = E0().embed(traj).offsets
    assert {"norm1.running_mean", "norm1.running_var"} <= set(offsets["adapt"])
    assert "norm1.num_batches_tracked" not in offsets["adapt"]  # not floating point
    assert "norm1.running_mean" not in offsets["pretrain"]  # earlier stages: parameters only
    start, end = traj.checkpoint("adapt", "start"), traj.checkpoint("adapt", "end")
    torch.testing.assert_close(
        offsets["adapt"]["norm1.running_var"],
        start["norm1.running_var"].double() - end["norm1.running_var"].double(),
    )


def test_validate_is_exact_for_the_last_stage_and_deterministic(run):
    traj = Trajectory.open(run)
    first = validate(traj, ["e0", "e1", "e4:1"], ["evaluated", "linear"], BEHAVIORS)
    second = validate(traj, ["e0"], ["evaluated"], BEHAVIORS)
    # Two runs, the same truth (eval mode: no dropout, the recorded statistics).
    truth = {(r.behavior, r.stage): r.mean_effect_true for r in first.rows}
    assert {(r.behavior, r.stage): r.mean_effect_true for r in second.rows} == truth
    again = true_effects(traj, BEHAVIORS)
    for name in ("test_loss", "test_margin"):
        independent = independent_effects(run, name.removeprefix("test_"))
        for stage in STAGES:
            assert np.abs(independent[stage]).max() > 1e-3, stage  # the stage matters
            np.testing.assert_allclose(
                again.effects[name][stage].numpy(), independent[stage], rtol=0, atol=1e-5
            )
            assert truth[(name, stage)] == pytest.approx(independent[stage].mean(), abs=1e-6)
    by_key = {(r.estimator, r.readout, r.behavior, r.stage): r for r in first.rows}
    for name in ("test_loss", "test_margin"):
        last = by_key[("e0", "evaluated", name, "adapt")]
        assert f"{last.pearson:.3f}" == "1.000" and last.sign_agreement == 1.0
        assert abs(last.mean_effect_error) < 1e-6
        for stage in STAGES:  # E4 at stride 1 replays exactly: every stage, buffers included
            row = by_key[("e4:1", "evaluated", name, stage)]
            assert row.pearson == pytest.approx(1.0, abs=1e-6), stage
            assert abs(row.mean_effect_error) < 1e-6, stage


def test_validate_reports_group_behaviours_against_the_counterfactual_states(run):
    traj = Trajectory.open(run)
    result = validate(traj, ["e0", "e1"], ["evaluated"], BEHAVIORS)
    assert {r.behavior for r in result.rows} == {"test_loss", "test_margin"}
    assert {(r.estimator, r.behavior, r.output) for r in result.group_rows} == {
        (e, b, o)
        for e in ("e0", "e1")
        for b, o in [
            ("groups", "groups[low]"),
            ("groups", "groups[high]"),
            ("gap", "gap[high - low]"),
        ]
    }
    labels = mnist(split="test", stop=N).tensors[1].numpy()
    low = np.isin(labels, GROUPS["low"])
    loss, margin = independent_effects(run, "loss"), independent_effects(run, "margin")
    expected = {
        "groups[low]": {s: loss[s][low].mean() for s in STAGES},
        "groups[high]": {s: loss[s][~low].mean() for s in STAGES},
        "gap[high - low]": {s: margin[s][~low].mean() - margin[s][low].mean() for s in STAGES},
    }
    e0 = E0().embed(traj).offsets
    for row in result.group_rows:
        assert row.true == pytest.approx(expected[row.output][row.stage], abs=1e-6)
        assert row.abs_error == pytest.approx(abs(row.estimated - row.true), abs=1e-12)
        assert row.sign_right == (np.sign(row.estimated) == np.sign(row.true))
        same = {
            r.stage: r.estimated
            for r in result.group_rows
            if (r.estimator, r.readout, r.output) == (row.estimator, row.readout, row.output)
        }
        estimated = sorted(STAGES, key=lambda s: -same[s])
        true = sorted(STAGES, key=lambda s: -expected[row.output][s])
        assert row.ranking_matches == (estimated == true)
    # E0 is exact for the last stage, group outputs included.
    for row in (r for r in result.group_rows if r.estimator == "e0" and r.stage == "adapt"):
        assert row.estimated == pytest.approx(row.true, abs=1e-6) and row.sign_right
    assert "norm1.running_mean" in e0["adapt"]


def test_audit_takes_the_embeddings_it_is_given(run):
    traj = Trajectory.open(run)
    embeddings, _ = stored_embeddings(E4(stride=1), traj)
    given = audit(traj, embeddings, BEHAVIORS)
    assert given.estimator.label == "e4:1" and given.estimator.reused is None
    by_name = audit(traj, "e4:1", BEHAVIORS)
    assert by_name.estimator.reused is True  # stored by the call above
    assert given.behaviors["gap"].effects == by_name.behaviors["gap"].effects
    with pytest.raises(StagetraceError, match="settings"):
        audit(traj, embeddings, BEHAVIORS, settings={"stride": 2})


def test_readouts_offset_buffers_too():
    torch.manual_seed(0)
    module = normnet.NormNet(hidden=6).double()
    module.norm1.running_mean.normal_()
    module.norm1.running_var.uniform_(0.5, 2.0)
    model = ModelAt.of(module, copy.deepcopy(module.state_dict()))
    inputs, targets = mnist(split="test", stop=20).tensors
    inputs = inputs.double()
    generator = torch.Generator().manual_seed(1)
    offsets = {
        n: 1e-3 * torch.randn(model.point[n].shape, generator=generator, dtype=torch.float64)
        for n in ("norm1.running_mean", "norm1.running_var", "head.bias")
    }
    # evaluated: a module holding the shifted state, run in eval mode
    state = copy.deepcopy(module.state_dict())
    shifted = copy.deepcopy(module)
    shifted.load_state_dict({n: v + offsets[n] if n in offsets else v for n, v in state.items()})
    final = eval_quantity_of(module, inputs, targets)
    got = evaluated_effects(model, {"s": offsets}, inputs, targets, "loss")["s"]
    torch.testing.assert_close(got, final - eval_quantity_of(shifted, inputs, targets))
    # linear: minus the central finite difference along the (small) offsets
    ahead, behind = copy.deepcopy(module), copy.deepcopy(module)
    ahead.load_state_dict({n: v + offsets[n] if n in offsets else v for n, v in state.items()})
    behind.load_state_dict({n: v - offsets[n] if n in offsets else v for n, v in state.items()})
    slope = (
        eval_quantity_of(ahead, inputs, targets) - eval_quantity_of(behind, inputs, targets)
    ) / 2
    linear = linear_effects(model, {"s": offsets}, inputs, targets, "loss")["s"]
    torch.testing.assert_close(linear, -slope, atol=1e-8, rtol=1e-4)
    with pytest.raises(StagetraceError, match=r"num_batches_tracked.*Fix: "):
        evaluated_effects(
            model, {"s": {"norm1.num_batches_tracked": torch.ones(())}}, inputs, targets, "loss"
        )


def eval_quantity_of(module: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor):
    module.eval()
    with torch.no_grad():
        return F.cross_entropy(module(inputs), targets, reduction="none").double()
