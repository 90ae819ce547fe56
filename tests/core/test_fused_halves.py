"""A fused gate/up projection (one MatMul whose output is cut in two halves) is split into its gate and
up weights and joined back exactly, whichever half holds the gate."""

from __future__ import annotations

import numpy as np
import pytest

from neurorewrite.fpe import join_fused, split_fused


@pytest.mark.parametrize("gate_half", [0, 1])
def test_split_takes_the_gate_from_its_half_and_join_restores_the_fused_weights(gate_half):
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((6, 4)), rng.standard_normal(6)
    (wg, bg), (wu, bu) = split_fused(w, b, gate_half)
    gate, up = (slice(0, 3), slice(3, 6)) if gate_half == 0 else (slice(3, 6), slice(0, 3))
    np.testing.assert_array_equal(wg, w[gate])
    np.testing.assert_array_equal(bg, b[gate])
    np.testing.assert_array_equal(wu, w[up])
    np.testing.assert_array_equal(bu, b[up])
    joined_w, joined_b = join_fused((wg, bg), (wu, bu), gate_half)
    np.testing.assert_array_equal(joined_w, w)
    np.testing.assert_array_equal(joined_b, b)


@pytest.mark.parametrize("gate_half", [0, 1])
def test_a_fused_projection_without_bias_stays_without(gate_half):
    w = np.arange(16.0).reshape(8, 2)
    gate, up = split_fused(w, None, gate_half)
    assert gate[1] is None and up[1] is None
    joined_w, joined_b = join_fused(gate, up, gate_half)
    np.testing.assert_array_equal(joined_w, w)
    assert joined_b is None
    # one half with a bias and one without has no fused bias to write
    assert join_fused((gate[0], np.ones(4)), up, gate_half)[1] is None
    assert join_fused(gate, (up[0], np.ones(4)), gate_half)[1] is None
