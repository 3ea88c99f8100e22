"""``--estimator auto`` and the reliability labels (``attribution.analysis.choice``): the truth
when it fits the budget, an estimate with a label otherwise, never an estimate without one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attribution.analysis import choice
from attribution.analysis.audit import audit, load_behaviors
from attribution.analysis.choice import LABELS, plan
from attribution.analysis.cli import main
from attribution.record.counterfactual import as_model, skip_stage
from attribution.record.recorder import Recorder
from attribution.record.references import Ref
from attribution.record.trajectory import Trajectory
from estimators import build
from experiments.data import mnist
from experiments.models import MLP

TEST = {"target": "experiments.data:mnist", "kwargs": {"split": "test", "stop": 100}}
BEHAVIORS = f"""\
test_loss: {{data: {json.dumps(TEST)}, quantity: loss}}
halves:
  data: {json.dumps(TEST)}
  aggregate: group_gap
  groups: {{low: [0, 1, 2, 3, 4], high: [5, 6, 7, 8, 9]}}
  gap: [low, high]
"""


@pytest.fixture
def behaviors(tmp_path: Path) -> dict:
    path = tmp_path / "behaviours.yaml"
    path.write_text(BEHAVIORS)
    return load_behaviors(path)


FIXED = 0.05
"""The share of a step's seconds that does not shrink with its batch, in the fixture below."""


def step_model(fixed: float):
    """A training step on a share f of its batch, m steps to a gradient, takes
    10 ms x (fixed / m + (1 - fixed) f)."""
    return lambda traj, j, fraction=1.0, merge=1: 0.01 * (fixed / merge + (1 - fixed) * fraction)


def replay_share(fixed: float = FIXED) -> float:
    """The audit's subset replay (its replicas) in the truth's steps, under
    ``step_model(fixed)``."""
    share, m = choice.SUBSET_BUDGET, choice.SUBSET_MERGE
    return choice.SUBSET_REPLICAS * (fixed / m + (1 - fixed) * share)


@pytest.fixture
def per_step(monkeypatch) -> float:
    """Each full training step is predicted to take 10 ms (a twentieth of it whatever the
    batch), so predictions do not depend on load."""
    monkeypatch.setattr(choice, "step_seconds", step_model(FIXED))
    return 0.01


def predicted_truth(traj: Trajectory, per_step: float) -> float:
    steps = [r.num_steps for r in traj.stages]
    return per_step * sum(sum(steps[k + 1 :]) for k in range(len(steps)))


def test_a_subset_replay_is_predicted_from_steps_on_its_share_of_the_batches(run_copy, per_step):
    traj = Trajectory.open(run_copy, cache=False)
    truth = predicted_truth(traj, per_step)
    decided = plan(traj, budget=0.8 * truth)
    assert decided.predicted_seconds[choice.SUBSET] == pytest.approx(truth * replay_share())


def test_where_steps_cost_the_same_whatever_their_batch_no_subset_replay_is_chosen(
    run_copy, monkeypatch
):
    monkeypatch.setattr(choice, "step_seconds", lambda traj, j, fraction=1.0, merge=1: 0.01)
    traj = Trajectory.open(run_copy, cache=False)
    truth = predicted_truth(traj, 0.01)
    decided = plan(traj, budget=0.99 * truth)
    expected = choice.SUBSET_REPLICAS * truth  # every replica pays every step in full
    assert decided.predicted_seconds[choice.SUBSET] == pytest.approx(expected)
    assert decided.estimator == "e1" and "subset replays" in decided.reason


