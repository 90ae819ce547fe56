"""The lead child (fpe/lead.py): one child per parent fit to the parent's whole pre-activation."""

from __future__ import annotations

import numpy as np
import pytest

from neurorewrite.fpe import FPEConfig, expand_block
from neurorewrite.fpe.lead import InputMoments, lead_children, refit_lead_children

D, H, ALPHA = 12, 5, 3


def _block(seed: int = 0, split: str = "random"):  # noqa: ANN202
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((H, D)).astype(np.float32)
    b1 = rng.standard_normal(H).astype(np.float32)
    w2 = rng.standard_normal((4, H)).astype(np.float32)
    e = expand_block(w1, b1, w2, None, FPEConfig(alpha=ALPHA, seed=seed, split=split, bias="copy"))
    return w1, b1, e


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
    moments = InputMoments.zeros(D)
    moments.add(x, x)
    w, b, leads = refit_lead_children(moments, e.w1, e.b1, w1, b1, ALPHA)
    z = x @ w1.T + b1
    before = ((x @ e.w1[leads].T + e.b1[leads] - z) ** 2).mean()
    after = ((x @ w[leads].T + b[leads] - z) ** 2).mean()
    assert after < 0.7 * before  # 0.57 here: the lost inputs are partly predictable from the kept ones


def test_without_a_bias_there_is_no_intercept_and_too_few_rows_change_nothing() -> None:
    rng = np.random.default_rng(3)
    w1, _, e = _block()
    x = _correlated(rng, 200)
    moments = InputMoments.zeros(D)
    moments.add(x, x)
    w, b, leads = refit_lead_children(moments, e.w1, None, w1, None, ALPHA, ridge=0.0)
    assert b is None
    support = np.flatnonzero(e.w1[leads[0]])
    want, *_ = np.linalg.lstsq(x[:, support].astype(np.float64), x.astype(np.float64) @ w1[0], rcond=None)
    np.testing.assert_allclose(w[leads[0], support], want, rtol=1e-6)
    one = InputMoments.zeros(D)
    one.add(x[:1], x[:1])
    w, b, leads = refit_lead_children(one, e.w1, e.b1, w1, None, ALPHA)
    np.testing.assert_array_equal(w, e.w1)
    assert leads.size == 0
