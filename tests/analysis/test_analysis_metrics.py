"""The weight and activation metrics against hand-computed values on tiny matrices."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from neurorewrite.analysis import metrics
from neurorewrite.analysis.activations import _Accumulator, monosemantic_scale, phi_max_from_range
from neurorewrite.analysis.metrics import feature_capacity, layer_stats, pooled_density, row_cosines


def test_orthogonal_weights_have_capacity_one_and_cosine_zero():
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((5, 5)))
    for w in (np.eye(4), np.diag([3.0, -2.0, 0.5, 1.0]), q):
        np.testing.assert_allclose(feature_capacity(w), np.ones(w.shape[1]), atol=1e-12)
        cos = row_cosines(w)
        assert cos.mean_abs == pytest.approx(0.0, abs=1e-12)
        assert cos.mean_signed == pytest.approx(0.0, abs=1e-12)


def test_identical_rows_have_cosine_one():
    w = np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])
    cos = row_cosines(w)
    assert cos.mean_abs == pytest.approx(1.0)
    assert cos.mean_signed == pytest.approx(1.0)
    # G = 3 * [[1, 2], [2, 4]]: C_0 = 1 / (1 + 4), C_1 = 16 / (4 + 16)
    np.testing.assert_allclose(feature_capacity(w), [0.2, 0.8])


def test_hand_computed_capacity_and_cosine():
    w = np.array([[1.0, 0.0], [1.0, 1.0]])
    # columns (1, 1) and (0, 1): G = [[2, 1], [1, 1]]; C_0 = 4 / (4 + 1), C_1 = 1 / (1 + 1)
    np.testing.assert_allclose(feature_capacity(w), [0.8, 0.5])
    assert row_cosines(w).mean_abs == pytest.approx(1 / np.sqrt(2))


def test_signed_and_absolute_cosine_differ_for_opposite_rows():
    cos = row_cosines(np.array([[1.0, 0.0], [-2.0, 0.0]]))
    assert cos.mean_abs == pytest.approx(1.0)
    assert cos.mean_signed == pytest.approx(-1.0)


def test_unused_feature_has_capacity_zero_and_zero_rows_are_left_out():
    w = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(feature_capacity(w), [1.0, 1.0, 0.0])
    cos = row_cosines(w)
    assert cos.rows_used == 2
    assert cos.mean_abs == pytest.approx(0.0)  # the zero row would otherwise drag the mean with it
    one = row_cosines(np.array([[0.0, 0.0], [1.0, 1.0]]))
    assert one.rows_used == 1 and one.mean_abs is None and one.mean_signed is None


def test_cosine_equals_the_pairwise_definition(monkeypatch):
    monkeypatch.setattr(metrics, "CHUNK_ROWS", 7)  # several chunks on a small matrix
    w = np.random.default_rng(1).standard_normal((30, 6))
    w[4] = 0.0
    rows = [r / np.linalg.norm(r) for r in w if np.any(r)]
    pairs = [float(a @ b) for a, b in itertools.combinations(rows, 2)]
    cos = row_cosines(w)
    assert cos.rows_used == 29
    assert cos.mean_abs == pytest.approx(np.mean(np.abs(pairs)), rel=1e-10)
    assert cos.mean_signed == pytest.approx(np.mean(pairs), rel=1e-10)


def test_capacity_equals_the_definition_and_sum_is_bounded_by_rank():
    w = np.random.default_rng(2).standard_normal((3, 7))
    expected = [(w[:, j] @ w[:, j]) ** 2 / sum((w[:, j] @ w[:, k]) ** 2 for k in range(7)) for j in range(7)]
    capacity = feature_capacity(w)
    np.testing.assert_allclose(capacity, expected, rtol=1e-12)
    assert capacity.sum() <= np.linalg.matrix_rank(w) + 1e-9


def test_layer_stats_counts_nonzeros_and_density():
    s = layer_stats("fc", np.array([[0.0, 1.0], [2.0, 0.0], [0.0, 0.0]]), np.array([0.0, 1.0, 1.0]))
    assert (s.out_features, s.in_features, s.nonzeros, s.bias_nonzeros) == (3, 2, 2, 2)
    assert s.density == pytest.approx(2 / 6)


def test_pooled_density_is_exact_when_small_and_averages_tiles_when_large():
    mask = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]], dtype=float)
    exact, tile = pooled_density(mask, 4)
    np.testing.assert_array_equal(exact, mask)
    assert tile == (1, 1)
    pooled, tile = pooled_density(mask * 5.0, 2)
    np.testing.assert_allclose(pooled, [[0.75, 0.0], [0.0, 0.5]])
    assert tile == (2, 2)


def test_monosemantic_scale_hand_computed():
    z = np.array([[0.0, 1.0], [2.0, 1.0]])
    mean, var = z.mean(axis=0), z.var(axis=0, ddof=1)  # var = [2, 0]
    phi = monosemantic_scale(z, mean, var)
    # neuron 0: (z - 1)^2 / (2 + 0.01 * mean([2, 0])) = 1 / 2.01; neuron 1 is constant: 0 / 0.01 = 0
    np.testing.assert_allclose(phi, [[1 / 2.01, 0.0], [1 / 2.01, 0.0]])
    np.testing.assert_allclose(monosemantic_scale(np.ones((3, 2)), np.ones(2), np.zeros(2)), 0.0)


def test_streamed_statistics_equal_the_whole_sample():
    rng = np.random.default_rng(3)
    z = np.maximum(rng.standard_normal((101, 5)) * [1, 2, 3, 0, 1] + [0, 1, -9, 0, 50], 0)
    acc = _Accumulator(5)
    for start in range(0, 101, 13):
        acc.add(z[start:start + 13])
    stats = acc.result()
    mean, var = z.mean(axis=0), z.var(axis=0, ddof=1)
    np.testing.assert_allclose(stats.mean, mean, atol=1e-12)
    np.testing.assert_allclose(stats.var, var, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats.phi_max, monosemantic_scale(z, mean, var).max(axis=0), rtol=1e-10)
    np.testing.assert_allclose(phi_max_from_range(z.min(0), z.max(0), mean, var), stats.phi_max)
    assert stats.dead.tolist() == [bool(np.all(z[:, j] == 0)) for j in range(5)]
    assert stats.always_on.tolist() == [bool(np.all(z[:, j] > 0)) for j in range(5)]
    assert stats.dead[2] and stats.dead[3] and stats.always_on[4]
