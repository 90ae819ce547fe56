"""FPE on gated blocks (docs/methods.md 1b): one partition per parent for gate and up, exact counts."""

from __future__ import annotations

import numpy as np
import pytest

from neurorewrite.fpe import BIAS_MODES, PRUNE_MODES, FPEConfig, expand_block, expand_gated_block


def gated_block(rng: np.random.Generator, h: int = 6, d: int = 10, o: int = 4, bias: bool = True, ties: bool = False):
    wg, wu = (rng.standard_normal((h, d)).astype(np.float32) for _ in range(2))
    wd = rng.standard_normal((o, h)).astype(np.float32)
    if ties:
        wg, wu, wd = (np.round(w * 2) / 2 for w in (wg, wu, wd))
    bg, bu, bd = ((rng.standard_normal(n).astype(np.float32) if bias else None) for n in (h, h, o))
    return wg, bg, wu, bu, wd, bd


def nnz(*arrays) -> int:
    return sum(int(np.count_nonzero(a)) for a in arrays if a is not None)


def silu(z: np.ndarray) -> np.ndarray:
    return z / (1 + np.exp(-z))


@pytest.mark.parametrize("split", ["random", "feature", "shared", "blocks"])
@pytest.mark.parametrize("prune", PRUNE_MODES)
@pytest.mark.parametrize("bias", BIAS_MODES)
@pytest.mark.parametrize("alpha", [2, 3])
def test_counts_and_shared_partition(split, prune, bias, alpha) -> None:
    rng = np.random.default_rng(alpha)
    for ties in (False, True):
        block = gated_block(rng, ties=ties)
        exp = expand_gated_block(*block, FPEConfig(alpha=alpha, split=split, seed=1, bias=bias, prune=prune))
        assert exp.nnz_after == exp.nnz_before == nnz(*block)
        assert nnz(exp.wg, exp.bg, exp.wu, exp.bu, exp.wd, exp.bd) == nnz(*block)
        h, d = block[0].shape
        for k in range(alpha):  # child k of every parent reads only its share S_k, in gate and up alike
            outside = exp.assignment != k
            assert not exp.wg[k::alpha][outside].any() and not exp.wu[k::alpha][outside].any()
        assert all(sorted(np.unique(row)) == list(range(alpha)) for row in exp.assignment)
        if prune == "layer":  # each layer keeps its own count
            assert nnz(exp.wg, exp.bg) == nnz(block[0], block[1])
            assert nnz(exp.wu, exp.bu) == nnz(block[2], block[3])
            assert nnz(exp.wd) == nnz(block[4])


def test_children_compute_the_method() -> None:
    rng = np.random.default_rng(0)
    wg, bg, wu, bu, wd, bd = gated_block(rng, h=3, d=8, o=2)
    cfg = FPEConfig(alpha=2, split="random", seed=3, bias="copy", prune="global")
    exp = expand_gated_block(wg, bg, wu, bu, wd, bd, cfg)
    x = rng.standard_normal(8).astype(np.float32)
    hidden = silu(exp.wg @ x + exp.bg) * (exp.wu @ x + exp.bu)
    got = exp.wd @ hidden + exp.bd
    # by hand: child k of parent i reads x on S_k, with the kept (unpruned) weights
    want = bd.astype(np.float64).copy()
    for i in range(3):
        for k in range(2):
            mask = exp.assignment[i] == k
            g = exp.wg[2 * i + k, mask] @ x[mask] + bg[i]
            u = exp.wu[2 * i + k, mask] @ x[mask] + bu[i]
            want += exp.wd[:, 2 * i + k] * (silu(g) * u)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_alpha_one_is_the_identity() -> None:
    block = gated_block(np.random.default_rng(5))
    exp = expand_gated_block(*block, FPEConfig(alpha=1))
    for got, want in zip((exp.wg, exp.bg, exp.wu, exp.bu, exp.wd, exp.bd), block):
        np.testing.assert_array_equal(got, want)


def test_global_prune_spans_gate_up_and_down() -> None:
    """The smallest magnitudes go first wherever they are: make the gate's tiny, and only the gate loses weights."""
    rng = np.random.default_rng(2)
    wg, bg, wu, bu, wd, bd = gated_block(rng, bias=False)
    wg = wg * 1e-3
    exp = expand_gated_block(wg, None, wu, None, wd, None, FPEConfig(alpha=2, seed=0))
    assert nnz(exp.wu) == nnz(wu) and nnz(exp.wd) == 2 * nnz(wd)
    assert nnz(exp.wg) == nnz(wg) - nnz(wd)


def test_the_ungated_core_is_unchanged() -> None:
    """expand_block and a gated block whose up path is all ones per child share the same partition stream."""
    rng = np.random.default_rng(7)
    w1 = rng.standard_normal((5, 9)).astype(np.float32)
    w2 = rng.standard_normal((3, 5)).astype(np.float32)
    cfg = FPEConfig(alpha=3, split="random", seed=11)
    plain = expand_block(w1, None, w2, None, cfg)
    gated = expand_gated_block(w1, None, np.abs(w1) + 10, None, w2, None, cfg)
    np.testing.assert_array_equal(plain.assignment, gated.assignment)


def test_mismatched_gate_and_up_are_refused() -> None:
    wg, bg, wu, bu, wd, bd = gated_block(np.random.default_rng(1))
    with pytest.raises(Exception, match="up weight has shape"):
        expand_gated_block(wg, bg, wu[:, :-1], bu, wd, bd, FPEConfig(alpha=2))
