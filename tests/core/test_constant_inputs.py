"""Leaving a layer's constant inputs out of its refit (neurorewrite.fpe.constant_inputs): the refit on the
active columns, widened back, is the full-width refit (weights, bias, function), with the exact solver, CG
and the row-space solve; the support choice keeps every row's count, its surplus on the constant columns;
the reduction is declined where a row without a bias could not take the constant columns' shift."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from neurorewrite.fpe.constant_inputs import ConstantInputs, constant_inputs
from neurorewrite.fpe.gram import FitAccumulator, GramAccumulator
from neurorewrite.fpe.refit import refit_masked
from neurorewrite.fpe.support import choose_support

PARENTS, ALPHA, OUTPUTS = 6, 4, 5
WIDTH = PARENTS * ALPHA
CONSTANT = np.array([2, 3, 7, 8, 9, 10, 11, 14, 15, 23])  # parent 2 has no active child left


def problem(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, ConstantInputs]:
    """Rows ``h`` whose ``CONSTANT`` columns hold one nonzero value each, targets ``t`` that depend on the
    others, a pruned ``w0`` and a bias on every row."""
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((n, WIDTH)).astype(np.float32) @ rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) * 0.3
    values = rng.uniform(0.5, 2.0, len(CONSTANT)).astype(np.float32)
    h[:, CONSTANT] = values
    t = (h @ rng.standard_normal((WIDTH, OUTPUTS)).astype(np.float32) + 0.1 * rng.standard_normal((n, OUTPUTS))).astype(np.float32)
    w0 = rng.standard_normal((OUTPUTS, WIDTH)).astype(np.float32)
    w0[rng.random(w0.shape) < 0.4] = 0.0
    b0 = rng.uniform(0.5, 1.5, OUTPUTS).astype(np.float32)
    constant = constant_inputs(np.isin(np.arange(WIDTH), CONSTANT), h[0], every_row_has_bias=True)
    assert constant is not None
    return h, t, w0, b0, constant


def moments_of(h: np.ndarray, t: np.ndarray, constant: ConstantInputs | None = None):
    columns = slice(None) if constant is None else constant.active
    acc = FitAccumulator(h[:, columns].shape[1], t.shape[1])
    acc.add(h[:, columns], t)
    moments = acc.finish()
    return moments if constant is None else replace(moments, constant=len(constant.columns))


@pytest.mark.parametrize("solver", ["exact", "cg", "rows"])
def test_the_refit_on_the_active_columns_is_the_full_width_refit(solver: str) -> None:
    h, t, w0, b0, constant = problem(n=4 if solver == "rows" else 400)
    full, reduced = moments_of(h, t), moments_of(h, t, constant)
    assert type(full).__name__ == type(reduced).__name__ == ("Rows" if solver == "rows" else "Moments")
    kw = {"solver": "exact" if solver == "rows" else solver, "ridge": 1e-3, "max_iters": 300, "tol": 1e-7}
    w_full, b_full, info_full = refit_masked(full, w0, b0, groups=ALPHA, **kw)
    w_active, b_reduced, info = refit_masked(reduced, w0[:, constant.active], b0, groups=constant.groups(ALPHA),
                                             offset=constant.offset(w0), **kw)
    assert info.ridge == pytest.approx(info_full.ridge, rel=1e-6)  # relative to the whole Gram's mean diagonal
    w_reduced = w0.copy()
    w_reduced[:, constant.active] = w_active
    np.testing.assert_allclose(w_reduced, w_full, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(b_reduced, b_full, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(h @ w_reduced.T + b_reduced, h @ w_full.T + b_full, rtol=1e-3, atol=1e-3)


def test_the_preconditioner_groups_are_a_parents_active_children() -> None:
    constant = ConstantInputs(CONSTANT, np.ones(len(CONSTANT)), WIDTH)
    groups = constant.groups(ALPHA)
    active = constant.active
    assert len(active) == WIDTH - len(CONSTANT)
    assert groups.shape == (PARENTS - 1, ALPHA)  # parent 2 has only constant children
    np.testing.assert_array_equal(np.sort(groups[groups >= 0]), np.arange(len(active)))
    assert set(np.unique(groups[groups < 0])) == {-1}
    for group, parent in zip(groups, [0, 1, 3, 4, 5]):  # each group: the active positions of one parent's children
        np.testing.assert_array_equal(active[group[group >= 0]], [c for c in range(parent * ALPHA, (parent + 1) * ALPHA)
                                                                   if c not in CONSTANT])
    # a parent whose one active child is the first active column: its group is kept
    first_only = ConstantInputs(np.array([1, 2, 3, 5]), np.ones(4), 8).groups(ALPHA)
    np.testing.assert_array_equal(first_only, [[0, -1, -1, -1], [1, -1, 2, 3]])


def test_the_support_choice_keeps_every_rows_count_with_its_surplus_on_constant_columns() -> None:
    h, t, w0, b0, constant = problem(n=400)
    active = constant.active
    w0[0] = 1.0  # a full row: its count exceeds the active width
    w0[1, active] = 0.5  # every active column and two constant ones
    w0[1, CONSTANT] = 0.0
    w0[1, CONSTANT[[4, 7]]] = [3.0, -2.0]
    w0[2, active] = 0.25  # every active column and one constant one: a surplus of one
    w0[2, CONSTANT] = 0.0
    w0[2, CONSTANT[2]] = 1.5
    counts = np.count_nonzero(w0, axis=1)
    full = choose_support(moments_of(h, t), w0)
    chosen = choose_support(moments_of(h, t, constant), w0[:, active], counts=np.minimum(counts, len(active)))
    widened = constant.widen(chosen, w0)
    np.testing.assert_array_equal(np.count_nonzero(widened, axis=1), counts)
    np.testing.assert_array_equal(widened[:, active] != 0, full[:, active] != 0)  # the same choice where it matters
    # and the same starting values: the damping is relative to the whole Gram's diagonal, zeros included
    np.testing.assert_allclose(widened[:, active], full[:, active], rtol=1e-3, atol=1e-5)
    np.testing.assert_array_equal(widened[1, CONSTANT], w0[1, CONSTANT])  # the constant weights it had, kept
    np.testing.assert_array_equal(widened[2, CONSTANT], w0[2, CONSTANT])
    np.testing.assert_array_equal(widened[0, CONSTANT], w0[0, CONSTANT])
    with pytest.raises(ValueError, match="row 0 needs 11 constant columns and had 10"):  # fewer active weights than w had
        constant.widen(np.where(np.arange(len(active)) == 0, 0.0, chosen), w0)


def test_the_reduction_is_declined_where_a_row_without_bias_could_not_take_the_shift() -> None:
    empty = np.array([False, True, False, True])
    row = np.array([0.3, 0.0, -1.0, 0.7])
    assert constant_inputs(empty, row, every_row_has_bias=False) is None  # act(b) = 0.7 would be lost
    zero = constant_inputs(empty, np.where(empty, 0.0, row), every_row_has_bias=False)
    assert zero is not None and zero.columns.tolist() == [1, 3]
    assert constant_inputs(np.zeros(4, bool), row, every_row_has_bias=True) is None  # nothing constant
    kept = constant_inputs(empty, row, every_row_has_bias=True)
    assert kept is not None and kept.active.tolist() == [0, 2] and kept.values.tolist() == [0.0, 0.7]
    assert kept.matches(np.array([[5.0, 0.0, 1.0, 0.7], [1.0, 0.0, 2.0, 0.7]], np.float32))
    assert not kept.matches(np.array([[5.0, 0.0, 1.0, 0.7], [1.0, 0.1, 2.0, 0.7]], np.float32))
    last_bit = np.nextafter(np.float32(0.7), np.float32(1.0))  # an activation's vector and scalar paths may differ there
    assert kept.matches(np.array([[5.0, 0.0, 1.0, 0.7], [1.0, 0.0, 2.0, last_bit]], np.float32))
    large = ConstantInputs(np.array([0, 1]), np.array([0.0, 100.0]), 2)  # the tolerance is relative: 1e-6 (1 + |v|)
    assert large.matches(np.array([[0.0, 100.0], [0.0, np.nextafter(np.float32(100.0), np.float32(200.0))]], np.float32))
    assert not large.matches(np.array([[0.0, 100.0], [1.5e-6, 100.0]], np.float32))
    np.testing.assert_allclose(kept.offset(np.array([[1.0, 2.0, 3.0, 4.0]])), [2.8])


def test_the_fit_share_scales_the_ridge_to_the_whole_grams_diagonal() -> None:
    h, t, _, _, constant = problem(n=400)
    reduced = moments_of(h, t, constant)
    assert reduced.fit_share == pytest.approx((WIDTH - len(CONSTANT)) / WIDTH)
    acc = GramAccumulator(WIDTH, OUTPUTS)
    acc.add(h, t)
    assert float(np.mean(np.diag(acc.finish().gram))) == pytest.approx(
        float(np.mean(np.diag(reduced.gram))) * reduced.fit_share, rel=1e-5)
