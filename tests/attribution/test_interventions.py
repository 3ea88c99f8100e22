"""Interventions against what must hold: bit-for-bit replays, an independent torch.optim rerun
without the dropped examples, the exact last-stage embedding, and clear errors."""

import pytest
import torch
from torch.func import functional_call
from torch.utils.data import TensorDataset

from attribution.analysis.interventions import (
    filter_and_rerun,
    most_harmful,
    random_drop,
    skip,
    undo,
)
from attribution.record.counterfactual import retrain_after
from attribution.record.errors import SpecError, StagetraceError, UnknownStageError
from attribution.record.pipeline import reinitialise, run_pipeline
from attribution.record.spec import PipelineSpec
from attribution.record.trajectory import snapshot
from estimators.e0 import E0
from estimators.within_stage import ExampleScores, example_scores
from tests.attribution import tiny
from tests.estimators import toy

SGD = {"type": "sgd", "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.05}
HERE = "tests.attribution.test_interventions"


def mislabelled(n: int = 32) -> TensorDataset:
    """Clean linear-regression data except examples 0 and 1, whose targets are 6 too high."""
    x, y = toy.regression(n=n, seed=5).tensors
    y[:2] += 6.0
    return TensorDataset(x, y)


@pytest.fixture(scope="module")
def runs():
    return {
        policy: run_pipeline(PipelineSpec.from_dict(tiny.three_stage(policy)), None)
        for policy in ("reset", "carry")
    }


def final_state(traj):
    return traj.checkpoint(len(traj.stages) - 1, "end")


def assert_states_equal(a, b):
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("policy", ["reset", "carry"])
def test_filter_dropping_nothing_reproduces_the_final_model_bit_for_bit(runs, policy):
    traj = runs[policy]
    for stage in traj.names:
        result = filter_and_rerun(traj, stage, [])
        assert result.kind == "filter" and result.counts["skipped_steps"] == 0
        assert_states_equal(result.state, final_state(traj))


def test_filter_dropping_every_example_skips_the_steps_but_keeps_the_entry_actions(runs):
    traj = runs["reset"]
    everything = list(range(600))
    # pretrain and adapt only add adapters on entry (nothing to keep): the same as skipping.
    for stage in ("pretrain", "adapt"):
        result = filter_and_rerun(traj, stage, everything)
        assert result.counts["skipped_steps"] == 6 and result.counts["retrained_steps"] == (
            12 if stage == "pretrain" else 0
        )
        assert_states_equal(result.state, skip(traj, stage).state)
    # finetune re-initialises the head on entry: that stays, unlike in the skip.
    result = filter_and_rerun(traj, "finetune", everything)
    model = traj.load_model(1, "start")
    reinitialise(model, traj.stages[1].entry, "finetune")
    expected = retrain_after(traj, 1, snapshot(model), {})
    assert_states_equal(result.state, expected)
    assert not torch.equal(result.state["head.weight"], skip(traj, "finetune").state["head.weight"])


def test_filter_equals_an_independent_rerun_without_the_examples():
    cfg = toy.pipeline("mse", [SGD, SGD], ["reset", "carry"], [0.05, 0.03])
    traj = run_pipeline(PipelineSpec.from_dict(cfg), None)
    log = traj.steps(0)
    drop = [*log.batch(2).tolist(), 0, 1, 2, 3, 4]  # step 2's batch vanishes entirely
    result = filter_and_rerun(traj, "s0", drop)
    assert result.counts["skipped_steps"] == 1
    assert result.counts["dropped_examples"] == len(set(drop))
    assert result.counts["retrained_steps"] == 11 + 12
    torch.testing.assert_close(result.state, rerun_without(traj, drop), rtol=0, atol=1e-12)


def rerun_without(traj, drop):
    """Stages s0, s1 of a toy run retrained with torch.optim, ``drop`` removed from s0's
    batches (an emptied batch: no step); s1 carries s0's momentum buffers."""
    model = traj.load_model(0, "start")
    params = dict(model.named_parameters())
    optimizer = None
    for k, record in enumerate(traj.stages):
        log = traj.steps(k)
        groups = [{"params": [params[n] for n in g.params], **g.hyper} for g in record.groups]
        previous, optimizer = optimizer, torch.optim.SGD(groups)
        if previous is not None:
            optimizer.state.update(previous.state)
        x, y = record.data.call().tensors
        for t in range(log.num_steps):
            batch = [i for i in log.batch(t).tolist() if k or i not in drop]
            if not batch:
                continue
            for group, lr in zip(optimizer.param_groups, log.lr[t].tolist(), strict=True):
                group["lr"] = lr
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return {n: v.detach() for n, v in model.state_dict().items()}


def test_undo_with_the_exact_last_stage_embedding_equals_the_skip(runs):
    traj = runs["carry"]
    embeddings = E0().embed(traj)
    undone = undo(traj, embeddings, "adapt")
    assert undone.kind == "undo" and undone.seconds >= 0
    assert_states_equal(undone.state, skip(traj, "adapt").state)
    # The adapter added by adapt is back at its function-preserving start (B = 0).
    assert (undone.state["fc1.lora_B"] == 0).all()


def test_filtering_the_most_harmful_examples_lowers_the_loss_they_raised():
    cfg = toy.pipeline("mse", [{"type": "sgd"}, {"type": "sgd"}], ["reset", "reset"], [0.1, 0.02])
    cfg["stages"]["s0"].update(
        data={"target": f"{HERE}:mislabelled", "kwargs": {}}, batch_size=32, steps=80
    )
    traj = run_pipeline(PipelineSpec.from_dict(cfg), None)
    x, y = toy.regression(n=64, seed=8).tensors
    model = traj.build_model(1)

    def clean_loss(params):
        return torch.nn.functional.mse_loss(functional_call(model, params, (x,)), y)

    scores = example_scores(traj, "s0", clean_loss)
    harmful = most_harmful(scores, 2 / 32)
    assert sorted(harmful.tolist()) == [0, 1]
    before = float(clean_loss(final_state(traj)))
    filtered = float(clean_loss(filter_and_rerun(traj, "s0", harmful).state))
    control = float(
        clean_loss(filter_and_rerun(traj, "s0", random_drop(scores.uses, 2 / 32, 0)).state)
    )
    assert filtered < 0.5 * before and filtered < control


def test_most_harmful_ranks_only_used_examples_and_random_drop_matches_its_size():
    scores = ExampleScores(
        "s",
        torch.tensor([-1.0, -2.0, 0.0, -3.0, 4.0], dtype=torch.float64),
        torch.tensor([1, 2, 0, 1, 3]),
        0.0,
    )
    # The unused example 2 (score 0) is never chosen, though it outranks the negative ones.
    assert most_harmful(scores, 0.75).tolist() == [4, 0, 1]
    assert most_harmful(scores, 0.01).tolist() == [4]
    assert most_harmful(scores, 1).tolist() == [4, 0, 1, 3]
    uses = torch.zeros(100, dtype=torch.int64)
    uses[::2] = 1
    picked = random_drop(uses, 0.1, seed=3)
    assert len(picked) == 5 and (uses[picked] > 0).all() and len(picked.unique()) == 5
    assert torch.equal(picked, random_drop(uses, 0.1, seed=3))
    assert not torch.equal(picked, random_drop(uses, 0.1, seed=4))


def test_bad_inputs_name_the_problem_and_the_fix(runs):
    traj = runs["reset"]
    with pytest.raises(SpecError, match=r"drop.*600.*\[0, 600\)"):
        filter_and_rerun(traj, "pretrain", [3, 600])
    with pytest.raises(SpecError, match="drop"):
        filter_and_rerun(traj, "pretrain", [-1])
    with pytest.raises(SpecError, match="integer"):
        filter_and_rerun(traj, "pretrain", [1.5])
    with pytest.raises(UnknownStageError):
        filter_and_rerun(traj, "nope", [])
    scores = ExampleScores("s", torch.zeros(3, dtype=torch.float64), torch.ones(3), 0.0)
    for fraction in (0, 1.5, -0.1, True, "half"):
        with pytest.raises(SpecError, match=r"fraction.*\(0, 1\]"):
            most_harmful(scores, fraction)
        with pytest.raises(SpecError, match="fraction"):
            random_drop(scores.uses, fraction, seed=0)
    with pytest.raises(StagetraceError, match="no example"):
        most_harmful(ExampleScores("s", torch.zeros(2), torch.zeros(2), 0.0), 0.5)
    partial = E0().embed(traj)
    partial = type(partial)(partial.estimator, {}, {"adapt": partial.offsets["adapt"]}, 0.0)
    with pytest.raises(StagetraceError, match="no offset for stage 'pretrain'"):
        undo(traj, partial, "pretrain")