def test_auto_answers_with_the_truth_when_it_fits_the_budget(run_copy, behaviors, per_step):
    traj = Trajectory.open(run_copy)
    result = audit(traj, "auto", behaviors)
    assert result.plan.estimator == "truth"
    assert result.plan.predicted_seconds["truth"] == pytest.approx(predicted_truth(traj, per_step))
    assert {label.label for label in result.labels.values()} == {"exact"}
    x, y = mnist(split="test", stop=100).tensors
    final = as_model(traj, traj.checkpoint(len(traj.stages) - 1, "end")).eval()
    for stage in traj.names:
        without = as_model(traj, skip_stage(traj, stage).state).eval()
        with torch.no_grad():
            truth = F.cross_entropy(final(x), y, reduction="none") - F.cross_entropy(
                without(x), y, reduction="none"
            )
        got = torch.tensor(result.behaviors["test_loss"].effects[stage], dtype=torch.float64)
        torch.testing.assert_close(got, truth.double(), rtol=0, atol=1e-6)


def test_over_budget_a_subset_replay_is_labelled_by_its_independent_replicas(
    run_copy, behaviors, per_step
):
    traj = Trajectory.open(run_copy, cache=False)
    subset = plan(traj, 0.0).predicted_seconds[choice.SUBSET]
    result = audit(traj, "auto", behaviors, budget=1.01 * subset)  # the truth for no stage fits
    assert result.plan.estimator == choice.SUBSET
    assert result.plan.settings == {**choice.SUBSET_SETTINGS, "exact": []}
    estimator = build(choice.SUBSET, result.plan.settings)
    assert result.estimator.label == estimator.label == "subset:0.25(merge=2, replicas=2)"
    assert "--budget" in result.plan.better
    # the agreement is the Pearson of the two replicas' per-example effects, each audited alone
    loss = {"test_loss": behaviors["test_loss"]}
    alone = [audit(traj, estimator.replica(i), loss).behaviors["test_loss"] for i in (0, 1)]
    *earlier, last = traj.names
    assert result.labels[last].label == "exact"
    for stage in earlier:
        label = result.labels[stage]
        assert label.label in LABELS[1:] and -1 <= label.agreement <= 1
        expected = (
            "reliable"
            if label.agreement >= choice.RELIABLE_AGREEMENT
            else "uncertain"
            if label.agreement >= choice.UNCERTAIN_AGREEMENT
            else "unreliable"
        )
        assert label.label == expected and f"{label.agreement:.2f}" in label.evidence
        first, second = (np.array(a.effects[stage]) for a in alone)
        assert label.agreement == pytest.approx(np.corrcoef(first, second)[0, 1], abs=1e-9)


def test_below_every_replay_e1_answers_and_says_it_is_unreliable(run_copy, behaviors, per_step):
    traj = Trajectory.open(run_copy, cache=False)
    result = audit(traj, "auto", behaviors, budget=0.0)
    assert result.plan.estimator == "e1"
    assert [result.labels[s].label for s in traj.names] == ["unreliable", "unreliable", "exact"]


@pytest.mark.parametrize("estimator", ["e0", "e1", "e4:2", "subset:0.5"])
@pytest.mark.parametrize("readout", ["evaluated", "linear"])
def test_no_estimate_is_ever_given_without_a_label(run_copy, behaviors, estimator, readout):
    traj = Trajectory.open(run_copy, cache=False)
    result = audit(traj, estimator, behaviors, readout)
    assert set(result.labels) == set(traj.names)
    assert all(label.label in LABELS and label.evidence for label in result.labels.values())
    last = result.labels[traj.names[-1]].label
    assert last == ("exact" if readout == "evaluated" else "uncertain")
    assert "labels" in result.to_json()


def test_without_a_replayable_record_auto_says_what_is_missing(tmp_path, behaviors):
    model = MLP(hidden=[8])
    recorder = Recorder(None, model, Ref("experiments.models:MLP", {"hidden": [8]}))
    x, y = mnist(stop=64).tensors
    with recorder.stage(
        "only",
        kind="finetune",
        seed=0,
        data=Ref("experiments.data:mnist", {"stop": 64}),
        log_batches=False,
    ) as stage:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        stage.attach(optimizer)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    traj = recorder.finish()
    decided = plan(traj, budget=1e9)
    assert decided.estimator == "e1" and "batch indices" in decided.reason
    assert "record the batch order" in decided.better


