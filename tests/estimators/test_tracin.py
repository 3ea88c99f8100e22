"""Stage TracIn against independent truth: hand-written margins of a model linear in theta,
reverse-mode gradients, and finite differences of single steps."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from attribution.record.errors import StagetraceError
from attribution.record.pipeline import run_pipeline
from attribution.record.recorder import Recorder
from attribution.record.references import Ref
from attribution.record.spec import PipelineSpec
from estimators.tracin import stage_tracin, tracin_effects
from experiments.data import mnist
from tests.attribution import tiny
from tests.estimators.toy import Additive

SGD = {"type": "sgd"}


def classes(n: int = 48, seed: int = 0) -> TensorDataset:
    """Two noisy linearly separable classes in 5 dimensions, float64 inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    noise = 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    return TensorDataset(x, (x @ torch.linspace(-1, 1, 5, dtype=torch.float64) + noise > 0).long())


def true_logit(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A training loss linear in the outputs, so in theta for ``Additive``."""
    return -outputs.gather(1, targets[:, None]).mean()


def stage(seed, lr=0.1, steps=6, optimizer=SGD, **extra):
    return {
        "data": {"target": "tests.estimators.test_tracin:classes", "kwargs": {"seed": seed}},
        "optimizer": optimizer,
        "lr": lr,
        "batch_size": 16,
        "steps": steps,
        "seed": seed,
        **extra,
    }


def record(**stages):
    model = {"target": "tests.estimators.toy:Additive", "kwargs": {"out_features": 2}}
    return run_pipeline(PipelineSpec.from_dict({"model": model, "stages": stages}), None)


TEST = classes(20, seed=99).tensors


def logits(state, x):
    w = state["body.weight"] + state["head.weight"]
    return x @ w.T + state["body.bias"] + state["head.bias"]


def margin(state, x, y):
    """True-class logit minus the other one, written out: linear in theta."""
    z = logits(state, x)
    return z.gather(1, y[:, None]).squeeze(1) - z.gather(1, (1 - y)[:, None]).squeeze(1)


def loss(state, x, y):
    return F.cross_entropy(logits(state, x), y, reduction="none")


def test_one_sgd_step_is_exact_for_a_margin_linear_in_theta():
    traj = record(only=stage(1, lr=0.3, steps=1))
    start, end = traj.checkpoint("only", "start"), traj.checkpoint("only", "end")
    effects = tracin_effects(traj, *TEST, "margin")
    truth = margin(end, *TEST) - margin(start, *TEST)
    assert truth.abs().min() > 1e-3
    torch.testing.assert_close(effects["only"], truth, rtol=1e-12, atol=1e-12)


def test_one_sgd_step_on_a_loss_is_its_first_order_change():
    errors = []
    for lr in (0.02, 0.002):
        traj = record(only=stage(1, lr=lr, steps=1))
        start, end = traj.checkpoint("only", "start"), traj.checkpoint("only", "end")
        effect = tracin_effects(traj, *TEST, "loss", batch_size=7)["only"]
        # closed form: -lr <grad f_i(theta_0), g_0>, both gradients by reverse mode
        theta = {n: v.clone().requires_grad_(True) for n, v in start.items()}
        x, y = classes(seed=1).tensors
        batch = traj.steps("only").batch(0)
        g = torch.autograd.grad(
            F.cross_entropy(logits(theta, x[batch]), y[batch]), list(theta.values())
        )
        closed = []
        for i in range(len(TEST[1])):
            grad_f = torch.autograd.grad(loss(theta, *TEST)[i], list(theta.values()))
            closed.append(-lr * sum((a * b).sum() for a, b in zip(grad_f, g, strict=True)))
        torch.testing.assert_close(effect, torch.stack(closed).detach(), rtol=1e-10, atol=1e-14)
        truth = loss(end, *TEST) - loss(start, *TEST)
        assert torch.equal(effect.sign(), truth.sign())  # effect < 0: the step lowered the loss
        error = float((effect - truth).abs().max())
        assert error < 0.02 * float(truth.abs().max())
        errors.append(error)
    assert 50 < errors[0] / errors[1] < 200  # second order: 10x smaller rate, 100x smaller error


@pytest.mark.parametrize("trainable", [["*"], ["head.*"]], ids=["all", "frozen-body"])
def test_every_step_checkpointed_sums_the_exact_per_step_changes(trainable):
    groups = [{"params": ["head.*"], "lr": 0.05}]
    schedule = {"name": "cosine"}
    optimizer = {**SGD, "groups": groups}
    every = dict(optimizer=optimizer, trainable=trainable, schedule=schedule, checkpoint_every=1)
    traj = record(only=stage(1, lr=0.4, steps=7, **every))
    assert traj.inner_steps("only") == [1, 2, 3, 4, 5, 6]
    start, end = traj.checkpoint("only", "start"), traj.checkpoint("only", "end")
    result = stage_tracin(traj, *TEST, "margin")
    assert result.checkpoints == {"only": 7} and result.seconds > 0
    truth = margin(end, *TEST) - margin(start, *TEST)
    torch.testing.assert_close(result.effects["only"], truth, rtol=1e-10, atol=1e-12)
    sparse = record(only=stage(1, lr=0.4, steps=7, **{**every, "checkpoint_every": None}))
    coarse = tracin_effects(sparse, *TEST, "margin")["only"]
    assert (coarse - truth).abs().max() > 1e-3 * truth.abs().max()


@pytest.mark.parametrize("every", [None, 3])
def test_learning_rate_mass_covers_the_steps_each_checkpoint_stands_for(every):
    """Full batches and a loss linear in theta: the gradient never changes, so each
    checkpoint's gradient times its groups' summed rates is the exact displacement."""
    settings = {
        "optimizer": {**SGD, "groups": [{"params": ["head.*"], "lr": 0.02}]},
        "schedule": {"name": "cosine"},
        "loss": "tests.estimators.test_tracin:true_logit",
        "batch_size": 48,
        "checkpoint_every": every,
    }
    traj = record(only=stage(1, lr=0.3, steps=8, **settings))
    start, end = traj.checkpoint("only", "start"), traj.checkpoint("only", "end")
    result = stage_tracin(traj, *TEST, "margin")
    assert result.checkpoints == {"only": 1 if every is None else 3}
    truth = margin(end, *TEST) - margin(start, *TEST)
    torch.testing.assert_close(result.effects["only"], truth, rtol=1e-10, atol=1e-12)


def test_the_first_checkpoint_is_the_state_after_the_entry_reinitialisation():
    reinit = [{"kind": "reinit", "modules": ["head"]}]
    traj = record(
        first=stage(1, steps=3),
        second=stage(2, lr=0.2, steps=4, entry=reinit, checkpoint_every=1),
    )
    start, end = traj.checkpoint("second", "start"), traj.checkpoint("second", "end")
    model = Additive(out_features=2)
    model.load_state_dict(start)
    with torch.random.fork_rng(devices=[]):  # the documented reinit: seed = stage seed + 1000
        torch.manual_seed(2 + 1000)
        model.head.reset_parameters()
    entered = {n: v.detach() for n, v in model.state_dict().items()}
    effect = tracin_effects(traj, *TEST, "margin")["second"]
    truth = margin(end, *TEST) - margin(entered, *TEST)
    torch.testing.assert_close(effect, truth, rtol=1e-10, atol=1e-12)
    assert (effect - (margin(end, *TEST) - margin(start, *TEST))).abs().max() > 1e-2


def test_lora_stage_matches_reverse_mode_first_order_sum():
    """On a float32 MLP with a LoRA stage (base frozen): TracIn with every step checkpointed
    equals sum_t <grad f_i(theta_t), theta_{t+1} - theta_t> from reverse-mode gradients."""
    lora = [{"kind": "add_lora", "modules": ["fc1"], "rank": 2}]
    cfg = tiny.config(
        pretrain=tiny.stage("pretrain", 1, tiny.SGD_MOMENTUM, 0.05, checkpoint_every=2),
        finetune=tiny.stage("finetune", 2, tiny.ADAMW, 1e-3, steps=3),
        adapt=tiny.stage(
            "adapt", 3, SGD, 0.5, steps=4, trainable=["*.lora_*"], entry=lora, checkpoint_every=1
        ),
    )
    traj = run_pipeline(PipelineSpec.from_dict(cfg), None)
    x, y = mnist(split="test", stop=8).tensors
    result = stage_tracin(traj, x, y, "loss", batch_size=5)
    assert result.checkpoints == {"pretrain": 3, "finetune": 1, "adapt": 4}
    assert all(e.shape == (8,) and e.dtype == torch.float64 for e in result.effects.values())
    model = traj.build_model("adapt")
    states = [traj.checkpoint("adapt", "start")]
    states += [traj.inner_checkpoint("adapt", t) for t in (1, 2, 3)]
    states += [traj.checkpoint("adapt", "end")]
    truth = torch.zeros(8, dtype=torch.float64)
    for before, after in itertools.pairwise(states):
        model.load_state_dict(before)
        params = dict(model.named_parameters())
        for i in range(8):
            f = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
            grads = torch.autograd.grad(f, list(params.values()))
            truth[i] += sum(
                float((g.double() * (after[n].double() - before[n].double())).sum())
                for n, g in zip(params, grads, strict=True)
            )
    assert truth.abs().min() > 1e-4
    torch.testing.assert_close(result.effects["adapt"], truth, rtol=2e-4, atol=1e-6)


def test_a_recording_without_batch_order_is_refused():
    model = Additive(out_features=2)
    recorder = Recorder(None, model, Ref("tests.estimators.toy:Additive", {"out_features": 2}))
    data = Ref("tests.estimators.test_tracin:classes", {})
    with recorder.stage("blind", kind="pretrain", data=data, seed=0, log_batches=False) as s:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        s.attach(optimizer)
        x, y = classes().tensors
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    with pytest.raises(
        StagetraceError,
        match=r"'blind' recorded none\. Fix: record the stage with stage\.log_batch",
    ):
        tracin_effects(recorder.finish(), *TEST, "margin")


def test_bad_batch_size_is_refused():
    traj = record(only=stage(1, steps=1))
    with pytest.raises(StagetraceError, match="batch_size 0 is not a positive integer"):
        tracin_effects(traj, *TEST, "margin", batch_size=0)
