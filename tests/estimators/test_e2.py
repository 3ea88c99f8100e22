"""E2 against exact truths: retraining on quadratic losses (affine steps), central finite
differences of the retraining for Adam, E1 on linear losses, and its own adjoint form."""

import pytest
import torch
from torch.func import functional_call, jvp

from attribution.record.counterfactual import retrain_after, skip_stage
from attribution.record.optim import HYPERPARAMETERS
from attribution.record.pipeline import run_pipeline
from attribution.record.spec import PipelineSpec
from estimators.base import final_parameter_names, stage_displacement
from estimators.e0 import E0
from estimators.e1 import E1
from estimators.e2 import E2, adjoint_effects, propagate
from estimators.functional import StepRule
from estimators.stages import TrainingStart, handed_state
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


def per_stage_reference(traj):
    """Each earlier stage's offset carried alone, one ``torch.func.jvp`` of the whole step
    (gradient and optimizer update) per step: E2 as it was before its offsets were batched."""
    names = final_parameter_names(traj)
    out = {}
    for k in range(len(traj.stages) - 1):
        dtheta, ds = stage_displacement(traj, k, names), handed_state(traj, k)
        for j in range(k + 1, len(traj.stages)):
            stage = TrainingStart.of(traj, j)
            dtheta, ds = stage.enter(dtheta, ds)
            params, state = stage.params, stage.state
            for t, x, y, lrs in stage.batches():

                def step(p, s, x=x, y=y, lrs=lrs, t=t, stage=stage):
                    grads = stage.gradient(p, x, y)
                    return stage.rule.step(p, s, grads, lrs, stage.fresh_at(t))

                (params, state), (dtheta, ds) = jvp(step, (params, state), (dtheta, ds))
        out[traj.names[k]] = dtheta
    return out


FOUR_STAGES = tiny.config(
    pretrain=tiny.stage("pretrain", 1, tiny.ADAMW, 2e-3),
    finetune=tiny.stage(
        "finetune", 2, tiny.ADAMW, 2e-3, entry=[{"kind": "reinit", "modules": ["head"]}]
    ),
    refine=tiny.stage(
        "finetune", 3, tiny.ADAMW, 1e-3, clip_grad_norm=0.5, optimizer_policy="carry"
    ),
    adapt=tiny.stage(
        "adapt", 4, tiny.NESTEROV, 0.05, trainable=["*.lora_*", "head.*"],
        entry=[{"kind": "add_lora", "modules": ["fc1"], "rank": 2}],
    ),
)  # fmt: skip


def test_batched_offsets_equal_each_stage_carried_alone():
    """Four stages (up to three offsets share a step), Adam moments carried, clipping: the
    batched propagation equals the per-stage jvps of the whole step, to float32 round-off."""
    traj = run_pipeline(PipelineSpec.from_dict(FOUR_STAGES), None)
    batched = E2().embed(traj)
    assert batched.counts["tangent_steps"] == 6 + 2 * 6 + 3 * 6
    assert "unbatched_steps" not in batched.counts
    reference = per_stage_reference(traj)
    counts = {}
    unbatched = propagate(traj, counts, batched=False)
    assert counts["unbatched_steps"] == 18
    for stage, offsets in reference.items():
        scale = max(float(v.abs().max()) for v in offsets.values())
        assert scale > 0
        for name, value in offsets.items():
            for got in (batched.offsets[stage][name], unbatched[stage][name]):
                torch.testing.assert_close(
                    got.float(), value, rtol=1e-4, atol=1e-5 * scale, msg=f"{stage} {name}"
                )


