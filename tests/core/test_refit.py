"""Streaming moments and the masked ridge refit: exact statistics, the CG and row-space solvers reach the
exact solution, the ridge pulls towards the expanded weights."""

from __future__ import annotations

import numpy as np
import pytest

from neurorewrite.errors import InvalidOptionError
from neurorewrite.fpe.gram import FitAccumulator, GramAccumulator, Moments, Rows
from neurorewrite.fpe.refit import refit_masked


def problem(seed: int = 0, n: int = 2000, parents: int = 20, alpha: int = 3, outputs: int = 7):
    rng = np.random.default_rng(seed)
    # children of a parent are correlated, and activations have a large mean (as after GELU)
    z = rng.standard_normal((n, parents * alpha)) + 2 * rng.standard_normal((n, parents)).repeat(alpha, axis=1)
    h = (np.maximum(z, 0) + 5.0).astype(np.float32)
    t = (h @ rng.standard_normal((parents * alpha, outputs)) + 3.0).astype(np.float32)
    w0 = rng.standard_normal((outputs, parents * alpha)).astype(np.float32)
    w0[rng.random(w0.shape) < 0.4] = 0.0
    b0 = rng.standard_normal(outputs).astype(np.float32)
    b0[:2] = 0.0  # rows without a bias keep it at zero
    return h, t, w0, b0


def moments(h, t, chunk=300, dtype=np.float32):
    acc = GramAccumulator(h.shape[1], t.shape[1], dtype)
    for s in range(0, len(h), chunk):
        acc.add(h[s:s + chunk], t[s:s + chunk])
    return acc.finish()


def test_streamed_moments_equal_the_whole_sample():
    h, t, _, _ = problem()
    m = moments(h, t)
    h64, t64 = h.astype(np.float64), t.astype(np.float64)
    hc, tc = h64 - h64.mean(0), t64 - t64.mean(0)
    np.testing.assert_allclose(m.gram, hc.T @ hc, rtol=2e-4, atol=1e-2 * len(h) * 1e-3)
    np.testing.assert_allclose(m.cross, hc.T @ tc, rtol=2e-4, atol=len(h) * 1e-3)
    np.testing.assert_allclose(m.mean_h, h64.mean(0), rtol=1e-6)
    assert m.n == len(h)


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_refit_minimises_on_the_support_and_keeps_the_pattern(solver):
    h, t, w0, b0 = problem()
    m = moments(h, t)
    w, b, info = refit_masked(m, w0, b0, solver=solver, groups=3, max_iters=200, tol=1e-7)
    np.testing.assert_array_equal(w != 0, w0 != 0)
    np.testing.assert_array_equal(b != 0, b0 != 0)
    # the error formula of the moments is the real error
    real = ((t.astype(np.float64) - h @ w.T.astype(np.float64) - b) ** 2).sum(0)
    np.testing.assert_allclose(m.error(w, b), real, rtol=1e-3)
    assert (real < ((t - h @ w0.T - b0) ** 2).sum(0)).all()
    # optimal: the gradient of the ridge objective (towards w0) vanishes on the support
    resid = t.astype(np.float64) - h @ w.T.astype(np.float64) - b
    grad = -(h.T.astype(np.float64) @ resid).T + info.ridge * (w.astype(np.float64) - w0)
    scale = np.abs(h.T.astype(np.float64) @ t).max()
    assert np.abs(grad * (w0 != 0)).max() < 1e-3 * scale


def test_cg_converges_to_the_exact_solution():
    h, t, w0, b0 = problem(seed=1)
    m = moments(h, t)
    exact = refit_masked(m, w0, b0, solver="exact")
    cg = refit_masked(m, w0, b0, solver="cg", groups=3, max_iters=300, tol=1e-7)
    np.testing.assert_allclose(cg[0], exact[0], rtol=1e-3, atol=1e-3 * np.abs(exact[0]).max())
    np.testing.assert_allclose(cg[1], exact[1], rtol=1e-3, atol=1e-3 * np.abs(exact[1]).max())
    assert cg[2].iterations < 300


