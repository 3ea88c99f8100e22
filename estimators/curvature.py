"""Curvature of a training loss without forming a matrix: Hessian- and Gauss-Newton-vector
products by ``torch.func``, and Lanczos for the top eigenpairs of a symmetric operator.

A product operator maps a tangent (a dict over any of the point's parameters; names left out are
zero) to a dict over the ``trained`` names: the rows of the curvature matrix for the parameters
that are differentiated, the columns for every parameter the tangent moves. Frozen parameters thus
still act on the trained ones through the mixed second derivatives. Memory stays that of a few
gradients: nothing of size ``p x p`` is formed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp

from attribution.record.errors import StagetraceError

Params = dict[str, torch.Tensor]
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Operator = Callable[[Mapping[str, torch.Tensor]], Params]
CURVATURES = ("hessian", "gauss_newton")


def curvature_product(
    kind: str,
    model: nn.Module,
    point: Mapping[str, torch.Tensor],
    trained: Sequence[str],
    loss: Loss,
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> Operator:
    """The product ``v -> C v`` of the loss curvature ``C`` at ``point`` (parameters, and
    buffers that are passed on as they are), ``kind`` one of ``CURVATURES``.

    ``loss(model(inputs), targets)`` is the mean-reduced loss; tangents are moved to the
    point's devices and cast to its dtypes, and the result keeps them (the products run where
    the point and ``inputs`` are).
    """
    if kind == "hessian":
        return hessian_product(model, point, trained, loss, inputs, targets)
    if kind == "gauss_newton":
        return gauss_newton_product(model, point, trained, loss, inputs, targets)
    raise StagetraceError(f"unknown curvature {kind!r}. Fix: use one of {', '.join(CURVATURES)}")


def hessian_product(
    model: nn.Module,
    point: Mapping[str, torch.Tensor],
    trained: Sequence[str],
    loss: Loss,
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> Operator:
    """``v -> H v``, the loss Hessian by forward-over-reverse (a jvp of the gradient)."""

    def product(tangent: Mapping[str, torch.Tensor]) -> Params:
        primals, tangents = _split(point, tangent)

        def gradient(moved: Params) -> Params:
            base = {**point, **moved}

            def training_loss(part: Params) -> torch.Tensor:
                return loss(functional_call(model, {**base, **part}, (inputs,)), targets)

            return grad(training_loss)({n: base[n] for n in trained})

        return jvp(gradient, (primals,), (tangents,))[1]

    return product


def gauss_newton_product(
    model: nn.Module,
    point: Mapping[str, torch.Tensor],
    trained: Sequence[str],
    loss: Loss,
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> Operator:
    """``v -> J^T H_out J v``: the Gauss-Newton matrix, with ``J`` the Jacobian of the model
    outputs and ``H_out`` the Hessian of the loss in the outputs (a jvp of its gradient there),
    so generic in the loss. Positive semi-definite wherever the loss is convex in the outputs."""

    def outputs(part: Params) -> torch.Tensor:
        return functional_call(model, {**point, **part}, (inputs,))

    def output_gradient(out: torch.Tensor) -> torch.Tensor:
        return grad(lambda o: loss(o, targets))(out)

    def product(tangent: Mapping[str, torch.Tensor]) -> Params:
        primals, tangents = _split(point, tangent)
        out, moved = jvp(outputs, (primals,), (tangents,))
        curved = jvp(output_gradient, (out,), (moved,))[1]
        pullback = vjp(outputs, {n: point[n] for n in trained})[1]
        return pullback(curved)[0]

    return product


def _split(
    point: Mapping[str, torch.Tensor], tangent: Mapping[str, torch.Tensor]
) -> tuple[Params, Params]:
    unknown = sorted(set(tangent) - set(point))
    if unknown:
        raise StagetraceError(
            f"tangent names {unknown} are not parameters of the model. Fix: give offsets over "
            "the model's parameter names"
        )
    return (
        {n: point[n] for n in tangent},
        {n: v.to(point[n].device, point[n].dtype) for n, v in tangent.items()},
    )


def lanczos_iterations(dim: int, rank: int) -> int:
    """Lanczos steps used for ``rank`` eigenpairs: ``max(2 rank, rank + 10)``, at most ``dim``.

    Twice the wanted count lets the top Ritz pairs converge where the spectrum has the outlier
    structure of neural-network curvature (a few large eigenvalues above a bulk); ``+ 10`` keeps
    small ranks from being read off a too-short Krylov space. At ``dim`` it is exact.
    """
    return min(dim, max(2 * rank, rank + 10))


def lanczos(
    operator: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    rank: int,
    iterations: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top eigenpairs ``(values [r], vectors [dim, r])`` of a symmetric operator on float64
    vectors of length ``dim``, sorted by eigenvalue descending (algebraic, not by magnitude),
    with ``r = min(rank, dim)``.

    Lanczos with full reorthogonalisation in float64, ``iterations`` steps (default
    ``lanczos_iterations``) from a normal start vector drawn with ``seed``. On breakdown (the
    Krylov space is invariant) it restarts from a new random vector orthogonal to the basis, so
    ``iterations = dim`` always yields the full spectrum. Columns of ``vectors`` are orthonormal.
    The basis, the operator's vectors and the results live on ``device``; random vectors are
    drawn on the CPU (the same on every device) and moved there.
    """
    if rank < 0 or dim < 0:
        raise StagetraceError(f"Lanczos needs rank >= 0 and dim >= 0, got {rank} and {dim}")
    rank = min(rank, dim)
    steps = lanczos_iterations(dim, rank) if iterations is None else min(iterations, dim)
    if rank == 0:
        return (
            torch.zeros(0, dtype=torch.float64, device=device),
            torch.zeros(dim, 0, dtype=torch.float64, device=device),
        )
    if steps < rank:
        raise StagetraceError(
            f"{steps} Lanczos iterations cannot give {rank} eigenpairs. Fix: use at least as "
            "many iterations as eigenpairs"
        )
    generator = torch.Generator().manual_seed(seed)
    basis = torch.zeros(dim, steps, dtype=torch.float64, device=device)
    alphas = torch.zeros(steps, dtype=torch.float64, device=device)
    betas = torch.zeros(max(steps - 1, 0), dtype=torch.float64, device=device)
    q = _fresh_direction(basis[:, :0], dim, generator)
    scale = 0.0
    for i in range(steps):
        basis[:, i] = q
        w = operator(q).to(torch.float64)
        alphas[i] = q @ w
        # Full reorthogonalisation, twice ("twice is enough"), against every basis vector.
        for _ in range(2):
            w = w - basis[:, : i + 1] @ (basis[:, : i + 1].T @ w)
        if i + 1 == steps:
            break
        beta = float(w.norm())
        scale = max(scale, abs(float(alphas[i])), beta)
        if beta <= 1e-10 * scale or beta == 0.0:
            q = _fresh_direction(basis[:, : i + 1], dim, generator)
        else:
            betas[i], q = beta, w / beta
    tridiagonal = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
    values, ritz = torch.linalg.eigh(tridiagonal)
    order = torch.argsort(values, descending=True)[:rank]
    return values[order], basis @ ritz[:, order]


def _fresh_direction(basis: torch.Tensor, dim: int, generator: torch.Generator) -> torch.Tensor:
    """A unit vector orthogonal to ``basis``'s columns (a random normal one drawn on the CPU,
    moved to the basis's device, projected)."""
    for _ in range(10):
        v = torch.randn(dim, generator=generator, dtype=torch.float64).to(basis.device)
        for _ in range(2):
            v = v - basis @ (basis.T @ v)
        norm = float(v.norm())
        if norm > 1e-8 * math.sqrt(dim):
            return v / norm
    raise StagetraceError(
        "Lanczos found no direction orthogonal to its basis. Fix: use fewer iterations"
    )
