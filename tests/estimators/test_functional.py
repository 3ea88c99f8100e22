"""The functional optimizer step, checked against independent truth.

Truths used: ``torch.optim`` (via ``attribution.record.optim.build_optimizer``; ``SGDW`` for sgdw)
on the
same parameters, gradients and learning rates; a recorded pipeline stage (its ``end`` checkpoint);
and central finite differences for the jvp through the step.
"""

import math

import pytest
import torch
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.utils._pytree import tree_leaves, tree_map

from attribution.record.optim import (
    HYPERPARAMETERS,
    build_optimizer,
    load_state_by_name,
    state_by_name,
)
from attribution.record.pipeline import run_pipeline
from attribution.record.references import load_dataset, loss_function
from attribution.record.spec import PipelineSpec
from estimators.functional import StepRule, step_lrs
from tests.attribution import tiny

# kind and the hyperparameter overrides of the two groups ("a", "b")
CASES = {
    "sgd": ("sgd", [{}, {}]),
    "sgd-momentum-dampening": (
        "sgd",
        [{"momentum": 0.9, "dampening": 0.3}, {"momentum": 0.5, "weight_decay": 0.01}],
    ),
    "sgd-nesterov-decay": (
        "sgd",
        [{"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}, {"momentum": 0.7}],
    ),
    "sgdw-momentum": (
        "sgdw",
        [{"momentum": 0.8, "weight_decay": 0.05}, {"momentum": 0.5, "dampening": 0.2}],
    ),
    "adam-decay": (
        "adam",
        [{"weight_decay": 0.01}, {"betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.1}],
    ),
    "adamw": ("adamw", [{}, {"betas": [0.5, 0.9], "eps": 1e-3, "weight_decay": 0.1}]),
}
STATEFUL = [c for c in CASES if c != "sgd"]
TOLERANCE = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-14},
    torch.float32: {"rtol": 1.3e-6, "atol": 1e-6},
}


def toy_grads(params):
    """A fixed nonlinear gradient field, so that the trajectories depend on every update."""
    return {n: torch.tanh(p) + 0.1 * p**2 - 0.3 for n, p in params.items()}


def toy_lrs(t):
    return {"a": 0.1 * (1 + 0.5 * math.sin(t)), "b": 0.05 / (1 + 0.1 * t)}


def setup(case, dtype):
    """Initial parameters, the torch optimizer over live copies, and the functional rule."""
    kind, overrides = CASES[case]
    gen = torch.Generator().manual_seed(0)
    params = {
        "a": torch.randn(4, 3, generator=gen, dtype=dtype),
        "b": torch.randn(5, generator=gen, dtype=dtype),
    }
    hyper = {n: {**HYPERPARAMETERS[kind], **o} for n, o in zip("ab", overrides, strict=True)}
    live = {n: p.clone().requires_grad_() for n, p in params.items()}
    optimizer = build_optimizer(kind, [([live[n]], {"lr": 1.0, **hyper[n]}) for n in "ab"])
    return params, live, optimizer, StepRule(kind, hyper)


def torch_step(optimizer, live, t):
    for group, name in zip(optimizer.param_groups, "ab", strict=True):
        group["lr"] = toy_lrs(t)[name]
    with torch.no_grad():
        for p, g in zip(live.values(), toy_grads(live).values(), strict=True):
            p.grad = g
    optimizer.step()


def assert_same(live, optimizer, params, state, dtype):
    names = {id(p): n for n, p in live.items()}
    expected = state_by_name(optimizer, names)
    assert set(state) == set(expected)
    torch.testing.assert_close(params, {n: p.detach() for n, p in live.items()}, **TOLERANCE[dtype])
    torch.testing.assert_close(state, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_every_step_matches_torch_optim(case, dtype):
    params, live, optimizer, rule = setup(case, dtype)
    fresh, state = rule.fresh({}), rule.init_state(params, {})
    for t in range(50):
        torch_step(optimizer, live, t)
        params, state = rule.step(
            params, state, toy_grads(params), toy_lrs(t), fresh if t == 0 else frozenset()
        )
        assert_same(live, optimizer, params, state, dtype)


def total_norm(grads):
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()])))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", CASES)
def test_clipped_steps_match_torch_optim_with_clip_grad_norm(case, dtype):
    """torch: backward, ``clip_grad_norm_`` over the parameters, ``optimizer.step()``. The
    threshold lies inside the range of the gradients' norms, so some steps clip and some not."""
    params, live, optimizer, rule = setup(case, dtype)
    norms = [total_norm(toy_grads(params))]
    max_norm = 1.5
    rule = StepRule(rule.kind, rule.hyper, clip_grad_norm=max_norm)
    fresh, state = rule.fresh({}), rule.init_state(params, {})
    for t in range(50):
        for group, name in zip(optimizer.param_groups, "ab", strict=True):
            group["lr"] = toy_lrs(t)[name]
        with torch.no_grad():
            torch_grads = toy_grads(live)
            for name, p in live.items():
                p.grad = torch_grads[name].clone()
        torch.nn.utils.clip_grad_norm_(live.values(), max_norm)
        clipped = rule.clipped(torch_grads)
        for name, p in live.items():  # on the same gradients, torch's clipping bit for bit
            assert torch.equal(clipped[name], p.grad), (t, name)
        grads = toy_grads(params)
        norms.append(total_norm(grads))
        optimizer.step()
        params, state = rule.step(
            params, state, grads, toy_lrs(t), fresh if t == 0 else frozenset()
        )
        assert_same(live, optimizer, params, state, dtype)
    assert min(norms) < max_norm < max(norms), norms


