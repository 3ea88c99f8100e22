"""Curvature products and Lanczos against explicit matrices (torch.func.hessian, jacrev, eigh)."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from attribution.record.errors import StagetraceError
from estimators.curvature import (
    curvature_product,
    gauss_newton_product,
    hessian_product,
    lanczos,
    lanczos_iterations,
)


@pytest.fixture(scope="module")
def problem():
    """A tanh MLP (44 float64 parameters), cross-entropy on 20 random examples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(20, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (20,))
    point = {n: p.detach() for n, p in model.named_parameters()}
    return model, point, x, y


def flat(tensors, names):
    return torch.cat([tensors[n].reshape(-1) for n in names])


def unflat(vector, point, names):
    parts = torch.split(vector, [point[n].numel() for n in names])
    return {n: p.reshape(point[n].shape) for n, p in zip(names, parts, strict=True)}


def explicit_hessian(problem):
    model, point, x, y = problem
    names = list(point)

    def loss(vector):
        outputs = functional_call(model, unflat(vector, point, names), (x,))
        return nn.functional.cross_entropy(outputs, y)

    return hessian(loss)(flat(point, names))


def explicit_gauss_newton(problem):
    model, point, x, y = problem
    names = list(point)
    vector = flat(point, names)
    jacobian = jacrev(lambda v: functional_call(model, unflat(v, point, names), (x,)).reshape(-1))(
        vector
    )
    outputs = functional_call(model, point, (x,))
    output_hessian = hessian(lambda o: nn.functional.cross_entropy(o.reshape(20, 2), y))(
        outputs.reshape(-1)
    )
    return jacobian.T @ output_hessian @ jacobian


def test_hessian_vector_product_equals_the_explicit_hessian(problem):
    model, point, x, y = problem
    names = list(point)
    h = explicit_hessian(problem)
    v = torch.randn(len(h), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    product = hessian_product(model, point, names, nn.functional.cross_entropy, x, y)
    torch.testing.assert_close(flat(product(unflat(v, point, names)), names), h @ v)


def test_products_over_a_trained_subset_keep_the_mixed_terms_of_frozen_parameters(problem):
    model, point, x, y = problem
    names = list(point)
    trained = ["2.weight", "2.bias"]  # the output layer; the hidden layer is frozen
    rows = torch.cat(
        [
            torch.arange(point[n].numel()) + sum(point[m].numel() for m in names[:i])
            for i, n in enumerate(names)
            if n in trained
        ]
    )
    only_frozen = {"0.weight": torch.randn_like(point["0.weight"])}
    v = flat({**{n: torch.zeros_like(p) for n, p in point.items()}, **only_frozen}, names)
    for kind, matrix in (
        ("hessian", explicit_hessian(problem)),
        ("gauss_newton", explicit_gauss_newton(problem)),
    ):
        product = curvature_product(kind, model, point, trained, nn.functional.cross_entropy, x, y)
        got = flat(product(only_frozen), trained)
        assert got.abs().max() > 1e-3
        torch.testing.assert_close(got, (matrix @ v)[rows])


def test_gauss_newton_product_equals_jacobian_output_hessian_jacobian(problem):
    model, point, x, y = problem
    names = list(point)
    gn = explicit_gauss_newton(problem)
    v = torch.randn(len(gn), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    product = gauss_newton_product(model, point, names, nn.functional.cross_entropy, x, y)
    torch.testing.assert_close(flat(product(unflat(v, point, names)), names), gn @ v)
    # It differs from the Hessian: the tanh network has a residual (second-order) term.
    assert (gn - explicit_hessian(problem)).abs().max() > 1e-3


def assert_eigenpairs(values, vectors, expected_values, expected_vectors, rtol):
    scale = expected_values.abs().max()
    assert (values - expected_values).abs().max() <= rtol * scale
    signs = torch.sign((vectors * expected_vectors).sum(0))
    torch.testing.assert_close(vectors * signs, expected_vectors, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        vectors.T @ vectors, torch.eye(vectors.shape[1], dtype=vectors.dtype)
    )


def test_lanczos_finds_the_top_eigenpairs_of_an_indefinite_hessian(problem):
    model, point, x, y = problem
    names = list(point)
    h = explicit_hessian(problem)
    product = hessian_product(model, point, names, nn.functional.cross_entropy, x, y)
    dim, rank = len(h), 12
    values, vectors = lanczos(
        lambda v: flat(product(unflat(v, point, names)), names), dim, rank, iterations=dim, seed=3
    )
    expected, eigenvectors = torch.linalg.eigh(h)
    # Indefinite, and its most negative eigenvalue outweighs the 12th: the top by value is meant.
    assert expected.min() < -torch.sort(expected, descending=True).values[rank - 1]
    order = torch.argsort(expected, descending=True)[:rank]
    assert_eigenpairs(values, vectors, expected[order], eigenvectors[:, order], 1e-8)


def test_lanczos_default_iterations_converge_on_outlying_eigenvalues():
    """Neural-network curvature has a few outliers over a bulk: there the default number of
    iterations (max(2 r, r + 10), here 15 for 200 dimensions) resolves the top r."""
    g = torch.Generator().manual_seed(4)
    basis, _ = torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64, generator=g))
    spectrum = torch.cat(
        [
            torch.tensor([100.0, 60.0, 35.0, 20.0, 12.0], dtype=torch.float64),
            torch.rand(195, dtype=torch.float64, generator=g) - 0.5,
        ]
    )
    matrix = basis @ torch.diag(spectrum) @ basis.T
    assert lanczos_iterations(200, 5) == 15
    values, vectors = lanczos(lambda v: matrix @ v, 200, 5)
    assert_eigenpairs(values, vectors, spectrum[:5], basis[:, :5], 1e-8)


def test_lanczos_with_rank_above_dim_returns_the_whole_spectrum():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(6, 6, dtype=torch.float64, generator=g)
    matrix = a + a.T
    values, vectors = lanczos(lambda v: matrix @ v, 6, 20)
    expected, eigenvectors = torch.linalg.eigh(matrix)
    assert values.shape == (6,) and vectors.shape == (6, 6)
    assert_eigenpairs(values, vectors, expected.flip(0), eigenvectors.flip(1), 1e-10)


def test_lanczos_restarts_when_the_krylov_space_is_invariant():
    """Repeated eigenvalues and a null space stop the Krylov space after three vectors; a
    restart finds every multiplicity."""
    g = torch.Generator().manual_seed(6)
    basis, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64, generator=g))
    spectrum = torch.tensor([5.0, 5.0, 5.0, 2.0, 2.0, 0, 0, 0, 0, 0], dtype=torch.float64)
    matrix = basis @ torch.diag(spectrum) @ basis.T
    values, vectors = lanczos(lambda v: matrix @ v, 10, 10)
    torch.testing.assert_close(values, spectrum, rtol=0, atol=1e-10)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(10, dtype=torch.float64))
    torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, matrix)


def test_lanczos_rank_zero_and_bad_arguments():
    values, vectors = lanczos(lambda v: v, 4, 0)
    assert values.shape == (0,) and vectors.shape == (4, 0)
    with pytest.raises(StagetraceError, match="rank >= 0"):
        lanczos(lambda v: v, 4, -1)
    with pytest.raises(StagetraceError, match="iterations"):
        lanczos(lambda v: v, 10, 5, iterations=3)
    with pytest.raises(StagetraceError, match="curvature"):
        curvature_product("fisher", nn.Linear(1, 1), {}, [], None, None, None)
