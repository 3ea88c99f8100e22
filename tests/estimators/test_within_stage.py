"""Within-stage example scores against independent truth: central finite differences, in one
example's loss weight, of retraining written here with torch.optim (float64, tiny problems)."""

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

from attribution.record.errors import StagetraceError, UnknownStageError
from attribution.record.pipeline import add_adapters, reinitialise, run_pipeline
from attribution.record.spec import PipelineSpec
from estimators.within_stage import example_scores, example_uses
from tests.estimators import toy

SGD = {"type": "sgd", "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.05}
NESTEROV = {"type": "sgd", "momentum": 0.8, "nesterov": True, "weight_decay": 0.02}
ADAM = {"type": "adam", "weight_decay": 0.01}
ADAMW = {"type": "adamw", "weight_decay": 0.1}
OPTIMIZERS = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
HERE = "tests.estimators.test_within_stage"
PROBE = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64).unsqueeze(0)
PROBE_TARGET = (PROBE @ torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)).reshape(1)
Additive = toy.Additive


class Tanh(nn.Module):
    """A float64 tanh network with a ``head`` to re-initialise: nonlinear in its parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 6, dtype=torch.float64)
        self.head = nn.Linear(6, 1, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def planted(n: int = 32) -> TensorDataset:
    """Clean linear targets, except example 0: the probe input with a far-off target.
    Example 1 is the probe input with its clean target."""
    x, y = toy.regression(n=n, seed=3).tensors
    x[0], x[1] = PROBE[0], PROBE[0]
    y[0], y[1] = PROBE_TARGET + 5.0, PROBE_TARGET
    return TensorDataset(x, y)


def config(optimizers, policies, lrs, model="Tanh", data=None, steps=6, batch_size=16, entry=()):
    stages = {}
    for i, (optimizer, policy, lr) in enumerate(zip(optimizers, policies, lrs, strict=True)):
        stages[f"s{i}"] = {
            "kind": "pretrain" if i == 0 else "finetune",
            "data": data or {"target": "tests.estimators.toy:regression", "kwargs": {"seed": i}},
            "loss": "mse",
            "optimizer": optimizer,
            "lr": lr,
            "batch_size": batch_size,
            "steps": steps,
            "seed": 10 + i,
            "optimizer_policy": policy,
            "schedule": {"name": "cosine"},
            "entry": list(entry[i]) if entry else [],
        }
    return {"model": {"target": f"{HERE}:{model}", "kwargs": {}}, "stages": stages}


def record(*args, **kwargs):
    return run_pipeline(PipelineSpec.from_dict(config(*args, **kwargs)), None)


def held_out_loss(traj):
    x, y = toy.regression(n=24, seed=99, shift=0.3).tensors
    model = traj.build_model(len(traj.stages) - 1)
    return lambda params: (functional_call(model, params, (x,)) - y).square().mean()


def retrain_weighted(traj, k, weights):
    """Final parameters of stages k..K trained with torch.optim, example z of stage k's loss
    weighted by ``weights[z]`` (batch loss: sum of w_z * loss_z over the batch, / |B|)."""
    model = traj.load_model(k, "start")
    optimizer = None
    for j in range(k, len(traj.stages)):
        record_j, log = traj.stages[j], traj.steps(j)
        if j > k:
            add_adapters(model, record_j.entry, record_j.name)
        reinitialise(model, record_j.entry, record_j.name)
        params = dict(model.named_parameters())
        groups = [{"params": [params[n] for n in g.params], **g.hyper} for g in record_j.groups]
        previous, optimizer = optimizer, OPTIMIZERS[record_j.optimizer](groups)
        if j == k:
            for name, slots in traj.optimizer_state(k, "start").items():
                optimizer.state[params[name]] = {s: v.clone() for s, v in slots.items()}
        elif record_j.optimizer_policy == "carry":
            for p in (params[n] for n in record_j.trainable):
                if p in previous.state:
                    optimizer.state[p] = previous.state[p]
        x, y = record_j.data.call().tensors
        w = weights if j == k else torch.ones(len(y), dtype=torch.float64)
        for t in range(log.num_steps):
            batch = log.batch(t)
            for group, lr in zip(optimizer.param_groups, log.lr[t].tolist(), strict=True):
                group["lr"] = lr
            optimizer.zero_grad()
            losses = (model(x[batch]) - y[batch]).square().mean(1)
            ((w[batch] * losses).sum() / len(batch)).backward()
            optimizer.step()
    return {n: p.detach() for n, p in model.named_parameters()}


def finite_difference(traj, k, f, z, eps=1e-4):
    n = len(traj.stages[k].data.call())
    values = []
    for sign in (1, -1):
        weights = torch.ones(n, dtype=torch.float64)
        weights[z] += sign * eps
        values.append(float(f(retrain_weighted(traj, k, weights))))
    return (values[0] - values[1]) / (2 * eps)


def checked_examples(scores):
    """The two largest |scores|, and a small one, among used examples."""
    used = scores.used
    order = torch.argsort(scores.scores[used].abs(), descending=True)
    return [int(used[i]) for i in (order[0], order[1], order[len(order) // 2])]


@pytest.mark.parametrize(
    "optimizers,policies",
    [
        ([SGD, NESTEROV, SGD], ["reset", "carry", "reset"]),
        ([ADAM, ADAM, ADAMW], ["reset", "carry", "reset"]),
    ],
    ids=["sgd-momentum-decay", "adam"],
)
@pytest.mark.parametrize("k", [0, 1, 2])
def test_scores_are_the_derivative_of_retraining_in_an_example_weight(optimizers, policies, k):
    # s1 carries s0's optimizer state; s2 re-initialises the head (its adjoint restarts at 0).
    entry = [[], [], [{"kind": "reinit", "modules": ["head"]}]]
    traj = record(optimizers, policies, [0.05, 0.04, 0.03], entry=entry)
    f = held_out_loss(traj)
    scores = example_scores(traj, k, f)
    assert scores.stage == f"s{k}" and scores.scores.dtype == torch.float64
    for z in checked_examples(scores):
        truth = finite_difference(traj, k, f, z)
        assert scores.scores[z].item() == pytest.approx(truth, rel=1e-5, abs=1e-10)
    assert scores.counts["jvps"] == 6 and scores.counts["steps"] == 6 * (3 - k)


def test_unused_examples_score_zero_and_uses_count_the_batches():
    traj = record([SGD], ["reset"], [0.05], steps=3)
    scores = example_scores(traj, "s0", held_out_loss(traj))
    log = traj.steps(0)
    counted = torch.zeros(64, dtype=torch.int64)
    for t in range(log.num_steps):
        for i in log.batch(t).tolist():
            counted[i] += 1
    assert torch.equal(scores.uses, counted) and torch.equal(example_uses(traj, 0), counted)
    unused = counted == 0
    assert unused.sum() == 16 and (scores.scores[unused] == 0).all()
    assert (scores.scores[~unused] != 0).all()


def test_sign_a_mislabelled_example_that_raises_the_loss_scores_positive():
    data = {"target": f"{HERE}:planted", "kwargs": {}}
    traj = record(
        [{"type": "sgd"}], ["reset"], [0.1], model="Additive", data=data, steps=150, batch_size=32
    )
    model = traj.build_model(0)

    def probe_loss(params):
        return (functional_call(model, params, (PROBE,)) - PROBE_TARGET).square().sum()

    scores = example_scores(traj, 0, probe_loss)
    without = {}
    for z in (0, 1):
        weights = torch.ones(32, dtype=torch.float64)
        weights[z] = 0.0
        without[z] = float(probe_loss(retrain_weighted(traj, 0, weights)))
    with_all = float(probe_loss(retrain_weighted(traj, 0, torch.ones(32, dtype=torch.float64))))
    # Removing the mislabelled example 0 lowers the probe's loss: f(with) - f(without) > 0.
    assert with_all - without[0] > 0 and scores.scores[0] > 0
    # Removing the clean copy of the probe (example 1) raises it: negative.
    assert with_all - without[1] < 0 and scores.scores[1] < 0
    assert scores.scores[0] == scores.scores.max()


def test_unknown_stage_and_losses_without_a_per_example_form_are_refused():
    cfg = config([SGD], ["reset"], [0.05], model="Additive")
    cfg["stages"]["s0"]["loss"] = "tests.estimators.toy:linear_loss"
    traj = run_pipeline(PipelineSpec.from_dict(cfg), None)
    f = held_out_loss(traj)
    with pytest.raises(UnknownStageError, match="nope"):
        example_scores(traj, "nope", f)
    with pytest.raises(StagetraceError, match="per_example_loss"):
        example_scores(traj, "s0", f)
    with pytest.raises(StagetraceError, match="mean"):
        example_scores(traj, "s0", f, lambda o, t: (o - t).square().flatten())
    scores = example_scores(traj, "s0", f, lambda o, t: -(o * t).mean(1))
    assert scores.scores.abs().sum() > 0