def test_clipping_scales_by_max_norm_over_the_total_norm():
    """Closed form: gradients of total norm 5 clipped to 2 are scaled by 2 / (5 + 1e-6); below
    the threshold they pass unscaled."""
    grads = {"a": torch.tensor([3.0, 0.0], dtype=torch.float64), "b": torch.tensor([4.0])}
    grads["b"] = grads["b"].double()
    rule = StepRule("sgd", dict.fromkeys("ab", HYPERPARAMETERS["sgd"]), clip_grad_norm=2.0)
    clipped = rule.clipped(grads)
    for name in "ab":
        torch.testing.assert_close(clipped[name], grads[name] * (2.0 / (5.0 + 1e-6)))
    loose = StepRule("sgd", rule.hyper, clip_grad_norm=6.0).clipped(grads)
    assert all(torch.equal(loose[n], grads[n]) for n in "ab")


@pytest.mark.parametrize("case", STATEFUL)
def test_continuing_from_a_carried_state_matches_torch_optim(case):
    """Carry policy: "a" keeps torch's state after 5 steps, "b" starts fresh (re-initialised)."""
    params, live, optimizer, rule = setup(case, torch.float64)
    for t in range(5):
        torch_step(optimizer, live, t)
    names = {id(p): n for n, p in live.items()}
    carried = {"a": state_by_name(optimizer, names)["a"]}
    optimizer = build_optimizer(
        rule.kind, [([live[n]], {"lr": 1.0, **rule.hyper[n]}) for n in "ab"]
    )
    load_state_by_name(optimizer, carried, names)
    params = {n: p.detach().clone() for n, p in live.items()}
    fresh, state = rule.fresh(carried), rule.init_state(params, carried)
    assert fresh == ({"b"} if "sgd" in case else set())
    for t in range(5, 15):
        torch_step(optimizer, live, t)
        params, state = rule.step(
            params, state, toy_grads(params), toy_lrs(t), fresh if t == 5 else frozenset()
        )
        assert_same(live, optimizer, params, state, torch.float64)


def test_step_is_pure_and_updates_only_parameters_with_gradients():
    params, _, _, rule = setup("adam-decay", torch.float64)
    state = rule.init_state(params, {})
    before = tree_map(torch.clone, (params, state))
    new_params, new_state = rule.step(params, state, {"a": toy_grads(params)["a"]}, toy_lrs(0))
    torch.testing.assert_close((params, state), before, rtol=0, atol=0)
    assert new_params["b"] is params["b"] and new_state["b"] is state["b"]
    assert not torch.equal(new_params["a"], params["a"])
    with pytest.raises(ValueError, match="does not train"):
        rule.step(params, state, {"c": params["a"]}, {"c": 0.1})


