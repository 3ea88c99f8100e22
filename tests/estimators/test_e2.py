"""E2 against exact truths: retraining on quadratic losses (affine steps), central finite
differences of the retraining for Adam, E1 on linear losses, and its own adjoint form."""

import pytest
import torch
from torch.func import functional_call

from attribution.record.counterfactual import retrain_after, skip_stage
from attribution.record.pipeline import run_pipeline
from attribution.record.spec import PipelineSpec
from estimators.e0 import E0
from estimators.e1 import E1
from estimators.e2 import E2, adjoint_effects
from estimators.stages import handed_state
from tests.attribution import tiny
from tests.estimators import toy
from tests.helpers import ADAMW, NESTEROV, SGD, SGDW, assert_offsets_equal

MSE = "mse"
ADAM = {"type": "adam", "weight_decay": 0.05}


def record(loss, optimizers, policies, lrs=(0.05, 0.1, 0.08), steps=12):
    cfg = toy.pipeline(
        loss, optimizers, policies, list(lrs)[: len(optimizers)], reinit_head_in=1, steps=steps
    )
    return run_pipeline(PipelineSpec.from_dict(cfg), None)


def final_state(traj):
    return traj.checkpoint(len(traj.stages) - 1, "end")


def offsets_of(traj, state):
    final = final_state(traj)
    return {n: state[n].double() - final[n].double() for n in final}


def held_out_loss(traj):
    """Mean squared error of the final model on held-out data, as a function of parameters."""
    x, y = toy.regression(n=32, seed=99, shift=0.3).tensors
    model = traj.build_model(len(traj.stages) - 1)
    return lambda params: torch.nn.functional.mse_loss(functional_call(model, params, (x,)), y)


@pytest.mark.parametrize(
    "optimizers,policies",
    [
        ([SGD, SGD, SGD], ["reset", "reset", "reset"]),
        ([SGD, NESTEROV, NESTEROV], ["reset", "carry", "carry"]),
        ([SGDW, SGDW, SGDW], ["reset", "carry", "carry"]),
    ],
    ids=["sgd-reset", "nesterov-carry", "sgdw-carry"],
)
def test_e2_equals_retraining_on_a_quadratic_loss(optimizers, policies):
    traj = record(MSE, optimizers, policies)
    embeddings = E2().embed(traj)
    assert embeddings.counts["jvp_steps"] == 24
    f = held_out_loss(traj)
    gradient = torch.func.grad(f)(dict(final_state(traj)))
    adjoint = adjoint_effects(traj, f)
    for stage in traj.names:
        truth = offsets_of(traj, skip_stage(traj, stage).state)
        assert_offsets_equal(embeddings.offsets[stage], truth, atol=1e-10)
        # The adjoint form equals the linear read-out of the true offset.
        exact = -sum(float((gradient[n] * v).sum()) for n, v in truth.items())
        assert adjoint[stage] == pytest.approx(exact, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    "optimizers,policies",
    [
        ([SGD, NESTEROV, NESTEROV], ["reset", "carry", "carry"]),
        ([ADAM, ADAMW, ADAMW], ["reset", "reset", "reset"]),
        ([ADAMW, ADAMW, ADAMW], ["reset", "carry", "carry"]),
    ],
    ids=["nesterov-carry", "adam", "adamw-carry"],
)
def test_adjoint_form_equals_the_linear_readout_of_the_forward_form(optimizers, policies):
    traj = record(MSE, optimizers, policies)
    f = held_out_loss(traj)
    final = {n: v for n, v in final_state(traj).items()}
    gradient = torch.func.grad(f)(final)
    forward = E2().embed(traj).offsets
    adjoint = adjoint_effects(traj, f)
    for stage in traj.names:
        linear = -sum(float((gradient[n] * v).sum()) for n, v in forward[stage].items())
        assert adjoint[stage] == pytest.approx(linear, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(
    "optimizers", [[ADAM, ADAM, ADAM], [ADAMW, ADAMW, ADAMW]], ids=["adam", "adamw"]
)
@pytest.mark.parametrize("policies", [["reset", "reset", "reset"], ["reset", "carry", "carry"]])
def test_e2_is_the_derivative_of_retraining_for_adam(optimizers, policies):
    traj = record(MSE, optimizers, policies, lrs=(0.05, 0.02, 0.03))
    embeddings = E2().embed(traj).offsets
    eps = 1e-5
    for k in (0, 1):
        plus, minus = retrain_moved(traj, k, eps), retrain_moved(traj, k, -eps)
        derivative = {n: (plus[n] - minus[n]) / (2 * eps) for n in plus}
        assert_offsets_equal(embeddings[traj.names[k]], derivative, atol=1e-6)


def retrain_moved(traj, k, step):
    """Retrain the stages after k from stage k's end moved by ``step`` along the skip-k offset
    of the parameters (delta_k) and of the optimizer state handed on."""
    delta = E0().embed(traj).offsets[traj.names[k]]
    ds = handed_state(traj, k)
    end, state = traj.checkpoint(k, "end"), traj.optimizer_state(k, "end")
    start = {n: v + step * delta[n].to(v.dtype) for n, v in end.items()}
    moved = {
        n: {s: v + step * ds[n][s] if s in ds.get(n, {}) else v for s, v in slots.items()}
        for n, slots in state.items()
    }
    return retrain_after(traj, k, start, moved)


def test_e1_equals_e2_when_the_loss_is_linear_in_theta():
    traj = record(
        "tests.estimators.toy:linear_loss", [SGD, NESTEROV, SGDW], ["reset", "carry", "reset"]
    )
    e1, e2 = E1().embed(traj).offsets, E2().embed(traj).offsets
    for stage in traj.names:
        assert_offsets_equal(e2[stage], e1[stage], atol=1e-12)


def test_on_a_real_network_the_last_stage_is_exact_and_both_forms_agree():
    traj = run_pipeline(PipelineSpec.from_dict(tiny.three_stage("carry")), None)
    e2 = E2().embed(traj)
    truth = offsets_of(traj, skip_stage(traj, "adapt").state)
    assert_offsets_equal(e2.offsets["adapt"], truth, atol=0)
    assert set(e2.offsets) == {"pretrain", "finetune", "adapt"}
    # The LoRA factors added by adapt start at offset 0 for earlier stages but move in adapt.
    assert e2.offsets["finetune"]["fc1.lora_B"].abs().sum() > 0
    x, y = traj.stages[0].data.call().tensors
    model = traj.build_model(2)

    def f(params):
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x[:50],)), y[:50])

    gradient = torch.func.grad(f)(dict(final_state(traj)))
    adjoint = adjoint_effects(traj, f)
    for stage in traj.names:
        linear = -sum(float((gradient[n].double() * v).sum()) for n, v in e2.offsets[stage].items())
        assert adjoint[stage] == pytest.approx(linear, rel=1e-4, abs=1e-7)