class Noisy(torch.nn.Module):
    """``toy.Additive`` plus zero times a random draw: the same function, but ``vmap``
    refuses its random operation."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = toy.Additive()

    def forward(self, x):
        return self.inner(x) + 0.0 * torch.rand_like(x[:, :1])


def test_a_model_vmap_refuses_falls_back_to_per_stage_jvps():
    cfg = toy.pipeline(MSE, [SGD, NESTEROV, ADAMW], ["reset", "carry", "reset"], [0.05, 0.1, 0.02])
    plain = run_pipeline(PipelineSpec.from_dict(cfg), None)
    cfg["model"] = {"target": "tests.estimators.test_e2:Noisy", "kwargs": {}}
    noisy = run_pipeline(PipelineSpec.from_dict(cfg), None)
    expected, got = E2().embed(plain), E2().embed(noisy)
    assert "unbatched_steps" not in expected.counts
    assert got.counts["unbatched_steps"] == 24  # every later step
    for stage in plain.names:
        renamed = {f"inner.{n}": v for n, v in expected.offsets[stage].items()}
        assert_offsets_equal(got.offsets[stage], renamed, atol=1e-12)


STEP_CASES = {
    "sgd": {"kind": "sgd", "momentum": 0.0, "dampening": 0.0, "nesterov": False, "decay": 0.1},
    "momentum": {"kind": "sgd", "momentum": 0.9, "dampening": 0.3, "nesterov": False, "decay": 0.1},
    "nesterov": {"kind": "sgd", "momentum": 0.8, "dampening": 0.0, "nesterov": True, "decay": 0.0},
    "sgdw": {"kind": "sgdw", "momentum": 0.7, "dampening": 0.0, "nesterov": False, "decay": 0.2},
    "adam": {"kind": "adam", "decay": 0.05},
    "adamw": {"kind": "adamw", "decay": 0.3},
}


@pytest.mark.parametrize("clip", [None, 0.5, 100.0], ids=["no-clip", "clipped", "under-clip"])
@pytest.mark.parametrize("fresh", [False, True], ids=["buffer", "fresh"])
@pytest.mark.parametrize("case", list(STEP_CASES))
def test_the_written_out_step_tangent_equals_the_jvp_of_the_step(case, fresh, clip):
    """``StepRule.tangent`` on three stacked tangents against ``torch.func.jvp`` of
    ``StepRule.step`` row by row (float64), Adam's second moment exactly 0 on some entries."""
    c = STEP_CASES[case]
    if c["kind"].startswith("adam"):
        hyper = {"betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": c["decay"], "amsgrad": False}
    else:
        hyper = {k: c[k] for k in ("momentum", "dampening", "nesterov")}
        hyper["weight_decay"] = c["decay"]
    hyper = {k: hyper[k] for k in HYPERPARAMETERS[c["kind"]] if k != "lr"}
    g = torch.Generator().manual_seed(0)
    shapes = {"w": (4, 3), "b": (4,), "frozen": (2,)}
    params = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    rule = StepRule(c["kind"], {"w": hyper, "b": hyper}, clip_grad_norm=clip)
    state = rule.init_state(params, {})
    for slots in state.values():
        for s, v in slots.items():
            if s == "step":
                slots[s] = torch.tensor(3.0)
            elif s == "exp_avg_sq":
                slots[s] = torch.rand(v.shape, generator=g, dtype=torch.float64)
                slots[s].view(-1)[:2] = 0.0
            else:
                slots[s] = torch.randn(v.shape, generator=g, dtype=torch.float64)
    grads = {n: torch.randn(shapes[n], generator=g, dtype=torch.float64) for n in ("w", "b")}
    if c["kind"].startswith("adam"):
        grads["w"].view(-1)[:2] = 0.0  # with v = 0 there: sqrt's derivative is taken as 0
    lrs = {"w": 0.05, "b": 0.02}
    names = {"w", "b"} if fresh and "momentum_buffer" in rule.slots("w") else set()

    def rows(tree):
        return {k: torch.randn(3, *v.shape, generator=g, dtype=v.dtype) for k, v in tree.items()}

    dparams, dgrads = rows(params), rows(grads)
    dstate = {n: rows(slots) for n, slots in state.items()}
    for slots in dstate.values():
        if "step" in slots:
            slots["step"] = torch.zeros(3, dtype=torch.float32)
    after = rule.step(params, state, grads, lrs, names)
    got_params, got_state = rule.tangent(
        params, grads, lrs, names, after[1], (dparams, dstate), dgrads
    )
    for i in range(3):
        row = {n: v[i] for n, v in dparams.items()}
        row_state = {n: {s: v[i] for s, v in slots.items()} for n, slots in dstate.items()}
        row_grads = {n: v[i] for n, v in dgrads.items()}
        _, (want_params, want_state) = jvp(
            lambda p, s, gr: rule.step(p, s, gr, lrs, names),
            (params, state, grads),
            (row, row_state, row_grads),
        )
        for n, v in want_params.items():
            torch.testing.assert_close(got_params[n][i], v, rtol=1e-12, atol=1e-12, msg=n)
        for n, slots in want_state.items():
            for s, v in slots.items():
                torch.testing.assert_close(got_state[n][s][i], v, rtol=1e-12, atol=1e-12)
