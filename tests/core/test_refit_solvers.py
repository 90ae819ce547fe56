"""The masked ridge refit (neurorewrite.fpe.refit) at its edges: the block preconditioner is the exact
inverse of a block-diagonal operator (one CG step), the reported residual and ridge are the documented
ones, rows without a bias or without a support, weights that fit to exactly zero, and the types and
messages a caller relies on."""

from __future__ import annotations

import numpy as np
import pytest

from neurorewrite.errors import InvalidOptionError
from neurorewrite.fpe.gram import FitAccumulator, GramAccumulator, Moments, Rows
from neurorewrite.fpe.refit import SOLVERS, refit_masked

PARENTS, ALPHA, OUTPUTS, N = 6, 4, 5, 100


def block_diagonal_problem(ridge_scale: float = 1.0) -> tuple[Moments, np.ndarray, np.ndarray]:
    """Moments whose operator is block diagonal in groups of ``ALPHA`` children for every row: the Gram
    has no entries between parents and the mean is nonzero only in parent 0 (so the rank-one term of a
    row without bias stays inside that block). The parents' scales span four decades."""
    rng = np.random.default_rng(0)
    width = PARENTS * ALPHA
    gram = np.zeros((width, width))
    for p in range(PARENTS):
        a = rng.standard_normal((ALPHA, ALPHA))
        gram[p * ALPHA:(p + 1) * ALPHA, p * ALPHA:(p + 1) * ALPHA] = 10.0 ** (p - 2) * (a @ a.T + 0.5 * np.eye(ALPHA))
    mean_h = np.zeros(width)
    mean_h[:ALPHA] = rng.standard_normal(ALPHA) * 0.3
    moments = Moments(gram.astype(np.float32), (ridge_scale * rng.standard_normal((width, OUTPUTS))).astype(np.float32),
                      mean_h, rng.standard_normal(OUTPUTS), np.full(OUTPUTS, 50.0), N)
    w0 = rng.standard_normal((OUTPUTS, width)).astype(np.float32)
    w0[rng.random(w0.shape) < 0.35] = 0.0  # each row keeps a different subset of every parent's children
    b0 = np.array([0.0, 0.7, 0.0, -0.4, 1.1], np.float32)  # rows 0 and 2 have no bias: the uncentred problem
    return moments, w0, b0


def operator_and_rhs(moments: Moments, w0: np.ndarray, b0: np.ndarray | None, lam: float, row: int):
    """Row ``row``'s system on its support, from the module docstring, in float64."""
    support = np.flatnonzero(w0[row])
    g = moments.gram.astype(np.float64)[np.ix_(support, support)]
    rhs = moments.cross.astype(np.float64)[support, row] + lam * w0[row, support]
    if b0 is None or b0[row] == 0:
        mu = moments.mean_h[support]
        g = g + moments.n * np.outer(mu, mu)
        rhs = rhs + moments.n * moments.mean_t[row] * mu
    return g + lam * np.eye(len(support)), rhs, support


def test_the_block_preconditioner_solves_a_block_diagonal_problem_in_one_step():
    moments, w0, b0 = block_diagonal_problem()
    w, b, info = refit_masked(moments, w0, b0, ridge=0.05, solver="cg", groups=ALPHA, max_iters=50, tol=1e-4)
    assert info.iterations == 1
    exact, exact_b, _ = refit_masked(moments, w0, b0, ridge=0.05, solver="exact")
    np.testing.assert_allclose(w, exact, rtol=1e-4, atol=1e-5 * np.abs(exact).max())
    np.testing.assert_allclose(b, exact_b, rtol=1e-4, atol=1e-6)
    # and the exact solver is the documented system, row by row
    for row in range(OUTPUTS):
        a, rhs, support = operator_and_rhs(moments, w0, b0, info.ridge, row)
        np.testing.assert_allclose(exact[row, support], np.linalg.solve(a, rhs), rtol=1e-4, atol=1e-6)


