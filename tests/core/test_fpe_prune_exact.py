"""Exact-count pruning against a full stable sort of the expanded candidates (docs/methods.md 1.3).

The reference here materialises every expanded nonzero (a W2 entry once per child copy), sorts them
all with a stable sort (W1' before W2', then by position, then by copy) and cuts the first ``k``; the
core must pick exactly those, per layer (``prune="layer"``) and globally, also on blocks large enough
that the core brackets its threshold with a strided sample instead of looking at every candidate.
"""

from __future__ import annotations

import numpy as np
import pytest

from neurorewrite.fpe import FPEConfig, expand_block, kth_weighted_value, smallest_by_count

SAMPLE_SIZE = kth_weighted_value.__defaults__[0]  # candidates above this are bracketed by a strided sample


def block(rng: np.random.Generator, h: int, d: int, o: int, levels: int | None):
    """A random block; ``levels`` quantises the weights so many magnitudes tie (across both layers)."""
    w1 = rng.standard_normal((h, d)).astype(np.float32)
    w2 = rng.standard_normal((o, h)).astype(np.float32)
    if levels is not None:
        w1, w2 = (np.round(w * levels) / levels for w in (w1, w2))
    return w1, rng.standard_normal(h).astype(np.float32), w2, rng.standard_normal(o).astype(np.float32)


def sorted_cut(w1: np.ndarray, w2: np.ndarray, alpha: int, k1: int | None, k2: int | None, k: int | None):
    """Reference cut: a stable argsort of every expanded candidate. Returns (cut W1 flat indices,
    cut W2 (flat index, copy) pairs). ``k`` is the global count; ``k1``/``k2`` the per-layer counts."""
    f1 = np.flatnonzero(w1)
    f2 = np.flatnonzero(w2)
    m1 = np.abs(w1.ravel()[f1])
    m2 = np.repeat(np.abs(w2.ravel()[f2]), alpha)  # (entry, copy) in entry-major order
    e2 = np.repeat(f2, alpha)
    c2 = np.tile(np.arange(alpha), f2.size)
    if k is not None:
        order = np.argsort(np.concatenate([m1, m2]), kind="stable")[:k]
        cut1 = f1[order[order < f1.size]]
        rest = order[order >= f1.size] - f1.size
        return cut1, list(zip(e2[rest].tolist(), c2[rest].tolist()))
    cut1 = f1[np.argsort(m1, kind="stable")[:k1]]
    rest = np.argsort(m2, kind="stable")[:k2]
    return cut1, list(zip(e2[rest].tolist(), c2[rest].tolist()))


def expected_weights(w1, w2, assignment, alpha, cut1, cut2):
    h, d = w1.shape
    kept1 = w1.copy()
    kept1.ravel()[cut1] = 0
    w1e = np.zeros((h, alpha, d), w1.dtype)
    w1e[np.arange(h)[:, None], assignment, np.arange(d)[None, :]] = kept1
    w2e = np.repeat(w2, alpha, axis=1)
    for flat, copy in cut2:
        o, i = divmod(flat, h)
        w2e[o, i * alpha + copy] = 0
    return w1e.reshape(h * alpha, d), w2e


def check_against_sort(w1, b1, w2, b2, cfg: FPEConfig) -> None:
    exp = expand_block(w1, b1, w2, b2, cfg)
    a = cfg.alpha
    bias_excess = int(np.count_nonzero(exp.b1)) - int(np.count_nonzero(b1))
    copies_excess = (a - 1) * int(np.count_nonzero(w2))
    if cfg.prune == "global":
        cut1, cut2 = sorted_cut(w1, w2, a, None, None, bias_excess + copies_excess)
    else:
        cut1, cut2 = sorted_cut(w1, w2, a, bias_excess, copies_excess, None)
    want1, want2 = expected_weights(w1, w2, np.asarray(exp.assignment), a, cut1, cut2)
    np.testing.assert_array_equal(exp.w1 != 0, want1 != 0, err_msg=f"W1' pruned differently from a stable sort ({cfg.prune})")
    np.testing.assert_array_equal(exp.w2 != 0, want2 != 0, err_msg=f"W2' pruned differently from a stable sort ({cfg.prune})")
    np.testing.assert_array_equal(exp.w1, want1)
    np.testing.assert_array_equal(exp.w2, want2)


