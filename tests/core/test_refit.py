"""Streaming moments and the masked ridge refit: exact statistics, the CG solver reaches the exact solution."""

from __future__ import annotations

import numpy as np
import pytest

from neurorewrite.errors import InvalidOptionError
from neurorewrite.fpe.gram import GramAccumulator
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


def moments(h, t, chunk=300):
    acc = GramAccumulator(h.shape[1], t.shape[1])
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
    # optimal: the gradient of the ridge objective vanishes on the support
    resid = t.astype(np.float64) - h @ w.T.astype(np.float64) - b
    grad = -(h.T.astype(np.float64) @ resid).T + info.ridge * w
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