def test_groups_that_do_not_divide_the_width_fall_back_to_jacobi():
    moments, w0, b0 = block_diagonal_problem()
    exact = refit_masked(moments, w0, b0, ridge=0.05, solver="exact")[0]
    jacobi = refit_masked(moments, w0, b0, ridge=0.05, groups=1, max_iters=400, tol=1e-6)[2].iterations
    for groups in (5, 7):  # 24 inputs: neither divides them
        w, _, info = refit_masked(moments, w0, b0, ridge=0.05, groups=groups, max_iters=400, tol=1e-6)
        assert info.iterations == jacobi > 1
        np.testing.assert_allclose(w, exact, rtol=1e-3, atol=1e-4 * np.abs(exact).max())


def relative_residuals(moments: Moments, w0: np.ndarray, b0: np.ndarray, lam: float, w: np.ndarray) -> np.ndarray:
    out = []
    for row in range(OUTPUTS):
        a, rhs, support = operator_and_rhs(moments, w0, b0, lam, row)
        out.append(np.linalg.norm(rhs - a @ w[row, support].astype(np.float64)) / np.linalg.norm(rhs))
    return np.array(out)


@pytest.mark.parametrize("iterations", [0, 2])
def test_the_reported_residual_is_the_largest_relative_residual_of_the_rows(iterations):
    # small right-hand sides (norms well below 1): a floor on the norm would show
    moments, w0, b0 = block_diagonal_problem(ridge_scale=1e-3)
    w0 = w0 * 1e-3
    w, _, info = refit_masked(moments, w0, b0, ridge=0.05, groups=1, max_iters=iterations, tol=0.0)
    assert info.iterations == iterations and isinstance(info.residual, float)
    expected = relative_residuals(moments, w0, b0, info.ridge, w)
    np.testing.assert_allclose(info.residual, expected.max(), rtol=0.02)


def test_the_default_options_converge():
    moments, w0, b0 = block_diagonal_problem()
    w, b, _ = refit_masked(moments, w0, b0)
    exact, exact_b, _ = refit_masked(moments, w0, b0, solver="exact")
    assert moments.error(w, b).sum() <= 1.001 * moments.error(exact, exact_b).sum()
    np.testing.assert_allclose(w, exact, atol=1e-3 * np.abs(exact).max())


def test_the_ridge_is_relative_to_the_mean_diagonal_of_the_gram():
    moments, w0, b0 = block_diagonal_problem()
    mean_diagonal = float(np.mean(np.diag(moments.gram)))
    assert mean_diagonal > 10  # far from 1: an absolute ridge, or one divided by it, would show
    assert refit_masked(moments, w0, b0, ridge=1e-4)[2].ridge == pytest.approx(1e-4 * mean_diagonal)
    # a Gram of zeros (inputs that never vary) keeps the ridge as given: the system stays invertible
    flat = Moments(np.zeros_like(moments.gram), moments.cross, moments.mean_h, moments.mean_t, moments.target_ss, N)
    w, _, info = refit_masked(flat, w0, b0, ridge=1e-4, solver="exact")
    assert info.ridge == 1e-4 and np.isfinite(w).all()
    # for rows, the centred sum of squares per input
    h = np.random.default_rng(1).standard_normal((3, 24)) * 7.0
    acc = FitAccumulator(24, OUTPUTS)
    acc.add(h, np.zeros((3, OUTPUTS)))
    rows = acc.finish()
    assert isinstance(rows, Rows)
    expected = 1e-4 * float(((h - h.mean(0)) ** 2).sum()) / 24
    assert refit_masked(rows, w0, b0, ridge=1e-4)[2].ridge == pytest.approx(expected)


