"""``choose_pruned`` on the paths the stable-sort tests do not take: matrices with zeros under
activation-aware scores, the exact form of the output :data:`Cut`, dense matrices listed without an
index array, and ``_flat_below`` in chunks and past 2**31 entries."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from neurorewrite.fpe import PruneScales, choose_pruned
from neurorewrite.fpe.prune import _flat_below


def with_zeros(rng: np.random.Generator, shape, levels: int = 4) -> np.ndarray:
    """Quantised weights (many ties) with about a third of them zero."""
    w = np.round(rng.standard_normal(shape) * levels) / levels
    return (w * (rng.random(shape) < 0.7)).astype(np.float32)


def reference(inputs, w_out, alpha, excess_in, excess_out, mode, scales=None):
    """Every candidate (score, matrix, flat index, copy) stably sorted by score, the first ones cut:
    per input matrix the set of cut flat indices, and ``{flat index: copies cut}`` of the output."""
    scales = scales or PruneScales()
    cands = []
    for m, w in enumerate((*inputs, w_out)):
        out = m == len(inputs)
        rows = None if out or m >= len(scales.in_rows) else scales.in_rows[m]
        cols = scales.out_columns if out else scales.in_columns
        for f in np.flatnonzero(w):
            i, j = divmod(int(f), w.shape[1])
            s = float(abs(w.ravel()[f]))
            s = s if rows is None else s * float(rows[i])
            s = s if cols is None else s * float(cols[j])
            cands += [(s, m, int(f))] * (alpha if out else 1)
    cands.sort(key=lambda c: c[0])
    if mode == "global":
        cut = cands[: sum(excess_in) + excess_out]
    else:
        cut = [c for m, k in enumerate((*excess_in, excess_out)) for c in [c for c in cands if c[1] == m][:k]]
    cut_in = [{f for _, m, f in cut if m == i} for i in range(len(inputs))]
    cut_out: dict[int, int] = {}
    for _, m, f in cut:
        if m == len(inputs):
            cut_out[f] = cut_out.get(f, 0) + 1
    return cut_in, cut_out


def chosen(inputs, w_out, alpha, excess_in, excess_out, mode, scales=None):
    """``choose_pruned``'s answer in the reference's form, after checking the :data:`Cut` is well formed:
    ``last`` is -1 exactly when no entry loses only some of its copies, else ``0 < copies < alpha``."""
    flat_in, (whole, last, copies) = choose_pruned(inputs, w_out, alpha, excess_in, excess_out, mode, scales)
    if last == -1:
        assert copies == 0, (last, copies)
    else:
        assert 0 < copies < alpha and last not in set(whole.tolist()), (last, copies)
    cut_out = {int(f): alpha for f in whole}
    if last >= 0:
        cut_out[last] = copies
    return [set(f.tolist()) for f in flat_in], cut_out


@pytest.mark.parametrize("mode", ["global", "layer"])
@pytest.mark.parametrize("gated", [False, True])
def test_scores_order_matrices_with_zeros_like_a_full_sort(mode, gated) -> None:
    """Activation-aware scores on matrices with zeros (their candidates listed by flat index): the cut is
    exactly the first candidates of a stable sort of |w| * row factor * column factor."""
    rng = np.random.default_rng(21)
    h, d, o, alpha = 6, 7, 5, 3
    inputs = [with_zeros(rng, (h, d)) for _ in range(2 if gated else 1)]
    w_out = with_zeros(rng, (o, h))
    scales = PruneScales(np.round(rng.random(d) * 4) / 4, (np.round(rng.random(h) * 4) / 4,), rng.random(h))
    excess_in = [9, 4][: len(inputs)]
    args = (inputs, w_out, alpha, excess_in, 2 * int(np.count_nonzero(w_out)) - 1, mode, scales)
    assert chosen(*args) == reference(*args)


def test_an_output_cut_of_whole_entries_has_no_partial_entry() -> None:
    """When every cut output entry loses all its copies, the :data:`Cut` says so with ``-1`` (not an index
    of the listed nonzeros), also for an output matrix with zeros."""
    rng = np.random.default_rng(4)
    w1, w_out = with_zeros(rng, (5, 6)), with_zeros(rng, (4, 5), levels=64)
    for excess_out in (0, 2, 6):  # per layer, whole entries only: multiples of alpha = 2 (no ties at 64 levels)
        args = ([w1], w_out, 2, [3], excess_out, "layer")
        assert chosen(*args) == reference(*args)
        assert choose_pruned(*args)[1][1] == -1


@pytest.mark.parametrize("mode", ["global", "layer"])
def test_dense_matrices_are_pruned_without_an_index_array(mode) -> None:
    """A matrix without zeros has every entry as a candidate: no list of its flat indices is built (8
    bytes per weight), and the output's magnitudes stay in the weights' float32, so the peak stays under
    12 bytes per weight (4 of them the magnitudes)."""
    rng = np.random.default_rng(0)
    w1, w_out = rng.standard_normal((256, 512)).astype(np.float32), rng.standard_normal((512, 256)).astype(np.float32)
    tracemalloc.start()
    try:
        flat_in, (whole, last, copies) = choose_pruned([w1], w_out, 2, [40], 80, mode)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert flat_in[0].size + whole.size * 2 + copies == 120
    assert peak < 12 * (w1.size + w_out.size), f"{peak / (w1.size + w_out.size):.1f} bytes per weight"


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 24])
def test_flat_below_in_chunks_is_flatnonzero_in_int32(chunk) -> None:
    """``np.flatnonzero(m < t)`` whatever the chunk, in int32 (the narrowest type that fits) for a vector
    of far fewer than 2**31 entries."""
    m = np.random.default_rng(1).random(200).astype(np.float32)
    got = _flat_below(m, np.float32(0.4), chunk)
    np.testing.assert_array_equal(got, np.flatnonzero(m < np.float32(0.4)))
    assert got.dtype == np.int32
    assert _flat_below(m[:0], np.float32(0.4), chunk).dtype == np.int32


class Ones:
    """A vector of ``size`` ones but for a few smaller entries, too long to hold: a slice holds its entries
    up to its last small one (what follows cannot be below a threshold <= 1, so ``_flat_below`` loses
    nothing), which keeps every slice tiny."""

    def __init__(self, size: int, small: dict[int, float]) -> None:
        self.size, self.small = size, small

    def __getitem__(self, s: slice) -> np.ndarray:
        inside = {i - s.start: v for i, v in self.small.items() if s.start <= i < s.stop}
        out = np.ones(max(inside, default=-1) + 1, np.float32)
        out[list(inside)] = list(inside.values())
        return out


def test_flat_below_past_2_to_the_31_keeps_the_indices() -> None:
    """A layer of more than 2**31 weights: the indices past 2**31 must not wrap around in int32."""
    far = [2**31, 2**31 + 5, 3 * 2**30 + 1]  # each near the start of a chunk of 2**30
    m = Ones(3 * 2**30 + 8, {7: 0.5, **{i: 0.25 for i in far}})
    got = _flat_below(m, np.float32(0.75), chunk=1 << 30)
    assert got.tolist() == [7, *far] and got.dtype == np.int64


@pytest.mark.parametrize("mode", ["global", "layer"])
def test_magnitudes_are_compared_in_the_widest_type_of_the_block(mode) -> None:
    """A float16 W1 beside a float32 W2: W2's magnitudes 1.0002 and 1.0001 are one float16 value, so
    comparing in W1's type cut the larger one; the smaller goes."""
    w1 = np.full((2, 3), 4.0, np.float16)
    w_out = np.array([[1.0002, 1.0001]], np.float32)
    _, (whole, last, copies) = choose_pruned([w1], w_out, 2, [0], 1, mode)
    assert (whole.tolist(), last, copies) == ([], 1, 1)
