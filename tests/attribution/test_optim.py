"""The optimizers against closed forms and torch.optim; state by name round trips."""

import torch

from attribution.record.optim import (
    SGDW,
    build_optimizer,
    group_hyperparameters,
    load_state_by_name,
    optimizer_kind,
    state_by_name,
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
