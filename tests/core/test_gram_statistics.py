"""The refit's statistics (neurorewrite.fpe.gram) at their edges: when rows are kept and when they fold
into a Gram matrix, empty and one-row chunks, per-feature shifts that keep a float32 Gram accurate, the
types the docstrings promise, and the error formula against the error computed from the rows."""

from __future__ import annotations

import numpy as np
import pytest

from neurorewrite.fpe.gram import FitAccumulator, GramAccumulator, Moments, Rows, Scratch, keeps_rows


def centred(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return a - a.mean(axis=0)


def accumulate(h: np.ndarray, t: np.ndarray, chunks: list[int], dtype: type = np.float32) -> Moments:
    acc = GramAccumulator(h.shape[1], t.shape[1], dtype)
    start = 0
    for size in chunks:
        acc.add(h[start:start + size], t[start:start + size])
        start += size
    return acc.finish()


@pytest.mark.parametrize("n, width, kept", [(3, 6, True), (3, 5, False), (4, 9, False), (4, 10, True), (1, 1, True)])
def test_rows_are_kept_exactly_while_n_n_plus_1_over_2_fits_the_width(n, width, kept):
    assert keeps_rows(n, width) is kept


def test_the_accumulator_switches_to_a_gram_at_the_threshold_and_counts_every_row():
    rng = np.random.default_rng(0)
    h, t = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((4, 2)).astype(np.float32)
    acc = FitAccumulator(6, 2)
    acc.add(h[:3], t[:3])  # 3 rows: 6 <= 6, still rows
    assert acc.n == 3 and acc.gram is None
    acc.add(h[3:], t[3:])  # 4 rows: 10 > 6, a Gram
    assert acc.n == 4
    moments = acc.finish()
    assert isinstance(moments, Moments) and moments.n == 4
    # the big matrices are float32 by default (half the memory of float64), the rows it held are in them
    assert moments.gram.dtype == np.float32 and moments.cross.dtype == np.float32
    np.testing.assert_allclose(moments.gram, centred(h).T @ centred(h), rtol=1e-5, atol=1e-5)


def test_kept_rows_are_float64_whatever_the_input_type():
    h, t = np.ones((2, 8), np.float32), np.full((2, 3), 2.0, np.float32)
    acc = FitAccumulator(8, 3)
    acc.add(h, t)
    rows = acc.finish()
    assert isinstance(rows, Rows) and rows.h.dtype == np.float64 and rows.t.dtype == np.float64


def test_an_empty_accumulator_finishes_as_zero_statistics_of_the_right_shapes():
    rows = FitAccumulator(5, 3).finish()
    assert isinstance(rows, Rows) and rows.n == 0
    assert rows.h.shape == (0, 5) and rows.t.shape == (0, 3)
    np.testing.assert_array_equal(rows.error(np.ones((3, 5)), np.ones(3)), np.zeros(3))

    moments = GramAccumulator(5, 3).finish()
    assert moments.n == 0
    assert moments.gram.shape == (5, 5) and moments.cross.shape == (5, 3)
    for value, size in ((moments.mean_h, 5), (moments.mean_t, 3), (moments.target_ss, 3)):
        np.testing.assert_array_equal(value, np.zeros(size))
    np.testing.assert_array_equal(moments.error(np.ones((3, 5)), None), np.zeros(3))


def test_empty_and_one_row_chunks_count_like_any_other():
    rng = np.random.default_rng(1)
    h, t = rng.standard_normal((9, 4)).astype(np.float32), rng.standard_normal((9, 2)).astype(np.float32)
    acc = GramAccumulator(4, 2)
    acc.add(h[:0], t[:0])  # an empty chunk first must not set the shift (its mean is undefined)
    for i in range(len(h)):
        acc.add(h[i:i + 1], t[i:i + 1])
    one_by_one = acc.finish()
    whole = accumulate(h, t, [9])
    assert one_by_one.n == whole.n == 9
    np.testing.assert_allclose(one_by_one.gram, whole.gram, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(one_by_one.cross, whole.cross, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(one_by_one.mean_h, h.astype(np.float64).mean(0), rtol=1e-6)


def test_a_single_row_gives_its_own_means_and_zero_spread():
    h, t = np.array([[1.0, 2.0, 3.0]], np.float32), np.array([[4.0, 5.0]], np.float32)
    moments = accumulate(h, t, [1])
    assert moments.n == 1
    np.testing.assert_array_equal(moments.mean_h, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(moments.mean_t, [4.0, 5.0])
    np.testing.assert_array_equal(moments.gram, np.zeros((3, 3)))
    np.testing.assert_array_equal(moments.target_ss, [0.0, 0.0])


def test_a_constant_target_has_exactly_zero_spread():
    h = np.random.default_rng(2).standard_normal((20, 3)).astype(np.float32)
    moments = accumulate(h, np.full((20, 2), 3.0, np.float32), [7, 13])
    np.testing.assert_array_equal(moments.target_ss, [0.0, 0.0])
    np.testing.assert_array_equal(moments.cross, np.zeros((3, 2)))


def test_each_feature_is_shifted_by_its_own_mean_so_a_float32_gram_keeps_its_digits():
    # features and targets whose means differ by 2e4 while they vary by ~1: a shift common to all
    # features would leave means of 1e4 in the float32 sums, and their rounding would swamp the spread
    rng = np.random.default_rng(3)
    h = (rng.standard_normal((3000, 4)) + np.array([1e4, -1e4, 0.0, 5e3])).astype(np.float32)
    t = (rng.standard_normal((3000, 2)) + np.array([-1e4, 1e4])).astype(np.float32)
    moments = accumulate(h, t, [1000, 1000, 1000])
    hc, tc = centred(h), centred(t)
    np.testing.assert_allclose(moments.gram, hc.T @ hc, atol=1e-3 * len(h))
    np.testing.assert_allclose(moments.cross, hc.T @ tc, atol=1e-3 * len(h))
    np.testing.assert_allclose(moments.target_ss, (tc**2).sum(0), rtol=1e-3)
    np.testing.assert_allclose(moments.mean_t, t.astype(np.float64).mean(0), rtol=1e-9)


@pytest.mark.parametrize("with_bias", [True, False])
def test_the_error_of_the_moments_is_the_error_of_the_rows(with_bias):
    rng = np.random.default_rng(4)
    h = rng.standard_normal((50, 6)) + 2.0
    t = rng.standard_normal((50, 3)) + 1.0
    w = rng.standard_normal((3, 6))
    b = rng.standard_normal(3) if with_bias else None
    residual = t - h @ w.T - (0.0 if b is None else b)  # its mean is far from zero: the offset term counts
    expected = (residual**2).sum(0)
    moments = accumulate(h, t, [20, 30], dtype=np.float64)
    np.testing.assert_allclose(moments.error(w, b), expected, rtol=1e-9)
    rows = FitAccumulator(6, 3)
    rows.add(h[:3], t[:3])  # 3 rows of 6 inputs: kept as rows
    np.testing.assert_allclose(rows.finish().error(w, b), (residual[:3] ** 2).sum(0), rtol=1e-9)


def test_an_exact_fit_has_zero_error():
    rng = np.random.default_rng(5)
    h = rng.standard_normal((40, 5))
    w, b = rng.standard_normal((2, 5)), np.array([0.5, -1.5])
    moments = accumulate(h, h @ w.T + b, [40], dtype=np.float64)
    assert (moments.error(w, b) < 1e-9).all()


def test_the_rows_error_covers_every_output_when_it_works_in_slices():
    # 2**22 float64 elements per slice of w: at 2**17 inputs that is 32 output rows, so 70 take three slices
    rng = np.random.default_rng(6)
    width, outputs = 1 << 17, 70
    h = rng.standard_normal((2, width))
    w = rng.standard_normal((outputs, width)).astype(np.float32)
    t = rng.standard_normal((2, outputs))
    acc = FitAccumulator(width, outputs)
    acc.add(h, t)
    expected = ((t - h @ w.T.astype(np.float64)) ** 2).sum(0)
    np.testing.assert_allclose(acc.finish().error(w, None), expected, rtol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_gram_wider_than_one_strip_is_whole_and_symmetric(dtype):
    """The Gram is accumulated in one triangle and mirrored a strip of 512 rows at a time: at width 1100
    (two whole strips and a partial one) every entry, above and below the diagonal, is the centred one."""
    rng = np.random.default_rng(7)
    h = (rng.standard_normal((300, 1100)) + 3.0).astype(np.float32)
    t = rng.standard_normal((300, 2)).astype(np.float32)
    moments = accumulate(h, t, [100, 1, 199], dtype)
    want = centred(h).T @ centred(h)
    assert moments.gram.dtype == dtype
    np.testing.assert_array_equal(moments.gram, moments.gram.T)
    np.testing.assert_allclose(moments.gram, want, rtol=1e-4, atol=1e-3 * np.abs(want).max())


def test_the_scratch_lends_the_same_array_zeroed_and_a_new_one_for_another_shape():
    scratch = Scratch()
    first = scratch.zeros("gram", (3, 3), np.float32)
    first += 5
    again = scratch.zeros("gram", (3, 3), np.float32)
    assert again is first
    np.testing.assert_array_equal(again, 0)
    assert scratch.zeros("factor", (3, 3), np.float32) is not first  # another name, another array
    wider = scratch.zeros("gram", (4, 4), np.float32)
    assert wider.shape == (4, 4) and not np.shares_memory(wider, first)
    assert scratch.zeros("gram", (4, 4), np.float64).dtype == np.float64


def test_two_layers_accumulated_in_one_scratch_each_get_their_own_moments():
    """... in the same array: the second layer's Gram is the first one's, zeroed and filled again."""
    rng = np.random.default_rng(8)
    scratch = Scratch()
    grams = []
    for layer in range(2):
        h = (rng.standard_normal((50, 6)) * (layer + 1)).astype(np.float32)
        t = rng.standard_normal((50, 2)).astype(np.float32)
        acc = FitAccumulator(6, 2, scratch=scratch)
        acc.add(h, t)
        moments = acc.finish()
        np.testing.assert_allclose(moments.gram, centred(h).T @ centred(h), rtol=1e-4, atol=1e-4)
        grams.append(moments.gram)
    assert grams[1] is grams[0]