def test_the_command_line_says_what_it_chose_and_labels_every_stage(run_copy, tmp_path, capsys):
    (run_copy / "behaviors.yaml").write_text(BEHAVIORS)
    assert main(["audit", str(run_copy), "--budget", "0", "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("method: e1. Why: retraining")
    assert "unreliable" in out and "a better answer: a budget of" in out
    assert main(["audit", str(run_copy)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("method: truth. Why: retraining without each stage is predicted")
    written = json.loads((run_copy / "attribution.json").read_text())
    assert written["plan"]["estimator"] == "truth"
    assert {v["label"] for v in written["labels"].values()} == {"exact"}


def test_a_check_replay_that_diverges_labels_the_estimates_unreliable(
    run_copy, behaviors, monkeypatch
):
    from attribution.record.errors import TrainingError
    from estimators import subset

    traj = Trajectory.open(run_copy, cache=False)  # nothing stored: every replay runs
    real = subset.Subset.offsets

    def diverging(self, traj, counts):  # the estimate's own replay runs; the check's does not
        if self.arguments.seed > 0:
            raise TrainingError("stage 'adapt' step 3: the loss is nan. Fix: lower the rate")
        return real(self, traj, counts)

    monkeypatch.setattr(subset.Subset, "offsets", diverging)
    labels = audit(traj, "subset:0.5", behaviors).labels
    for stage in traj.names[:-1]:
        assert labels[stage].label == "unreliable" and "diverged" in labels[stage].evidence


def test_the_later_stages_whose_retraining_fits_are_exact_beside_a_subset_replay(
    run_copy, behaviors, per_step
):
    traj = Trajectory.open(run_copy, cache=False)
    first, second, _ = traj.names
    steps = [r.num_steps for r in traj.stages]
    check = replay_share()
    retrain_second = per_step * steps[2]
    replay_first = per_step * (steps[1] + steps[2]) * check
    budget = 1.01 * (retrain_second + replay_first)
    assert budget < predicted_truth(traj, per_step)  # the premise: the whole truth does not fit
    decided = plan(traj, budget)
    merged = {**choice.SUBSET_SETTINGS, "exact": [second]}
    assert (decided.estimator, dict(decided.settings)) == (choice.SUBSET, merged)
    assert f"retraining without {second}" in decided.reason
    result = audit(traj, "auto", behaviors, budget=budget)
    assert result.labels[second].label == "exact" and "the truth" in result.labels[second].evidence
    assert result.labels[first].label in LABELS[1:] and result.labels[first].agreement is not None
    truth = audit(traj, "truth", behaviors)
    assert (
        result.behaviors["test_loss"].effects[second]
        == truth.behaviors["test_loss"].effects[second]
    )
    assert result.to_json()["plan"]["settings"] == merged


@pytest.mark.parametrize("merge", [1, 2])
def test_step_seconds_charges_each_step_its_share_of_a_merged_run(run_copy, monkeypatch, merge):
    """On a clock where a gradient (one run of ``merge`` steps, which report together at its
    end) takes 1 s whatever its batch, and the first run 10 s (warm-up, not counted), a step
    costs 1 / merge s; ``probe`` whole runs are replayed, as many as the stage's 5 steps hold."""
    from attribution.record import pipeline

    clock, runs = [0.0], []

    def fake_stage(model, record, steps, previous, on_step, merge=1):
        runs.append(steps.num_steps)
        for first in range(0, steps.num_steps, merge):
            clock[0] += 10.0 if first == 0 else 1.0
            for t in range(first, min(first + merge, steps.num_steps)):
                on_step(record.name, t, steps.num_steps, 0.0)

    monkeypatch.setattr(pipeline, "continue_stage", fake_stage)
    monkeypatch.setattr(pipeline.time, "perf_counter", lambda: clock[0])
    traj = Trajectory.open(run_copy, cache=False)
    assert traj.stages[1].num_steps == 5
    assert pipeline.step_seconds(traj, 1, probe=3, merge=merge) == pytest.approx(1 / merge)
    assert runs == [{1: 3, 2: 4}[merge]]
