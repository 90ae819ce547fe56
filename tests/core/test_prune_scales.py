"""Activation-aware pruning in the core: scores order the prune, the count stays exact, no scales = magnitude."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neurorewrite.fpe import PRUNE_MODES, FPEConfig, PruneScales, expand_block, expand_gated_block


def block(seed: int, h: int = 6, d: int = 10, o: int = 4):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((h, d)).astype(np.float32), rng.standard_normal(h).astype(np.float32),
            rng.standard_normal((o, h)).astype(np.float32), rng.standard_normal(o).astype(np.float32))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), alpha=st.integers(1, 4), prune=st.sampled_from(PRUNE_MODES),
       zeros=st.booleans())
def test_count_is_exact_with_any_scales(seed, alpha, prune, zeros):
    w1, b1, w2, b2 = block(seed)
    rng = np.random.default_rng(seed + 1)
    cols = rng.random(w1.shape[1])
    if zeros:  # dead inputs and dead hidden units: scores of zero, ties everywhere
        cols[::3] = 0.0
    scales = PruneScales(cols, (rng.random(w1.shape[0]),), np.where(rng.random(w1.shape[0]) < 0.5, 0.0, 1.0))
    exp = expand_block(w1, b1, w2, b2, FPEConfig(alpha=alpha, seed=seed, prune=prune), scales)
    assert exp.nnz_after == exp.nnz_before


def test_unit_scales_give_the_magnitude_prune():
    w1, b1, w2, b2 = block(0)
    cfg = FPEConfig(alpha=3, seed=4)
    plain = expand_block(w1, b1, w2, b2, cfg)
    ones = PruneScales(np.ones(w1.shape[1]), (np.ones(w1.shape[0]),), np.ones(w1.shape[0]))
    scaled = expand_block(w1, b1, w2, b2, cfg, ones)
    np.testing.assert_array_equal(plain.w1, scaled.w1)
    np.testing.assert_array_equal(plain.w2, scaled.w2)


@pytest.mark.parametrize("prune", PRUNE_MODES)
def test_a_silent_input_loses_its_weights_first(prune):
    """Input 0 never carries signal (rms 0): all its W1 weights go before any other input's."""
    w1, b1, w2, b2 = block(1)
    w1[:, 0] = 10.0  # the largest magnitudes: the magnitude prune keeps them all
    cols = np.ones(w1.shape[1])
    cols[0] = 0.0
    cfg = FPEConfig(alpha=2, seed=0, prune=prune)
    plain = expand_block(w1, b1, w2, b2, cfg)
    aware = expand_block(w1, b1, w2, b2, cfg, PruneScales(in_columns=cols))
    assert np.count_nonzero(plain.w1[:, 0]) == w1.shape[0]
    removed = np.count_nonzero(w1) - np.count_nonzero(aware.w1)
    assert removed > 0 and np.count_nonzero(aware.w1[:, 0]) == max(0, w1.shape[0] - removed)
    assert aware.nnz_after == aware.nnz_before


def test_a_dead_hidden_unit_loses_its_outgoing_copies_first():
    w1, b1, w2, b2 = block(2)
    w2[:, 0] = 10.0
    out = np.ones(w1.shape[0])
    out[0] = 0.0
    aware = expand_block(w1, b1, w2, b2, FPEConfig(alpha=2, seed=0, prune="layer"), PruneScales(out_columns=out))
    assert np.count_nonzero(aware.w2[:, :2]) == 0  # both children of parent 0 lost their column
    assert aware.nnz_after == aware.nnz_before


def test_gated_blocks_take_scales_too():
    rng = np.random.default_rng(3)
    wg, wu = rng.standard_normal((2, 5, 8)).astype(np.float32)
    wd = rng.standard_normal((4, 5)).astype(np.float32)
    cols = np.ones(8)
    cols[3] = 0.0
    exp = expand_gated_block(wg, None, wu, None, wd, None, FPEConfig(alpha=2, seed=0), PruneScales(in_columns=cols))
    assert exp.nnz_after == exp.nnz_before
    plain = expand_gated_block(wg, None, wu, None, wd, None, FPEConfig(alpha=2, seed=0))
    assert np.count_nonzero(exp.wg[:, 3]) + np.count_nonzero(exp.wu[:, 3]) < \
        np.count_nonzero(plain.wg[:, 3]) + np.count_nonzero(plain.wu[:, 3])


@pytest.mark.parametrize("matrix", [0, None])
def test_scores_of_listed_entries_are_the_entries_scores(matrix, monkeypatch):
    """A matrix with zeros lists its candidates by flat index (read in chunks); each score must be the
    one the dense grid gives at that position: |w| * row factor * column factor."""
    from neurorewrite.fpe import prune

    rng = np.random.default_rng(7)
    shape = (5, 9)
    mags = rng.random(shape[0] * shape[1])
    scales = PruneScales(rng.random(shape[1]), (rng.random(shape[0]),), rng.random(shape[1]))
    row = scales.in_rows[0] if matrix == 0 else np.ones(shape[0])
    col = scales.in_columns if matrix == 0 else scales.out_columns
    expected = mags.reshape(shape) * row[:, None] * col[None, :]
    np.testing.assert_allclose(scales.scores(mags, None, shape, matrix), expected.ravel(), rtol=1e-12)
    flat = np.array([44, 0, 13, 9, 30, 8])
    monkeypatch.setattr(prune, "SCORE_CHUNK", 4)  # more than one chunk
    np.testing.assert_allclose(scales.scores(mags[flat], flat, shape, matrix), expected.ravel()[flat], rtol=1e-12)