@pytest.mark.parametrize("solver", SOLVERS)
def test_without_a_bias_every_row_is_fit_uncentred_and_no_bias_is_returned(solver):
    moments, w0, _ = block_diagonal_problem()
    w, b, info = refit_masked(moments, w0, None, ridge=0.05, solver=solver, groups=ALPHA, max_iters=200, tol=1e-7)
    assert b is None
    for row in range(OUTPUTS):
        a, rhs, support = operator_and_rhs(moments, w0, None, info.ridge, row)
        np.testing.assert_allclose(w[row, support], np.linalg.solve(a, rhs), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_row_without_support_stays_empty_and_a_row_with_one_weight_is_fit(solver):
    moments, w0, b0 = block_diagonal_problem()
    w0[0] = 0.0  # first: nothing to fit
    w0[1] = 0.0
    w0[1, 5] = 0.8  # one weight
    w, b, info = refit_masked(moments, w0, b0, ridge=0.05, solver=solver, groups=ALPHA, max_iters=200, tol=1e-7)
    assert np.isfinite(w).all() and np.isfinite(b).all()
    np.testing.assert_array_equal(w != 0, w0 != 0)
    for row in range(1, OUTPUTS):
        a, rhs, support = operator_and_rhs(moments, w0, b0, info.ridge, row)
        np.testing.assert_allclose(w[row, support], np.linalg.solve(a, rhs), rtol=1e-3, atol=1e-5)


def test_direct_solves_report_no_iterations_and_no_residual():
    moments, w0, b0 = block_diagonal_problem()
    info = refit_masked(moments, w0, b0, solver="exact")[2]
    assert (info.solver, info.iterations, info.residual) == ("exact", 0, 0.0)
    acc = FitAccumulator(w0.shape[1], OUTPUTS)
    acc.add(np.random.default_rng(2).standard_normal((4, w0.shape[1])), np.ones((4, OUTPUTS)))
    info = refit_masked(acc.finish(), w0, b0)[2]
    assert (info.solver, info.iterations, info.residual) == ("rows", 0, 0.0)


def test_the_weights_keep_their_types():
    moments, w0, b0 = block_diagonal_problem()
    for solver in SOLVERS:
        w, b, _ = refit_masked(moments, w0, b0, solver=solver)
        assert w.dtype == np.float32 and b.dtype == np.float32


def test_a_weight_or_bias_that_fits_to_exactly_zero_stays_in_the_pattern():
    # a diagonal Gram, no ridge, a cross term of exactly 0 on a kept weight and zero means: the
    # least-squares value of that weight, and of every bias, is exactly 0.0
    gram = np.diag([2.0, 3.0, 4.0]).astype(np.float32)
    cross = np.array([[1.0], [0.0], [2.0]], np.float32)
    moments = Moments(gram, cross, np.zeros(3), np.zeros(1), np.ones(1), 10)
    w0, b0 = np.array([[1.0, 1.0, 1.0]], np.float32), np.array([0.5], np.float32)
    w, b, _ = refit_masked(moments, w0, b0, ridge=0.0, solver="exact")
    tiny = np.finfo(np.float32).tiny
    np.testing.assert_array_equal(w, [[0.5, tiny, 0.5]])
    np.testing.assert_array_equal(b, [tiny])


def test_an_unknown_solver_is_named_with_the_choices():
    moments, w0, b0 = block_diagonal_problem()
    with pytest.raises(InvalidOptionError, match=r"^--solver must be one of cg, exact, got 'lu'$"):
        refit_masked(moments, w0, b0, solver="lu")


def test_a_single_row_with_a_bias_is_solved_in_the_row_space():
    # the row-space solve takes rows with and without a bias in two groups; here the first has one row
    rng = np.random.default_rng(3)
    h, t = rng.standard_normal((5, 30)) + 1.0, rng.standard_normal((5, 3))
    w0 = rng.standard_normal((3, 30)).astype(np.float32)
    b0 = np.array([0.0, 0.9, 0.0], np.float32)
    acc, gram = FitAccumulator(30, 3), GramAccumulator(30, 3, np.float64)
    acc.add(h, t)
    gram.add(h, t)
    fast, fast_b, _ = refit_masked(acc.finish(), w0, b0)
    exact, exact_b, _ = refit_masked(gram.finish(), w0, b0, solver="exact")
    np.testing.assert_allclose(fast, exact, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fast_b, exact_b, rtol=1e-4, atol=1e-5)
    # and without any bias (no centred group at all)
    np.testing.assert_allclose(refit_masked(acc.finish(), w0, None)[0],
                               refit_masked(gram.finish(), w0, None, solver="exact")[0], rtol=1e-4, atol=1e-5)
