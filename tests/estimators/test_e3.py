"""E3 against dense truths on quadratic losses (``exp(-D H)`` by ``torch.linalg.matrix_exp``),
against skip-stage retraining as the learning rate shrinks, and against E0/E1 where it must agree.
"""

import pytest
import torch

from attribution.record.errors import SpecError
from attribution.record.pipeline import run_pipeline
from attribution.record.spec import PipelineSpec
from estimators import ESTIMATORS
from estimators.e0 import E0
from estimators.e1 import E1
from estimators.e3 import E3, step_mass
from tests.attribution import tiny
from tests.estimators import toy
from tests.helpers import NESTEROV, SGD, SGDW, assert_offsets_equal, true_offsets

PLAIN = {"type": "sgd"}
DECAY = {"type": "sgd", "weight_decay": 0.3}
ADAMW = {"type": "adamw", "weight_decay": 0.2}
SIZES = {"body.weight": 5, "body.bias": 1, "head.weight": 5, "head.bias": 1}


def record(optimizers, policies, lrs, steps=12, reinit_head_in=None, schedule="cosine"):
    cfg = toy.pipeline("mse", optimizers, policies, lrs, reinit_head_in=reinit_head_in, steps=steps)
    for stage in cfg["stages"].values():
        stage["schedule"] = {"name": schedule}
    return run_pipeline(PipelineSpec.from_dict(cfg), None)


def flat(offsets):
    """The offsets as one float64 vector; names left out are zero."""
    zeros = torch.zeros
    return torch.cat(
        [offsets.get(n, zeros(s, dtype=torch.float64)).reshape(-1) for n, s in SIZES.items()]
    )


def stage_hessian(j):
    """The mse Hessian of stage j's data for ``Additive``: ``2/n Phi^T Phi``, with features
    ``[x, 1, x, 1]`` for (body.weight, body.bias, head.weight, head.bias)."""
    x, _ = toy.regression(seed=j, shift=0.5 * j).tensors
    ones = torch.ones(len(x), 1, dtype=torch.float64)
    phi = torch.cat([x, ones, x, ones], dim=1)
    return 2.0 / len(x) * phi.T @ phi


def relative_error(estimate, truth):
    return float((flat(estimate) - flat(truth)).norm() / flat(truth).norm())


@pytest.mark.parametrize("at", ["start", "end", "both"])
def test_full_rank_e3_is_the_matrix_exponential_of_the_stage(at):
    traj = record([PLAIN, PLAIN], ["reset", "reset"], [0.1, 0.05])
    embeddings = E3(rank=12, at=at).embed(traj)
    mass = float(traj.steps(1).lr.sum())
    delta = flat(E0().embed(traj).offsets["s0"])
    expected = torch.linalg.matrix_exp(-mass * stage_hessian(1)) @ delta
    torch.testing.assert_close(flat(embeddings.offsets["s0"]), expected, rtol=0, atol=1e-12)
    # Curvature matters here: E1 (no decay, no momentum) leaves the offset as it was.
    assert (expected - delta).norm() > 0.1 * delta.norm()
    points = 2 if at == "both" else 1
    assert embeddings.counts["hvps"] == points * (12 + 1)  # Lanczos, then one offset


def test_coupled_decay_multiplies_by_e1s_factor():
    traj = record([PLAIN, DECAY], ["reset", "reset"], [0.1, 0.05])
    rates = traj.steps(1).lr[:, 0].double()
    decay = float(torch.prod(1.0 - 0.3 * rates))
    delta = flat(E0().embed(traj).offsets["s0"])
    expected = decay * torch.linalg.matrix_exp(-float(rates.sum()) * stage_hessian(1)) @ delta
    got = flat(E3(rank=12).embed(traj).offsets["s0"])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_a_reinitialised_head_restarts_at_offset_zero_then_follows_the_curvature():
    traj = record([PLAIN, PLAIN], ["reset", "reset"], [0.1, 0.05], reinit_head_in=1)
    delta = E0().embed(traj).offsets["s0"]
    entering = flat({n: v for n, v in delta.items() if not n.startswith("head.")})
    mass = float(traj.steps(1).lr.sum())
    expected = torch.linalg.matrix_exp(-mass * stage_hessian(1)) @ entering
    got = flat(E3(rank=12).embed(traj).offsets["s0"])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert expected[6:].abs().max() > 1e-3  # the head moves in response to the body's offset


