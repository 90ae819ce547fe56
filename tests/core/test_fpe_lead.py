"""The lead child (fpe/lead.py): one child per parent fit to the parent's whole pre-activation."""

from __future__ import annotations

import numpy as np
import pytest

from neurorewrite.fpe import FPEConfig, expand_block
from neurorewrite.fpe.lead import InputMoments, lead_children, refit_lead_children, solve_on_subset

D, H, ALPHA = 12, 5, 3


def _block(seed: int = 0, split: str = "random"):  # noqa: ANN202
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((H, D)).astype(np.float32)
    b1 = rng.standard_normal(H).astype(np.float32)
    w2 = rng.standard_normal((4, H)).astype(np.float32)
    e = expand_block(w1, b1, w2, None, FPEConfig(alpha=ALPHA, seed=seed, split=split, bias="copy"))
    return w1, b1, e


def _seen(x: np.ndarray) -> InputMoments:
    """The moments of rows ``x`` seen alike by both models (no drift)."""
    moments = InputMoments.zeros(x.shape[1])
    moments.add(x, x)
    return moments


def _correlated(rng: np.random.Generator, n: int) -> np.ndarray:
    mixing = rng.standard_normal((D, D)) * 0.6 + np.eye(D)
    return (rng.standard_normal((n, D)) @ mixing + rng.standard_normal(D)).astype(np.float32)


def test_the_lead_is_the_least_squares_fit_of_the_parent_on_its_own_inputs() -> None:
    rng = np.random.default_rng(1)
    w1, b1, e = _block()
    student = _correlated(rng, 400)
    teacher = student + 0.1 * rng.standard_normal(student.shape).astype(np.float32)  # earlier blocks drifted
    moments = InputMoments.zeros(D)
    moments.add(student[:150], teacher[:150])  # in two parts: the sums add up
    moments.add(student[150:], teacher[150:])
    w, b, leads = refit_lead_children(moments, e.w1, e.b1, w1, b1, ALPHA, ridge=0.0)
    z = teacher.astype(np.float64) @ w1.T + b1  # each parent's whole pre-activation, on the teacher's inputs
    for parent, row in enumerate(leads):
        assert row // ALPHA == parent
        support = np.flatnonzero(e.w1[row])
        a = np.hstack([student[:, support].astype(np.float64), np.ones((len(student), 1))])
        want, *_ = np.linalg.lstsq(a, z[:, parent], rcond=None)
        np.testing.assert_allclose(w[row, support], want[:-1], rtol=1e-6, atol=1e-8)
        assert b[row] == pytest.approx(want[-1], rel=1e-6, abs=1e-8)
    others = np.setdiff1d(np.arange(len(w)), leads)
    np.testing.assert_array_equal(w[others], e.w1[others])  # the siblings keep their shares
    np.testing.assert_array_equal(b[others], e.b1[others])
    np.testing.assert_array_equal(w != 0, e.w1 != 0)  # every row keeps its support: the count holds


@pytest.mark.parametrize("bias", [True, False])
def test_a_lead_holding_most_inputs_is_solved_on_the_ones_it_lacks(bias: bool) -> None:
    """With a lead share of 0.75 the lead's system is solved through the complement (fpe.lead.solve_on_subset);
    it is the same least-squares fit."""
    rng = np.random.default_rng(2)
    w1, b1 = rng.standard_normal((H, D)).astype(np.float32), rng.standard_normal(H).astype(np.float32)
    e = expand_block(w1, b1 if bias else None, rng.standard_normal((4, H)).astype(np.float32), None,
                     FPEConfig(alpha=ALPHA, split="tiered", lead_share=0.75, prune="layer", bias="copy"))
    student = _correlated(rng, 300)
    teacher = student + 0.1 * rng.standard_normal(student.shape).astype(np.float32)
    moments = InputMoments.zeros(D)
    moments.add(student, teacher)
    w, b, leads = refit_lead_children(moments, e.w1, e.b1, w1, b1 if bias else None, ALPHA, ridge=0.0)
    z = teacher.astype(np.float64) @ w1.T + (b1 if bias else 0.0)
    for parent, row in enumerate(leads):
        support = np.flatnonzero(e.w1[row])
        assert support.size == 9  # 3/4 of the 12 inputs: the complement path
        a = student[:, support].astype(np.float64)
        a = np.hstack([a, np.ones((len(a), 1))]) if bias else a
        want, *_ = np.linalg.lstsq(a, z[:, parent], rcond=None)
        np.testing.assert_allclose(w[row, support], want[: support.size], rtol=1e-6, atol=1e-8)
        if bias:
            assert b[row] == pytest.approx(want[-1], rel=1e-6, abs=1e-8)
    assert (b is None) == (not bias)


