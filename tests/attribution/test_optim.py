"""The optimizers against closed forms and torch.optim; state by name round trips."""

import pytest
import torch

from attribution.record.optim import (
    SGDW,
    build_optimizer,
    group_hyperparameters,
    load_state_by_name,
    optimizer_kind,
    state_by_name,
    steps_with_frozen_gradient,
)


def quadratic_grads(p: torch.Tensor) -> torch.Tensor:
    return 2.0 * p - 1.0


def test_sgdw_matches_closed_form_decoupled_decay_with_momentum():
    lr, wd, mu = 0.1, 0.3, 0.9
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = SGDW([p], lr=lr, momentum=mu, weight_decay=wd)
    ref, buf = p.detach().clone(), None
    for _ in range(5):
        g = quadratic_grads(p.detach())
        p.grad = g.clone()
        opt.step()
        ref = ref * (1 - lr * wd)
        buf = g if buf is None else mu * buf + g
        ref = ref - lr * buf
        torch.testing.assert_close(p.detach(), ref, rtol=0, atol=1e-15)


def test_build_optimizer_matches_torch_optim_per_group():
    torch.manual_seed(0)
    a0, b0 = torch.randn(3), torch.randn(2)
    mine = [torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())]
    theirs = [torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())]
    opt = build_optimizer(
        "adamw",
        [
            ([mine[0]], {"lr": 0.01, "betas": [0.8, 0.99], "eps": 1e-8, "weight_decay": 0.1}),
            ([mine[1]], {"lr": 0.02, "betas": [0.9, 0.999], "eps": 1e-6, "weight_decay": 0.0}),
        ],
    )
    ref = torch.optim.AdamW(
        [
            {"params": [theirs[0]], "lr": 0.01, "betas": (0.8, 0.99), "weight_decay": 0.1},
            {"params": [theirs[1]], "lr": 0.02, "eps": 1e-6, "weight_decay": 0.0},
        ]
    )
    for _ in range(10):
        for m, t in zip(mine, theirs, strict=True):
            m.grad, t.grad = quadratic_grads(m.detach()), quadratic_grads(t.detach())
        opt.step()
        ref.step()
    for m, t in zip(mine, theirs, strict=True):
        assert torch.equal(m, t)


def test_kind_and_hyperparameters_are_read_back_from_torch_optimizers():
    p = [torch.nn.Parameter(torch.zeros(1))]
    assert optimizer_kind(torch.optim.SGD(p, lr=0.1)) == "sgd"
    assert optimizer_kind(SGDW(p, lr=0.1)) == "sgdw"
    assert optimizer_kind(torch.optim.Adam(p)) == "adam"
    assert optimizer_kind(torch.optim.Adam(p, decoupled_weight_decay=True)) == "adamw"
    assert optimizer_kind(torch.optim.AdamW(p)) == "adamw"
    sgdw = SGDW(p, lr=0.1, momentum=0.5, weight_decay=0.2)
    assert group_hyperparameters("sgdw", sgdw.param_groups[0]) == {
        "momentum": 0.5,
        "dampening": 0.0,
        "nesterov": False,
        "weight_decay": 0.2,
    }


def test_unsupported_optimizer_options_are_refused():
    p = [torch.nn.Parameter(torch.zeros(1))]
    try:
        group_hyperparameters("adam", torch.optim.Adam(p, amsgrad=True).param_groups[0])
    except ValueError as exc:
        assert "amsgrad" in str(exc)
    else:
        raise AssertionError("amsgrad was accepted")


def test_state_by_name_round_trip_continues_like_the_original():
    torch.manual_seed(1)
    w0 = torch.randn(4)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt_a = torch.optim.Adam([a], lr=0.05)
    for _ in range(3):
        a.grad = quadratic_grads(a.detach())
        opt_a.step()
    state = state_by_name(opt_a, {id(a): "w"})
    with torch.no_grad():
        b.copy_(a)
    opt_b = torch.optim.Adam([b], lr=0.05)
    load_state_by_name(opt_b, state, {id(b): "w"})
    state["w"]["exp_avg"].add_(100.0)  # the loaded state must be a copy
    for _ in range(3):
        a.grad, b.grad = quadratic_grads(a.detach()), quadratic_grads(b.detach())
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)


FROZEN_CASES = [
    ("sgd", {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0}),
    ("sgd", {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.01}),
    ("sgd", {"momentum": 0.9, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0}),
    ("sgd", {"momentum": 0.9, "dampening": 0.1, "nesterov": False, "weight_decay": 5e-4}),
    ("sgd", {"momentum": 0.8, "dampening": 0.0, "nesterov": True, "weight_decay": 0.02}),
    ("sgdw", {"momentum": 0.9, "dampening": 0.0, "nesterov": False, "weight_decay": 0.05}),
    ("sgdw", {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.05}),
    ("adamw", {"betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.01}),
]


@pytest.mark.parametrize(("kind", "hyper"), FROZEN_CASES)
def test_frozen_gradient_steps_match_torch_steps_with_the_same_gradient(kind, hyper):
    """Parameters and state after several steps with one gradient, against the optimizer's own
    step taken as many times; two groups with their own rates, one parameter with a momentum
    buffer carried in and one without (a parameter added by the stage)."""
    torch.manual_seed(3)
    w0, v0 = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    g_w, g_v = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    lrs = [[0.1, 0.05], [0.08, 0.04], [0.06, 0.02], [0.03, 0.01]]

    def optimizer():
        w, v = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(v0.clone())
        opt = build_optimizer(kind, [([w], {"lr": 0.1, **hyper}), ([v], {"lr": 0.05, **hyper})])
        w.grad, v.grad = torch.ones_like(w), torch.ones_like(v)
        opt.step()  # w and v have a history (Adam: its step count; SGD: a buffer)
        if kind != "adamw":
            opt.state[v].clear()  # v starts without a buffer, as an added parameter does
        w.grad, v.grad = g_w.clone(), g_v.clone()
        return opt, (w, v)

    mine, (w, v) = optimizer()
    steps_with_frozen_gradient(mine, lrs)
    theirs, (w_ref, v_ref) = optimizer()
    for row in lrs:
        for group, lr in zip(theirs.param_groups, row, strict=True):
            group["lr"] = lr
        theirs.step()
    torch.testing.assert_close(w.detach(), w_ref.detach(), rtol=0, atol=1e-13)
    torch.testing.assert_close(v.detach(), v_ref.detach(), rtol=0, atol=1e-13)
    for p, q in ((w, w_ref), (v, v_ref)):
        assert mine.state[p].keys() == theirs.state[q].keys()
        for key in mine.state[p]:
            torch.testing.assert_close(mine.state[p][key], theirs.state[q][key], rtol=0, atol=1e-13)
    assert [g["lr"] for g in mine.param_groups] == lrs[-1]


def test_one_frozen_step_is_the_optimizers_own_step_bit_for_bit():
    torch.manual_seed(4)
    w0, g = torch.randn(6), torch.randn(6)
    w, w_ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    mine = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=1e-3)
    theirs = torch.optim.SGD([w_ref], lr=0.3, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        w.grad, w_ref.grad = g.clone(), g.clone()
        steps_with_frozen_gradient(mine, [[0.3]])
        theirs.step()
    assert torch.equal(w, w_ref)