def test_a_few_warm_started_iterations_already_lower_the_error():
    h, t, w0, b0 = problem(seed=2)
    m = moments(h, t)
    w, b, info = refit_masked(m, w0, b0, solver="cg", groups=3, max_iters=3, tol=0)
    assert info.iterations == 3 and m.error(w, b).sum() < 0.5 * m.error(w0, b0).sum()


def test_unknown_solver():
    h, t, w0, b0 = problem()
    with pytest.raises(InvalidOptionError, match="--solver"):
        refit_masked(moments(h, t), w0, b0, solver="lu")


def rows_of(h, t, chunk=7):
    acc = FitAccumulator(h.shape[1], t.shape[1])
    for s in range(0, len(h), chunk):
        acc.add(h[s:s + chunk], t[s:s + chunk])
    return acc.finish()


def test_few_rows_are_kept_as_rows_and_many_become_a_gram():
    h, t, _, _ = problem(n=2000)
    width = h.shape[1]  # 60: rows are kept while n (n + 1) / 2 <= 60, i.e. up to 10 rows
    kept = rows_of(h[:10], t[:10], chunk=3)
    assert isinstance(kept, Rows) and kept.n == 10
    np.testing.assert_array_equal(kept.h, h[:10].astype(np.float64))
    folded = rows_of(h[:300], t[:300], chunk=7)
    assert isinstance(folded, Moments) and folded.n == 300
    whole = moments(h[:300], t[:300])
    np.testing.assert_allclose(folded.gram, whole.gram, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(folded.mean_h, whole.mean_h, rtol=1e-6)
    assert width == 60


@pytest.mark.parametrize("seed", [0, 3])
def test_the_row_space_solve_is_the_exact_minimiser(seed):
    # underdetermined: 9 rows for supports of ~36 inputs, where the ridge towards w0 decides the answer
    h, t, w0, b0 = problem(seed=seed, n=9)
    rows = rows_of(h, t, chunk=4)
    assert isinstance(rows, Rows)
    # the reference in float64: with 9 rows the answer hangs on the tiny ridge, so a float32 Gram's
    # rounding moves it by ~1%
    exact = refit_masked(moments(h, t, dtype=np.float64), w0, b0, solver="exact")
    fast = refit_masked(rows, w0, b0)
    assert fast[2].solver == "rows"
    np.testing.assert_allclose(fast[2].ridge, exact[2].ridge, rtol=1e-6)
    np.testing.assert_array_equal(fast[0] != 0, w0 != 0)
    np.testing.assert_allclose(fast[0], exact[0], rtol=1e-5, atol=1e-5 * np.abs(exact[0]).max())
    np.testing.assert_allclose(fast[1], exact[1], rtol=1e-5, atol=1e-5 * np.abs(exact[1]).max())
    # the rows' error is the real one; nine rows are fit almost exactly
    real = ((t.astype(np.float64) - h @ fast[0].T.astype(np.float64) - fast[1]) ** 2).sum(0)
    np.testing.assert_allclose(rows.error(*fast[:2]), real, rtol=1e-6, atol=1e-9)
    assert (real < 1e-4 * rows.error(w0, b0)).all()


def test_the_row_space_solve_in_chunks_equals_one_chunk(monkeypatch):
    from neurorewrite.fpe import refit

    h, t, w0, b0 = problem(seed=4, n=8)
    rows = rows_of(h, t)
    whole = refit_masked(rows, w0, b0)[0]
    monkeypatch.setattr(refit, "CHUNK_ELEMENTS", 100)  # several chunks of output rows and of inputs
    np.testing.assert_allclose(refit_masked(rows, w0, b0)[0], whole, rtol=1e-5, atol=1e-6)


def test_an_underdetermined_fit_keeps_what_the_rows_do_not_see():
    # a weight on an input the sample never activates is not shrunk towards zero
    h, t, w0, b0 = problem(seed=5, n=8)
    h[:, 0] = 0.0
    w0[:, 0] = 1.5
    w, _, _ = refit_masked(rows_of(h, t), w0, b0)
    np.testing.assert_allclose(w[2:, 0], 1.5, rtol=1e-6)  # rows 2.. have a bias: the centred column is 0