def test_solving_on_a_subset_through_the_inverse_matches_the_direct_solve() -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((40, 15))
    gram = a.T @ a + 0.1 * np.eye(15)
    inverse = np.linalg.inv(gram)
    for index in (np.arange(15), np.array([0, 2, 3, 5, 7, 8, 9, 10, 11, 12, 14]), np.array([4])):
        rhs = rng.standard_normal(index.size)
        np.testing.assert_allclose(solve_on_subset(inverse, index, rhs),
                                   np.linalg.solve(gram[np.ix_(index, index)], rhs), rtol=1e-9, atol=1e-12)


def test_the_lead_carries_the_largest_share_of_the_pre_activation() -> None:
    w1e = np.zeros((2 * ALPHA, 3))
    w1e[0, 0], w1e[1, 1], w1e[2, 2] = 1.0, 2.0, 3.0  # parent 0
    w1e[3, 0], w1e[4, 1], w1e[5, 2] = 5.0, 2.0, 3.0  # parent 1
    assert lead_children(w1e, ALPHA, np.ones(3)).tolist() == [2, 3]
    # an input ten times larger on the sample weighs ten times more
    assert lead_children(w1e, ALPHA, np.array([1.0, 10.0, 1.0])).tolist() == [1, 4]


def test_with_the_tiered_split_the_lead_is_the_first_child() -> None:
    _, _, e = _block(split="tiered")
    assert lead_children(e.w1, ALPHA, np.ones(D)).tolist() == list(range(0, H * ALPHA, ALPHA))


def test_the_lead_fit_lowers_the_error_of_its_parent() -> None:
    rng = np.random.default_rng(2)
    w1, b1, e = _block()
    x = _correlated(rng, 300)
    moments = _seen(x)
    w, b, leads = refit_lead_children(moments, e.w1, e.b1, w1, b1, ALPHA)
    z = x @ w1.T + b1
    before = ((x @ e.w1[leads].T + e.b1[leads] - z) ** 2).mean()
    after = ((x @ w[leads].T + b[leads] - z) ** 2).mean()
    assert after < 0.7 * before  # 0.57 here: the lost inputs are partly predictable from the kept ones


def test_without_a_bias_there_is_no_intercept_and_too_few_rows_change_nothing() -> None:
    rng = np.random.default_rng(3)
    w1, _, e = _block()
    x = _correlated(rng, 200)
    moments = _seen(x)
    w, b, leads = refit_lead_children(moments, e.w1, None, w1, None, ALPHA, ridge=0.0)
    assert b is None
    support = np.flatnonzero(e.w1[leads[0]])
    want, *_ = np.linalg.lstsq(x[:, support].astype(np.float64), x.astype(np.float64) @ w1[0], rcond=None)
    np.testing.assert_allclose(w[leads[0], support], want, rtol=1e-6)
    one = _seen(x[:1])
    w, b, leads = refit_lead_children(one, e.w1, e.b1, w1, None, ALPHA)
    np.testing.assert_array_equal(w, e.w1)
    assert leads.size == 0


def _fit(student: np.ndarray, teacher: np.ndarray, support: np.ndarray, target: np.ndarray, ridge: float) -> np.ndarray:
    """Reference: ridge (relative to the mean diagonal of the inputs' Gram, the intercept unpenalised)
    least squares of ``teacher @ target[:-1] + target[-1]`` from ``[student[:, support], 1]``."""
    a = np.column_stack([student.astype(np.float64), np.ones(len(student))])
    gram = a.T @ a
    d = student.shape[1]
    mean_diag = np.mean(np.diag(gram)[:d])
    gram[np.arange(d), np.arange(d)] += ridge * (mean_diag if mean_diag > 0 else 1.0)
    rows = np.append(support, d)
    rhs = (a.T @ np.column_stack([teacher.astype(np.float64), np.ones(len(teacher))]) @ target)[rows]
    return np.linalg.solve(gram[np.ix_(rows, rows)], rhs)