@pytest.fixture(scope="module", params=["nesterov", "adamw", "nesterov-clipped", "adamw-clipped"])
def recorded(request):
    """Two recorded stages: "pre" (reset, all trained) and "post" (carry, two groups with
    different hyperparameters, fc1.weight frozen; its groups list head.* before fc1.bias, not
    in model order). The clipped variants clip both stages' gradients to ``CLIP``."""
    kind, _, clipped = request.param.partition("-")
    optimizer, lr, override = {
        "nesterov": (tiny.NESTEROV, 0.05, {"momentum": 0.5}),
        "adamw": (tiny.ADAMW, 1e-2, {"betas": [0.8, 0.99], "weight_decay": 0.1}),
    }[kind]
    clip = {"clip_grad_norm": CLIP} if clipped else {}
    groups = [{"params": ["head.*"], "lr": 2 * lr, **override}]
    cfg = tiny.config(
        pre=tiny.stage("pretrain", 1, optimizer, lr, schedule={"name": "cosine"}, **clip),
        post=tiny.stage(
            "finetune",
            2,
            {**optimizer, "groups": groups},
            lr,
            schedule={"name": "cosine"},
            trainable=["fc1.bias", "head.*"],
            optimizer_policy="carry",
            **clip,
        ),
    )
    return run_pipeline(PipelineSpec.from_dict(cfg), None)


CLIP = 0.1


def test_the_rule_of_a_record_takes_its_clipping_and_the_model_order(recorded):
    record = recorded.stages[1]
    model_order = [n for n, _ in recorded.build_model(1).named_parameters()]
    assert list(StepRule.from_record(record).hyper) == ["head.weight", "head.bias", "fc1.bias"]
    rule = StepRule.from_record(record, model_order)
    assert list(rule.hyper) == ["fc1.bias", "head.weight", "head.bias"]
    assert rule.clip_grad_norm == record.clip_grad_norm
    assert rule.hyper == StepRule.from_record(record).hyper


def replay(traj, i):
    """Stage ``i`` replayed with the functional step, as the module docstring prescribes; also
    how many of its steps had a gradient norm above the stage's ``clip_grad_norm``."""
    record, log = traj.stages[i], traj.steps(i)
    assert not record.entry
    model = traj.load_model(i, "start")
    params = {n: p.detach() for n, p in model.named_parameters()}
    rule = StepRule.from_record(record, [n for n, _ in model.named_parameters()])
    recorded_state = traj.optimizer_state(i, "start")
    fresh, state = rule.fresh(recorded_state), rule.init_state(params, recorded_state)
    inputs, targets = load_dataset(record.data).tensors
    loss_fn = loss_function(record.loss)

    def loss(trained, frozen, x, y):
        return loss_fn(functional_call(model, {**frozen, **trained}, (x,)), y)

    clipped = 0
    for t in range(log.num_steps):
        batch = log.batch(t)
        trained = {n: params[n] for n in rule.hyper}
        grads = grad(loss)(trained, params, inputs[batch], targets[batch])
        clipped += record.clip_grad_norm is not None and total_norm(grads) > record.clip_grad_norm
        params, state = rule.step(
            params, state, grads, step_lrs(record, log, t), fresh if t == 0 else frozenset()
        )
    return params, state, recorded_state, clipped


@pytest.mark.parametrize("stage", [0, 1])
def test_replaying_a_recorded_stage_reaches_its_end_checkpoint(recorded, stage):
    params, state, start_state, clipped = replay(recorded, stage)
    assert bool(start_state) == (stage == 1)  # stage 1 really starts from a carried state
    if recorded.stages[stage].clip_grad_norm is not None:
        assert clipped == recorded.stages[stage].num_steps  # the clipping is active throughout
    start, end = recorded.checkpoint(stage, "start"), recorded.checkpoint(stage, "end")
    trained = set(recorded.stages[stage].trainable)
    assert set(params) == set(end)
    for name, value in params.items():
        if name in trained:
            torch.testing.assert_close(value, end[name], rtol=0, atol=1e-5)
        else:
            assert torch.equal(value, start[name]) and torch.equal(value, end[name])
    torch.testing.assert_close(state, recorded.optimizer_state(stage, "end"), rtol=0, atol=1e-5)


X = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
Y = torch.randn(8, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def smooth_loss(params):
    """A small tanh network's squared error; it ignores column 2 of w1 (zero gradient there)."""
    hidden = torch.tanh(X[:, :2] @ params["w1"][:, :2].T + params["b1"])
    return ((hidden @ params["w2"].T - Y) ** 2).mean()


JVP_RULES = {
    "adam": ("adam", {"betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.01}),
    "adamw": ("adamw", {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1}),
    "sgd-momentum": (
        "sgd",
        {"momentum": 0.9, "dampening": 0.1, "nesterov": False, "weight_decay": 1e-3},
    ),
    "sgd-nesterov": (
        "sgd",
        {"momentum": 0.9, "dampening": 0.0, "nesterov": True, "weight_decay": 1e-3},
    ),
    # clipped to a norm below the gradient's (asserted in jvp_problem), so the scale is active
    "adamw-clipped": ("adamw", {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1}, 0.1),
    "sgd-momentum-clipped": (
        "sgd",
        {"momentum": 0.9, "dampening": 0.1, "nesterov": False, "weight_decay": 1e-3},
        0.1,
    ),
}


def jvp_problem(case, warmup):
    """(step function of (params, state), params, state, tangent maker) after ``warmup`` steps;
    the gradients are taken inside the function, so jvp is forward-over-reverse."""
    kind, hyper, *clip = JVP_RULES[case]
    gen = torch.Generator().manual_seed(3)
    shapes = {"w1": (5, 3), "b1": (5,), "w2": (2, 5)}
    params = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    rule = StepRule(kind, {n: hyper for n in shapes}, *clip)
    lrs = dict.fromkeys(shapes, 0.05)

    def step(params, state, fresh=frozenset()):
        return rule.step(params, state, grad(smooth_loss)(params), lrs, fresh)

    fresh, state = rule.fresh({}), rule.init_state(params, {})
    for t in range(warmup):
        params, state = step(params, state, fresh if t == 0 else frozenset())
    if clip:
        assert total_norm(grad(smooth_loss)(params)) > 2 * clip[0]

    def tangents(seed):
        gen = torch.Generator().manual_seed(seed)

        def like(slot, x):
            noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
            # keep the second moment positive under the finite-difference perturbation
            return {"step": 0 * x, "exp_avg_sq": x * noise}.get(slot, noise)

        return (
            {n: like(None, p) for n, p in params.items()},
            {n: {s: like(s, x) for s, x in slots.items()} for n, slots in state.items()},
        )

    first = fresh if warmup == 0 else frozenset()
    return (lambda p, s: step(p, s, first)), params, state, tangents


def central_difference(f, primals, tangents, eps=1e-6):
    plus = f(*tree_map(lambda x, t: x + eps * t, primals, tangents))
    minus = f(*tree_map(lambda x, t: x - eps * t, primals, tangents))
    return tree_map(lambda a, b: (a - b) / (2 * eps), plus, minus)


@pytest.mark.parametrize("warmup", [0, 3], ids=["first-step", "later-step"])
@pytest.mark.parametrize("case", JVP_RULES)
def test_jvp_matches_finite_differences_and_batches_with_vmap(case, warmup):
    f, params, state, tangents = jvp_problem(case, warmup)
    tangent = tangents(0)
    _, derivative = jvp(f, (params, state), tangent)
    torch.testing.assert_close(
        derivative, central_difference(f, (params, state), tangent), rtol=1e-6, atol=1e-9
    )

    batch = [tangents(seed) for seed in range(3)]
    stacked = tree_map(lambda *xs: torch.stack(xs), *batch)
    batched = vmap(lambda p, s: jvp(f, (params, state), (p, s))[1])(*stacked)
    separate = tree_map(
        lambda *xs: torch.stack(xs), *[jvp(f, (params, state), t)[1] for t in batch]
    )
    torch.testing.assert_close(batched, separate, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", JVP_RULES)
def test_vjp_is_the_adjoint_of_jvp(case):
    f, params, state, tangents = jvp_problem(case, 3)
    tangent, cotangent = tangents(0), tangents(1)
    _, pullback = vjp(f, params, state)
    _, derivative = jvp(f, (params, state), tangent)

    def dot(a, b):
        return sum((x * y).sum() for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True))

    torch.testing.assert_close(dot(cotangent, derivative), dot(pullback(cotangent), tangent))


def test_zero_gradients_give_finite_adam_tangents():
    """w1[:, 2] never gets a gradient, so its second moment stays 0, where sqrt has an infinite
    derivative; the tangents must stay finite (plain sqrt gives 0 * inf = NaN)."""
    f, params, state, tangents = jvp_problem("adamw", 0)
    tangent = tangents(0)
    (_, new_state), (dparams, dstate) = jvp(f, (params, state), tangent)
    assert torch.equal(new_state["w1"]["exp_avg_sq"][:, 2], torch.zeros(5, dtype=torch.float64))
    assert all(bool(torch.isfinite(x).all()) for x in tree_leaves((dparams, dstate)))
    expected = central_difference(f, (params, state), tangent)
    torch.testing.assert_close((dparams, dstate), expected, rtol=1e-6, atol=1e-9)
