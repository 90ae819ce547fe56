"""Choosing a pruned row's support again from the sample's Gram matrix (fpe/support.py): counts kept
exactly, the inputs the target needs found where magnitudes and sibling copies mislead."""

from __future__ import annotations

import numpy as np
import pytest

from neurorewrite.errors import DataError
from neurorewrite.fpe.gram import GramAccumulator, Scratch
from neurorewrite.fpe.refit import refit_masked
from neurorewrite.fpe.support import DAMPING, choose_support, inverse_factor


def damped_inverse(gram: np.ndarray, damping: float = DAMPING) -> np.ndarray:
    """H^-1 from the factor, checking that the factor is lower triangular."""
    factor = inverse_factor(gram, damping)
    assert factor.dtype == np.float32
    np.testing.assert_array_equal(np.triu(factor, 1), 0)
    return factor.T.astype(np.float64) @ factor


def moments_of(h: np.ndarray, t: np.ndarray):
    acc = GramAccumulator(h.shape[1], t.shape[1])
    acc.add(h, t)
    return acc.finish()


def test_every_row_keeps_its_count_and_every_kept_weight_is_nonzero() -> None:
    rng = np.random.default_rng(0)
    h = rng.standard_normal((400, 12)).astype(np.float32)
    h[:, 5] = 0.0  # an input the sample never moves: its dense weight is exactly 0 where it must be kept
    t = h @ rng.standard_normal((12, 4)).astype(np.float32)
    w0 = np.zeros((4, 12), np.float32)
    w0[0, :3] = 1.0  # three kept
    w0[2, :] = 2.0  # all kept: input 5 included
    w0[3, 7] = -1.0  # one kept; row 1 keeps none
    before = w0.copy()
    out = choose_support(moments_of(h, t), w0)
    np.testing.assert_array_equal(w0, before)  # the input is not modified
    assert out.dtype == np.float32
    np.testing.assert_array_equal(np.count_nonzero(out, axis=1), [3, 0, 12, 1])
    assert out[2, 5] == np.finfo(np.float32).tiny  # kept, and nonzero although its fit is 0.0


def test_the_target_inputs_are_found_where_a_sibling_copy_was_kept() -> None:
    """t = h0 + h2 + h4, with h1 a near copy of h0 (a parent's children are correlated): the prune kept
    {0, 1, 2}; the second-order choice keeps {0, 2, 4} and the refit on it fits the target exactly."""
    rng = np.random.default_rng(1)
    h = rng.standard_normal((2000, 6))
    h[:, 1] = h[:, 0] + 0.05 * rng.standard_normal(2000)
    t = (h[:, 0] + h[:, 2] + h[:, 4])[:, None]
    moments = moments_of(h.astype(np.float32), t.astype(np.float32))
    w0 = np.array([[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]], np.float32)
    chosen = choose_support(moments, w0)
    assert set(np.flatnonzero(chosen[0])) == {0, 2, 4}
    w_chosen, _, _ = refit_masked(moments, chosen, None, solver="exact")
    w_kept, _, _ = refit_masked(moments, w0, None, solver="exact")
    np.testing.assert_allclose(w_chosen[0, [0, 2, 4]], 1.0, atol=1e-3)
    assert moments.error(w_chosen, None)[0] < 1e-3 * moments.error(w_kept, None)[0]


def test_the_saliency_weighs_a_weight_by_how_much_its_input_moves() -> None:
    """Independent inputs: the saliency is w*^2 / [H^-1]_jj ~ w*^2 var_j. A weight of 1 on an input of
    variance 100 costs more to remove than a weight of 2 on one of variance 1; magnitude says otherwise."""
    rng = np.random.default_rng(2)
    h = rng.standard_normal((5000, 2)) * np.array([10.0, 1.0])
    t = (h @ np.array([1.0, 2.0]))[:, None]
    w0 = np.array([[0.0, 2.0]], np.float32)  # the magnitude choice: the larger weight
    chosen = choose_support(moments_of(h.astype(np.float32), t.astype(np.float32)), w0)
    assert np.flatnonzero(chosen[0]).tolist() == [0]
    moments = moments_of(h.astype(np.float32), t.astype(np.float32))
    damped = moments.gram.astype(np.float64) + DAMPING * np.mean(np.diag(moments.gram)) * np.eye(2)
    dense_fit = np.linalg.solve(damped, moments.cross.astype(np.float64))[:, 0]  # valued by the damped dense fit
    np.testing.assert_allclose(chosen[0, 0], dense_fit[0], rtol=1e-4)


def test_the_inverse_is_the_damped_grams_and_a_gram_rounding_made_indefinite_gets_more_damping() -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((50, 8))
    gram = (a.T @ a).astype(np.float32)
    want = np.linalg.inv(gram.astype(np.float64) + DAMPING * np.mean(np.diag(gram)) * np.eye(8))
    np.testing.assert_allclose(damped_inverse(gram), want, rtol=1e-4)
    # one eigenvalue at -0.5 (the mean diagonal is 0.82): a damping of 0.1 of it is not enough, 1.0 is
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    values = np.array([-0.5, 1, 1, 1, 1, 1, 1, 1.05])
    indefinite = (q * values) @ q.T
    scale = np.mean(np.diag(indefinite))
    np.testing.assert_allclose(damped_inverse(indefinite.astype(np.float32), damping=0.1),
                               np.linalg.inv(indefinite + 1.0 * scale * np.eye(8)), rtol=1e-4)