@pytest.mark.parametrize("scale", [1.0, 1e-3])  # a Gram whose mean diagonal is below 1 scales the ridge too
def test_the_ridge_is_relative_to_the_mean_diagonal_and_spares_the_intercept(scale: float) -> None:
    rng = np.random.default_rng(4)
    w1, b1, e = _block()
    x = _correlated(rng, 40) * scale
    moments = _seen(x)
    w, b, leads = refit_lead_children(moments, e.w1, e.b1, w1, b1, ALPHA, ridge=0.5)
    for parent, row in enumerate(leads):
        support = np.flatnonzero(e.w1[row])
        want = _fit(x, x, support, np.append(w1[parent], b1[parent]), 0.5)
        np.testing.assert_allclose(w[row, support], want[:-1], rtol=1e-6, atol=1e-9)
        assert b[row] == pytest.approx(want[-1], rel=1e-6, abs=1e-9)


def test_all_zero_inputs_fall_back_to_an_absolute_ridge() -> None:
    w1, b1, e = _block()
    moments = InputMoments.zeros(D)
    moments.add(np.zeros((5, D), np.float32), np.zeros((5, D), np.float32))
    w, b, leads = refit_lead_children(moments, e.w1, e.b1, w1, b1, ALPHA)
    assert np.all(w[leads] == 0) and np.allclose(b[leads], b1)  # nothing to learn from but the bias


def test_the_rows_add_up_and_two_are_enough() -> None:
    rng = np.random.default_rng(5)
    w1, b1, e = _block()
    x = _correlated(rng, 30)
    many = _seen(x[:29])
    many.add(x[29:], x[29:])  # one row more: 30 in all, not 1
    assert many.rows == 30
    assert refit_lead_children(many, e.w1, e.b1, w1, b1, ALPHA)[2].size == H
    two = _seen(x[:2])
    w, b, leads = refit_lead_children(two, e.w1, e.b1, w1, b1, ALPHA)
    assert leads.size == H and not np.array_equal(w, e.w1)
    one = _seen(x[:1])
    w, b, leads = refit_lead_children(one, e.w1, e.b1, w1, b1, ALPHA)
    np.testing.assert_array_equal(b, e.b1)  # too few rows: the bias is returned as it was
    assert leads.dtype == np.int64 and leads.size == 0


def test_a_lead_without_inputs_is_skipped_and_one_with_a_single_input_is_fit() -> None:
    rng = np.random.default_rng(6)
    w1 = rng.standard_normal((3, 4))
    b1 = rng.standard_normal(3)
    w1e = np.zeros((3 * 2, 4))
    w1e[0] = 0.0  # parent 0: its lead is child 0 (both children empty, argmax picks the first)
    w1e[2, 0], w1e[3, 1:] = 5.0, 0.1  # parent 1: child 2 holds one input with the largest share
    w1e[4, :2], w1e[5, 2:] = w1[2, :2], w1[2, 2:]  # parent 2: an ordinary split
    x = _correlated(rng, 50)[:, :4]
    moments = _seen(x)
    w, b, leads = refit_lead_children(moments, w1e, np.zeros(6), w1, b1, 2, ridge=0.0)
    assert leads.tolist() == [0, 2, 4] or leads.tolist() == [0, 2, 5]
    assert np.all(w[0] == 0) and b[0] == 0  # nothing to fit on
    want = _fit(x, x, np.array([0]), np.append(w1[1], b1[1]), 0.0)
    assert w[2, 0] == pytest.approx(want[0], rel=1e-6) and b[2] == pytest.approx(want[1], rel=1e-6)
    assert not np.array_equal(w[leads[2]], w1e[leads[2]])  # the parents after an empty lead are fit too


def test_too_few_rows_without_a_bias_return_no_bias() -> None:
    w1, _, e = _block()
    one = InputMoments.zeros(D)
    one.add(np.ones((1, D), np.float32), np.ones((1, D), np.float32))
    w, b, leads = refit_lead_children(one, e.w1, None, w1, None, ALPHA)
    assert b is None and leads.size == 0


def test_the_lead_follows_the_samples_scale_even_for_tiny_inputs() -> None:
    """Input 0 is a hundred times larger than the others on the sample (all of them far below 1)."""
    w1e = np.zeros((2, 3))
    w1e[0, 0], w1e[1, 1:] = 1.0, 5.0  # by |w| alone child 1 leads; by |w| x rms child 0
    x = np.random.default_rng(7).standard_normal((20, 3)) * np.array([1e-2, 1e-4, 1e-4])
    moments = _seen(x)
    _, _, leads = refit_lead_children(moments, w1e, None, np.ones((1, 3)), None, 2)
    assert leads.tolist() == [0]
