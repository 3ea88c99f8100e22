"""Single-arm subset replay: the truth at budget 1, the allocation rule in closed form, seeded,
and its cost in replayed examples."""

import math

import pytest
import torch
import torch.nn.functional as F

from attribution.record.counterfactual import skip_stage
from attribution.record.errors import SpecError
from attribution.record.optim import load_state_by_name
from attribution.record.pipeline import carried_state, continue_stage, reinitialise, run_pipeline
from attribution.record.spec import PipelineSpec
from estimators import build
from estimators.base import final_buffer_names, final_parameter_names
from estimators.subset import Subset, SubsetArguments, allocate, subset_schedule
from experiments.data import mnist
from tests.attribution import tiny


def three_stage(policy: str = "reset", adam: bool = False):
    """The tiny three-stage run (SGD with momentum, Nesterov later); with ``adam``, AdamW with
    gradient clipping in the later stages."""
    config = tiny.three_stage(policy)
    if adam:  # Adam in the later stages, with clipping: its state comes from the replay too
        for name in ("finetune", "adapt"):
            config["stages"][name]["optimizer"] = dict(tiny.ADAMW)
            config["stages"][name]["lr"] = 1e-2
            config["stages"][name]["clip_grad_norm"] = 0.5
    return run_pipeline(PipelineSpec.from_dict(config), None)


@pytest.mark.parametrize("policy,adam", [("reset", False), ("carry", False), ("reset", True)])
def test_budget_one_is_the_ground_truth_bit_for_bit(policy, adam):
    traj = three_stage(policy, adam)
    embeddings = Subset(budget=1.0).embed(traj)
    last = len(traj.stages) - 1
    final = traj.checkpoint(last, "end")
    names = [*final_parameter_names(traj), *final_buffer_names(traj)]
    for stage in traj.names[:-1]:
        skipped = skip_stage(traj, stage).state
        for name in names:
            expected = skipped[name].double() - final[name].double()
            assert torch.equal(embeddings.offsets[stage][name], expected), (stage, name)
    # the last stage: its exact displacement, start minus end
    start = traj.checkpoint(last, "start")
    for name, value in embeddings.offsets[traj.names[-1]].items():
        assert torch.equal(value, start[name].double() - final[name].double())


def test_allocation_follows_the_square_root_of_the_rate_in_closed_form():
    # w = sqrt(lr) = [0.2, 0.1, 0, 0.3]; 12 examples at c = 20: [4, 2, 0, 6]
    assert allocate([10, 10, 10, 10], [0.2, 0.1, 0.0, 0.3], 12) == [4, 2, 0, 6]
    # water-filling: at c = 14 / 0.6 step 3 would take 7 > 4, so it is full and the other two
    # share 14 - 4 = 10 in proportion 2:1: 6.67 and 3.33 -> 7 and 3 (largest remainder)
    assert allocate([10, 10, 4], [0.2, 0.1, 0.3], 14) == [7, 3, 4]
    # a budget covering every example gives every step its whole batch, zero weight or not
    assert allocate([5, 7, 3], [0.0, 1.0, 2.0], 15) == [5, 7, 3]
    counts = allocate([64] * 50, [math.sqrt(0.01 * (1 + t % 5)) for t in range(50)], 800)
    assert sum(counts) == 800 and all(0 <= n <= 64 for n in counts)
    # uniform: a quarter of every batch
    assert allocate([64, 32, 32], [64.0, 32.0, 32.0], 32) == [16, 8, 8]


@pytest.mark.parametrize("budget", [0.01, 0.4])
def test_subsets_follow_the_rule_keep_the_rates_and_drop_empty_steps(budget):
    traj = three_stage()
    later = [(traj.stages[j], traj.steps(j)) for j in (1, 2)]
    recorded = [(s, t) for _, s in later for t in range(s.num_steps)]
    rates = torch.cat([s.lr.mean(1) for _, s in later])
    sizes = [len(s.batch(t)) for s, t in recorded]
    expected = allocate(sizes, rates.sqrt().tolist(), round(budget * sum(sizes)))
    # 4 examples at budget 0.01: one each to four steps of adapt (rate 0.05 > finetune's 0.02)
    assert (0 in expected) == (budget == 0.01)
    if budget == 0.01:
        assert expected == [0] * 6 + [1, 1, 1, 1, 0, 0]
    subsets = subset_schedule(later, SubsetArguments(budget=budget), 0)
    cut = [(s, i) for (_, s) in subsets for i in range(s.num_steps)]
    kept = [(steps, t, n) for (steps, t), n in zip(recorded, expected, strict=True) if n > 0]
    assert len(cut) == len(kept)  # steps allotted nothing are dropped
    for (steps, t, n), (log, i) in zip(kept, cut, strict=True):
        batch = log.batch(i)
        assert len(batch) == n and len(set(batch.tolist())) == n
        assert set(batch.tolist()) <= set(steps.batch(t).tolist())  # a subset of its batch
        assert torch.equal(log.lr[i], steps.lr[t])  # with its own rate
    for (record, _), (cut_record, log) in zip(later, subsets, strict=True):
        assert cut_record.num_steps == log.num_steps and cut_record.groups == record.groups


def test_the_seed_makes_it_deterministic_and_the_cost_matches_the_budget():
    traj = three_stage()
    a, b = Subset(budget=0.25, seed=3).embed(traj), Subset(budget=0.25, seed=3).embed(traj)
    other = Subset(budget=0.25, seed=4).embed(traj)
    stage = traj.names[0]
    assert all(torch.equal(a.offsets[stage][n], b.offsets[stage][n]) for n in a.offsets[stage])
    assert any(
        not torch.equal(a.offsets[stage][n], other.offsets[stage][n]) for n in a.offsets[stage]
    )
    # later examples: finetune 6 + adapt 6 steps of 32 after pretrain, adapt's 6 after finetune
    truth_examples = (12 + 6) * 32
    assert a.counts["examples"] == round(0.25 * 12 * 32) + round(0.25 * 6 * 32)
    assert a.counts["examples"] == pytest.approx(0.25 * truth_examples, abs=1)
    assert Subset(budget=1.0).embed(traj).counts["examples"] == truth_examples