def test_a_gram_that_is_not_finite_is_a_data_error_not_an_endless_damping() -> None:
    gram = np.eye(4, dtype=np.float32)
    gram[1, 2] = gram[2, 1] = np.inf
    with pytest.raises(DataError) as caught:
        inverse_factor(gram)
    assert str(caught.value) == ("the sample's hidden activations overflow float32 (their Gram matrix is not finite); "
                                 "scale the sample's inputs down, or use --support kept")


def test_a_gram_no_damping_makes_definite_ends_in_a_data_error() -> None:
    """Not a Gram any sample gives (a Gram is positive semi-definite), but the loop must end: an
    off-diagonal of 1e30 over a zero diagonal needs more than 30 tenfold steps from 0.01."""
    with pytest.raises(DataError) as caught:
        inverse_factor(np.array([[0.0, 1e30], [1e30, 0.0]], np.float32))
    assert str(caught.value) == ("the Gram matrix of the sample's hidden activations stays indefinite however it is "
                                 "damped; use --support kept")


def test_a_zero_gram_is_damped_by_the_damping_itself() -> None:
    """Hidden units the sample never activates: a zero Gram, whose mean diagonal gives no scale; the
    damping then applies as it is, so the inverse is I / damping."""
    np.testing.assert_allclose(damped_inverse(np.zeros((3, 3), np.float32)), np.eye(3) / DAMPING, rtol=1e-6)
    np.testing.assert_allclose(damped_inverse(np.zeros((3, 3), np.float32), damping=0.5), np.eye(3) / 0.5, rtol=1e-6)


def test_each_row_keeps_its_largest_saliencies_whatever_their_sign_and_the_damping() -> None:
    """Many inputs and rows, weights of both signs: the chosen set is exactly each row's top count of
    ``w*^2 / [H^-1]_jj`` (module docstring), with ``w*`` and ``H`` from the damping asked for."""
    rng = np.random.default_rng(4)
    width, outputs = 300, 5
    h = rng.standard_normal((3000, width)) * rng.uniform(0.2, 3.0, width) + rng.standard_normal((3000, 1))
    t = h @ rng.standard_normal((width, outputs))
    moments = moments_of(h.astype(np.float32), t.astype(np.float32))
    w0 = np.zeros((outputs, width), np.float32)
    counts = [1, 37, 150, 299, 300]
    for o, k in enumerate(counts):
        w0[o, rng.choice(width, k, replace=False)] = 1.0
    for damping in (DAMPING, 0.5):
        chosen = choose_support(moments, w0, damping=damping)
        g = moments.gram.astype(np.float64)
        h_inverse = np.linalg.inv(g + damping * np.mean(np.diag(g)) * np.eye(width))
        dense_fit = moments.cross.T.astype(np.float64) @ h_inverse
        saliency = dense_fit**2 / np.diag(h_inverse)
        for o, k in enumerate(counts):
            assert set(np.flatnonzero(chosen[o])) == set(np.argsort(-saliency[o])[:k].tolist())
        kept = chosen != 0
        np.testing.assert_allclose(chosen[kept], dense_fit[kept], rtol=2e-3, atol=1e-4)


def test_the_factor_of_a_gram_wider_than_one_strip_is_lower_triangular_and_exact() -> None:
    """Above the diagonal the factorisation leaves the Gram's values, cleared a strip of 512 rows at a
    time: at width 1100 the factor is still exactly lower triangular and L^-T L^-1 is the damped inverse."""
    rng = np.random.default_rng(5)
    a = rng.standard_normal((1500, 1100))
    gram = (a.T @ a).astype(np.float32)
    want = np.linalg.inv(gram.astype(np.float64) + DAMPING * np.mean(np.diag(gram)) * np.eye(1100))
    np.testing.assert_allclose(damped_inverse(gram), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def test_a_scratch_lends_the_factor_and_changes_nothing_chosen() -> None:
    """With a scratch the factor is one array lent to every layer in turn (the calibration's memory):
    the same factor, the same support and weights as without one."""
    rng = np.random.default_rng(6)
    h = rng.standard_normal((500, 40)) + rng.standard_normal((500, 1))
    moments = moments_of(h.astype(np.float32), (h @ rng.standard_normal((40, 3))).astype(np.float32))
    w0 = np.zeros((3, 40), np.float32)
    w0[:, ::3] = 1.0
    scratch = Scratch()
    lent = inverse_factor(moments.gram, scratch=scratch)
    np.testing.assert_array_equal(lent, inverse_factor(moments.gram))
    lent[:] = np.nan  # a stale factor left in the scratch must not leak into the next layer's choice
    np.testing.assert_array_equal(choose_support(moments, w0, scratch=scratch), choose_support(moments, w0))
    np.testing.assert_array_equal(lent, inverse_factor(moments.gram))  # choose_support factored into the lent array
    assert inverse_factor(moments.gram, scratch=scratch) is lent