def test_adam_step_mass_is_preconditioned_by_the_recorded_second_moment():
    traj = record([PLAIN, ADAMW], ["reset", "reset"], [0.1, 0.02])
    rates = traj.steps(1).lr[:, 0].double()
    end = traj.optimizer_state(1, "end")
    v_hat = flat({n: end[n]["exp_avg_sq"] / (1 - 0.999 ** float(end[n]["step"])) for n in SIZES})
    mass = torch.diag(rates.sum() / (v_hat.sqrt() + 1e-8))
    decay = float(torch.prod(1.0 - 0.2 * rates))  # AdamW's decoupled decay, as E1 carries it
    delta = flat(E0().embed(traj).offsets["s0"])
    expected = decay * torch.linalg.matrix_exp(-mass @ stage_hessian(1)) @ delta
    got = flat(E3(rank=12).embed(traj).offsets["s0"])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "optimizer,policy",
    [
        ({"type": "sgd", "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.1}, "reset"),
        ({"type": "sgd", "momentum": 0.8, "nesterov": True}, "reset"),
        ({"type": "sgd", "momentum": 0.7, "dampening": 0.3}, "carry"),
    ],
    ids=["dampened", "nesterov", "carried-buffer"],
)
def test_sgd_step_mass_is_torchs_displacement_under_a_unit_gradient(optimizer, policy):
    """D is how far torch.optim.SGD moves a parameter whose gradient changes by 1 from the
    stage start: from a new buffer (reset) or an existing one (carry, buffer change 0)."""
    traj = record([{"type": "sgd", "momentum": 0.5}, optimizer], ["reset", policy], [0.1, 0.05])
    shapes = {n: p.shape for n, p in traj.build_model(1).named_parameters()}
    mass = step_mass(traj, 1, shapes)["body.bias"]
    hyper = {k: v for k, v in optimizer.items() if k not in ("type", "weight_decay")}
    p = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    sgd = torch.optim.SGD([p], lr=0.0, **hyper)
    if policy == "carry":
        sgd.state[p]["momentum_buffer"] = torch.zeros(1, dtype=torch.float64)
    for lr in traj.steps(1).lr[:, 0].tolist():
        sgd.param_groups[0]["lr"] = lr
        p.grad = torch.ones(1, dtype=torch.float64)
        sgd.step()
    torch.testing.assert_close(mass, -p.detach(), rtol=1e-12, atol=0)
    assert float(mass) != pytest.approx(float(traj.steps(1).lr.sum()), rel=0.05)


def test_adam_parameters_that_never_had_a_gradient_get_no_step_mass():
    """Always-blank MNIST border pixels give fc1 weights a second moment of exactly 0: there
    D = 0 (not sum(lr) / eps); elsewhere D = sum(lr) / (sqrt(v_hat) + eps)."""
    cfg = tiny.config(
        pretrain=tiny.stage("pretrain", 1, tiny.SGD_MOMENTUM, 0.05),
        tune=tiny.stage("finetune", 2, tiny.ADAMW, 0.01),
    )
    traj = run_pipeline(PipelineSpec.from_dict(cfg), None)
    end = traj.optimizer_state(1, "end")["fc1.weight"]
    v_hat = end["exp_avg_sq"].double() / (1 - 0.999 ** float(end["step"]))
    assert (v_hat == 0).any() and (v_hat > 0).any()
    shapes = {n: p.shape for n, p in traj.build_model(1).named_parameters()}
    mass = step_mass(traj, 1, shapes)["fc1.weight"]
    total = float(traj.steps(1).lr.sum())
    torch.testing.assert_close(mass[v_hat > 0], total / (v_hat[v_hat > 0].sqrt() + 1e-8))
    assert (mass[v_hat == 0] == 0).all()


def test_e3_approaches_retraining_as_the_learning_rate_shrinks_where_e1_does_not():
    """The same learning-rate mass (1.0) in ever smaller steps: retraining tends to the gradient
    flow ``exp(-m H)`` that E3 computes (error about proportional to the rate), while E1, blind
    to curvature, keeps the whole offset (here the stage contracts it about fifty-fold)."""
    errors = []
    for lr, steps in ((0.03, 32), (0.01, 100), (0.003, 332)):
        cfg = toy.pipeline("mse", [PLAIN, PLAIN], ["reset", "reset"], [0.1, lr], steps=12)
        cfg["stages"]["s1"].update(steps=steps, schedule={"name": "constant"})
        traj = run_pipeline(PipelineSpec.from_dict(cfg), None)
        truth = true_offsets(traj, "s0")
        e3 = relative_error(E3(rank=12).embed(traj).offsets["s0"], truth)
        e1 = relative_error(E1().embed(traj).offsets["s0"], truth)
        errors.append((e3, e1))
    (first, _), (second, _), (third, _) = errors
    assert first > second > third
    assert third < 0.05 and third < 0.2 * first
    assert all(e1 > 10 for _, e1 in errors)


def test_last_stage_is_exact_and_rank_zero_is_e1():
    traj = record([SGD, NESTEROV, NESTEROV], ["reset", "carry", "carry"], [0.05, 0.1, 0.08], 12, 1)
    e3 = E3(rank=0).embed(traj)
    assert e3.counts["hvps"] == 0
    e1 = E1().embed(traj).offsets
    for stage in traj.names:
        assert_offsets_equal(e3.offsets[stage], e1[stage], atol=0)
    full = E3(rank=12).embed(traj).offsets
    assert_offsets_equal(full["s2"], true_offsets(traj, "s2"), atol=0)
    assert_offsets_equal(full["s2"], E0().embed(traj).offsets["s2"], atol=0)
    assert relative_error(full["s0"], e1["s0"]) > 0.01


def test_e3_equals_e1_when_the_loss_is_linear_in_theta():
    """Zero curvature: Lanczos meets only breakdowns and finds no positive eigenvalue."""
    cfg = toy.pipeline(
        "tests.estimators.toy:linear_loss",
        [SGD, SGD, SGD],
        ["reset", "carry", "reset"],
        [0.1, 0.3, 0.2],
    )
    traj = run_pipeline(PipelineSpec.from_dict(cfg), None)
    e3, e1 = E3(rank=12).embed(traj).offsets, E1().embed(traj).offsets
    for stage in traj.names:
        assert_offsets_equal(e3[stage], e1[stage], atol=0)


def test_gauss_newton_equals_the_hessian_on_a_quadratic():
    traj = record([SGD, NESTEROV, SGDW], ["reset", "carry", "reset"], [0.05, 0.1, 0.08], 12, 1)
    hessian = E3(rank=12).embed(traj).offsets
    gauss_newton = E3(rank=12, curvature="gauss_newton").embed(traj).offsets
    for stage in traj.names:
        assert_offsets_equal(gauss_newton[stage], hessian[stage], atol=1e-12)


def test_on_a_real_network_adapters_and_reinitialised_heads_respond_to_earlier_offsets():
    traj = run_pipeline(PipelineSpec.from_dict(tiny.three_stage("carry")), None)
    e3 = E3(rank=4, sample=64).embed(traj)
    # The LoRA factors adapt adds and the head finetune re-creates start at offset 0 for
    # earlier stages, then the curvature of their stage moves them.
    assert e3.offsets["finetune"]["fc1.lora_B"].abs().sum() > 0
    assert e3.offsets["pretrain"]["head.weight"].abs().sum() > 0
    assert_offsets_equal(e3.offsets["adapt"], true_offsets(traj, "adapt"), atol=0)
    assert all(v.dtype == torch.float64 for o in e3.offsets.values() for v in o.values())
    # Lanczos: rank + 10 iterations at two checkpoints per later stage, plus one product per
    # checkpoint for each offset carried through it (one through finetune, two through adapt).
    assert e3.counts["hvps"] == 2 * 14 + 2 * 1 + 2 * 14 + 2 * 2


@pytest.mark.parametrize(
    "settings,field",
    [
        ({"rank": -1}, "e3.rank"),
        ({"rank": 2.5}, "e3.rank"),
        ({"sample": 0}, "e3.sample"),
        ({"at": "middle"}, "e3.at"),
        ({"curvature": "fisher"}, "e3.curvature"),
        ({"seed": "zero"}, "e3.seed"),
    ],
)
def test_bad_settings_name_the_setting_and_the_fix(settings, field):
    with pytest.raises(SpecError, match="Fix:") as error:
        E3(**settings)
    assert error.value.field == field


def test_e3_is_registered_with_its_settings_and_evidence():
    assert ESTIMATORS["e3"] is E3
    assert E3(rank=5, at="end").settings() == {
        "rank": 5,
        "sample": 512,
        "at": "end",
        "curvature": "hessian",
        "seed": 0,
    }
    assert "batch_order" not in E3.requires and "stage_data" in E3.requires