@pytest.mark.parametrize("levels", [None, 2, 8])
@pytest.mark.parametrize("bias", ["split", "copy"])
def test_layer_prune_cuts_the_smallest_of_each_layer(levels, bias) -> None:
    """``prune="layer"``: W1' loses exactly its smallest ``nnz(b1') - nnz(b1)``, W2' its smallest copies."""
    rng = np.random.default_rng(11)
    for trial in range(6):
        w1, b1, w2, b2 = block(rng, 6, 9, 4, levels)
        check_against_sort(w1, b1, w2, b2, FPEConfig(alpha=3, seed=trial, bias=bias, prune="layer"))


def test_layer_prune_keeps_the_largest_weights() -> None:
    """Spelled out on one block: the surviving magnitudes of each layer all exceed the pruned ones."""
    rng = np.random.default_rng(2)
    w1, b1, w2, b2 = block(rng, 8, 12, 5, None)
    exp = expand_block(w1, b1, w2, b2, FPEConfig(alpha=4, prune="layer", bias="copy"))
    kept1 = np.abs(exp.w1[exp.w1 != 0])
    lost1 = np.setdiff1d(np.abs(w1[w1 != 0]), kept1)
    assert lost1.size == 3 * 8 and lost1.max() < kept1.min()
    full2 = np.repeat(np.abs(w2), 4, axis=1)
    assert full2[exp.w2 == 0].max() <= np.abs(exp.w2[exp.w2 != 0]).min()


@pytest.mark.parametrize("prune", ["global", "layer"])
@pytest.mark.parametrize("levels", [None, 8])
def test_exact_count_above_the_sampling_threshold_matches_a_full_sort(prune, levels) -> None:
    """A block whose candidates outnumber the sample several times, so the threshold is bracketed by a
    strided sample and found by an exact count inside the bracket; ties included."""
    rng = np.random.default_rng(5)
    w1, b1, w2, b2 = block(rng, 128, 320, 48, levels)
    assert (w1.size + w2.size) // SAMPLE_SIZE >= 2, "the block must be large enough for a strided sample"
    check_against_sort(w1, b1, w2, b2, FPEConfig(alpha=4, seed=1, bias="copy", prune=prune))


def _reference_kth(parts, k: int):
    vals = np.concatenate([np.repeat(m, mult) for m, mult in parts])
    return np.sort(vals, kind="stable")[k - 1]


@pytest.mark.parametrize("sample_size", [3, 50, 20_000])
def test_kth_weighted_value_is_exact_whatever_the_sample(sample_size) -> None:
    """Against a full sort, with multiplicities, heavy ties and distributions with cliffs (a tiny sample
    must widen its bracket several times)."""
    rng = np.random.default_rng(0)
    shapes = [
        lambda n: rng.random(n).astype(np.float32),
        lambda n: np.round(rng.random(n) * 4).astype(np.float32) / 4,  # five values
        lambda n: np.where(rng.random(n) < 0.97, 1e-3, rng.random(n) + 1).astype(np.float32),  # a cliff
    ]
    for trial in range(12):
        parts = [(shapes[(trial + j) % 3](int(rng.integers(1, 3000))), int(rng.integers(1, 5))) for j in range(3)]
        total = sum(m.size * mult for m, mult in parts)
        for k in {1, 2, total // 3, total // 2, total - 1, total} - {0}:
            t = kth_weighted_value(parts, k, sample_size=sample_size)
            assert t == _reference_kth(parts, k), (trial, k)


def test_smallest_by_count_cuts_part_of_a_copied_entry() -> None:
    """The k-th smallest falls inside an entry's copies: only the first copies go, ties by part then position."""
    parts = [(np.array([0.5, 0.2, 0.5], np.float32), 1), (np.array([0.5, 0.1], np.float32), 3)]
    # sorted: 0.1 x3 (part 1, idx 1), 0.2 (part 0, idx 1), then 0.5 ties: part 0 idx 0, part 0 idx 2, part 1 idx 0 x3
    (w0, l0, c0), (w1, l1, c1) = smallest_by_count(parts, 7)
    assert sorted(w0.tolist()) == [0, 1, 2] and l0 == -1
    assert w1.tolist() == [1] and (l1, c1) == (0, 1), "one copy of the tied entry of part 1 goes"
    (_, (w1, l1, c1)) = smallest_by_count(parts, 8)
    assert w1.tolist() == [1] and (l1, c1) == (0, 2)
    (_, (w1, l1, c1)) = smallest_by_count(parts, 9)
    assert sorted(w1.tolist()) == [0, 1] and l1 == -1, "all three copies go: the entry is cut whole"