def test_settings_are_typed_and_refused_with_a_fix():
    assert build("subset:0.5").arguments.budget == 0.5
    assert build("subset").label == "subset:0.25"
    assert build("subset", {"allocation": "uniform"}).label == "subset:0.25(allocation=uniform)"
    for bad in (
        {"budget": 0},
        {"budget": 1.5},
        {"allocation": "random"},
        {"seed": -1},
        {"merge": 0},
        {"merge": 1.5},
    ):
        with pytest.raises(SpecError, match="Fix"):
            Subset(**bad)
    for bad in ("adapt", 3, [1]):
        with pytest.raises(SpecError, match="Fix"):
            Subset(exact=bad)


def test_stages_named_exact_are_the_truth_and_the_others_the_same_replay():
    traj = three_stage()
    first, second, _ = traj.names
    mixed = Subset(budget=0.25, exact=[second]).embed(traj)
    plain = Subset(budget=0.25).embed(traj)
    final = traj.checkpoint(len(traj.stages) - 1, "end")
    skipped = skip_stage(traj, second).state
    for name, value in mixed.offsets[second].items():
        assert torch.equal(value, skipped[name].double() - final[name].double())
    for name, value in mixed.offsets[first].items():
        assert torch.equal(value, plain.offsets[first][name])
    assert mixed.counts["examples"] == round(0.25 * 12 * 32)  # the first stage's replay only
    assert build("subset", {"exact": [second]}).label == f"subset:0.25(exact={second})"
    with pytest.raises(SpecError, match="not stages of this run"):
        Subset(exact=["nowhere"]).embed(traj)


@pytest.mark.parametrize("adam", [False, True])
def test_merged_steps_share_one_gradient_as_the_optimizer_would_take_it(adam):
    """A stage replayed with merge=4 (its 6 steps: a block of 4, then one of 2) against the same
    thing written with torch.optim: one gradient on the block's examples, then the optimizer's
    own step once per step with that step's rate. Nesterov SGD runs in closed form (float32
    rounding apart); AdamW steps one by one, bit for bit."""
    traj = three_stage("reset" if adam else "carry", adam)
    record, steps = traj.stages[1], traj.steps(1)
    previous = traj.optimizer_state(0, "end")
    mine = traj.load_model(1, "start")
    continue_stage(mine, record, steps, previous, merge=4)

    model = traj.load_model(1, "start")
    reinitialise(model, record.entry, record.name)
    params = dict(model.named_parameters())
    hyper = {k: v for k, v in record.groups[0].hyper.items() if k != "lr"}
    cls = torch.optim.AdamW if adam else torch.optim.SGD
    optimizer = cls([params[n] for n in record.groups[0].params], lr=0.0, **hyper)
    load_state_by_name(
        optimizer, carried_state(previous, record, model), {id(p): n for n, p in params.items()}
    )
    inputs, targets = mnist(stop=600).tensors[:2]
    torch.manual_seed(record.seed)
    for block in (range(0, 4), range(4, 6)):
        rows = torch.cat([steps.batch(t) for t in block])
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs[rows]), targets[rows])
        loss.backward()
        if record.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(params.values()), record.clip_grad_norm)
        for t in block:
            optimizer.param_groups[0]["lr"] = float(steps.lr[t, 0])
            optimizer.step()
    for name, value in model.state_dict().items():
        if adam:
            assert torch.equal(mine.state_dict()[name], value), name
        else:
            torch.testing.assert_close(mine.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    assert not torch.equal(mine.state_dict()["fc1.weight"], traj.checkpoint(1, "end")["fc1.weight"])


def test_merge_shares_gradients_and_counts_them():
    traj = three_stage()
    plain, merged = Subset(budget=0.5).embed(traj), Subset(budget=0.5, merge=4).embed(traj)
    assert merged.counts["examples"] == plain.counts["examples"]  # the same examples
    assert merged.counts["replayed_steps"] == plain.counts["replayed_steps"]
    # later steps: finetune 6 + adapt 6 after pretrain (blocks of 4: 2 + 2), adapt 6 after
    # finetune (2): 6 gradients instead of 18
    assert (plain.counts["gradients"], merged.counts["gradients"]) == (18, 6)
    assert build("subset", {"merge": 2}).label == "subset:0.25(merge=2)"
    stage = traj.names[0]
    assert any(
        not torch.equal(plain.offsets[stage][n], merged.offsets[stage][n])
        for n in plain.offsets[stage]
    )


def test_replicas_average_independent_replays_and_are_stored_for_the_check(tmp_path):
    traj = three_stage()
    averaged = Subset(budget=0.25, replicas=3, seed=5).embed(traj)
    singles = [Subset(budget=0.25, seed=5 + i).embed(traj) for i in range(3)]
    for stage, offset in averaged.offsets.items():
        for name, value in offset.items():
            mean = (singles[0].offsets[stage][name] + singles[1].offsets[stage][name]) + singles[
                2
            ].offsets[stage][name]
            torch.testing.assert_close(value, mean / 3, rtol=0, atol=1e-15)
    assert averaged.counts["examples"] == 3 * singles[0].counts["examples"]
    assert build("subset", {"replicas": 2}).label == "subset:0.25(replicas=2)"
    assert Subset(replicas=2, seed=4).replica(1).settings() == Subset(seed=5).settings()
