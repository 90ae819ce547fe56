"""Exact-count pruning against a full stable sort of the expanded candidates (docs/methods.md 1.3).

The reference here materialises every expanded nonzero (a W2 entry once per child copy), sorts them
all with a stable sort (W1' before W2', then by position, then by copy) and cuts the first ``k``; the
core must pick exactly those, per layer (``prune="layer"``) and globally, also on blocks large enough
that the core brackets its threshold with a strided sample instead of looking at every candidate.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from neurorewrite.fpe import FPEConfig, expand_block, expand_gated_block, kth_weighted_value, smallest_by_count
from neurorewrite.fpe import prune as prune_module
from tests.core.argsort_spy import record_argsort_sizes

# candidates above this many are bracketed by a strided sample
SAMPLE_SIZE = inspect.signature(kth_weighted_value).parameters["sample_size"].default


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


def test_gated_prune_matches_a_stable_sort_in_the_order_gate_up_down() -> None:
    """docs/methods.md 1.4b: ``global`` is one threshold over Wg', Wu' and Wd' with ties by layer in the
    order gate, up, down; ``layer`` cuts each by its own excess."""
    rng = np.random.default_rng(8)
    for prune in ("global", "layer"):
        for trial in range(4):
            h, d, o, a = 5, 8, 4, 3
            wg, wu = (np.round(rng.standard_normal((h, d)) * 2).astype(np.float32) / 2 for _ in range(2))
            wd = (np.round(rng.standard_normal((o, h)) * 2) / 2).astype(np.float32)
            bg, bu = (rng.standard_normal(h).astype(np.float32) for _ in range(2))
            exp = expand_gated_block(wg, bg, wu, bu, wd, None, FPEConfig(alpha=a, seed=trial, bias="copy", prune=prune))
            ex_in = [(a - 1) * int(np.count_nonzero(b)) for b in (bg, bu)]
            ex_out = (a - 1) * int(np.count_nonzero(wd))
            # every candidate: (magnitude, layer, flat index, copy), stably sorted by magnitude
            cands = [(abs(float(w.ravel()[f])), layer, int(f), 0)
                     for layer, w in enumerate((wg, wu)) for f in np.flatnonzero(w)]
            cands += [(abs(float(wd.ravel()[f])), 2, int(f), c) for f in np.flatnonzero(wd) for c in range(a)]
            if prune == "global":
                cut = sorted(cands, key=lambda t: t[0])[: sum(ex_in) + ex_out]
            else:
                cut = []
                for layer, k in enumerate((*ex_in, ex_out)):
                    cut += sorted((t for t in cands if t[1] == layer), key=lambda t: t[0])[:k]
            want = [np.zeros((h, a, d), np.float32) for _ in range(2)]
            kept = [wg.copy(), wu.copy()]
            wd_e = np.repeat(wd, a, axis=1)
            for _, layer, flat, copy in cut:
                if layer < 2:
                    kept[layer].ravel()[flat] = 0
                else:
                    oo, i = divmod(flat, h)
                    wd_e[oo, i * a + copy] = 0
            for layer in range(2):
                want[layer][np.arange(h)[:, None], exp.assignment, np.arange(d)[None, :]] = kept[layer]
            np.testing.assert_array_equal(exp.wg, want[0].reshape(h * a, d), err_msg=f"gate, {prune}")
            np.testing.assert_array_equal(exp.wu, want[1].reshape(h * a, d), err_msg=f"up, {prune}")
            np.testing.assert_array_equal(exp.wd, wd_e, err_msg=f"down, {prune}")


def test_a_copied_part_before_another_part() -> None:
    """smallest_by_count on any order of parts: a part with copies may come first; the cut stops exactly at k."""
    parts = [(np.array([0.5], np.float32), 3), (np.array([0.5, 0.7], np.float32), 1)]
    assert [(c[0].tolist(), c[1], c[2]) for c in smallest_by_count(parts, 2)] == [([], 0, 2), ([], -1, 0)]
    assert [(c[0].tolist(), c[1], c[2]) for c in smallest_by_count(parts, 4)] == [([0], -1, 0), ([0], -1, 0)]
    assert [(c[0].tolist(), c[1], c[2]) for c in smallest_by_count(parts, 5)] == [([0], -1, 0), ([0, 1], -1, 0)]


@pytest.mark.parametrize("prune", ["global", "layer"])
def test_a_block_that_exactly_absorbs_the_copies_is_expanded(prune) -> None:
    """The boundary of "too small": excess equal to the candidates prunes every candidate, no error."""
    w1 = np.array([[1.0, 2.0]], np.float32)  # one parent, two inputs
    b1 = np.array([3.0], np.float32)
    w2 = np.array([[4.0]], np.float32)
    if prune == "layer":  # alpha 3: W1' must lose the 2 bias copies, exactly its 2 weights
        exp = expand_block(w1, b1, w2, None, FPEConfig(alpha=3, prune="layer", bias="copy"))
        assert np.count_nonzero(exp.w1) == 0 and np.count_nonzero(exp.w2) == 1
    else:  # no bias, alpha 2: copies add 1; global candidates 2 + 2 = 4 > 1; make it exact with a zero W1
        exp = expand_block(np.zeros_like(w1), None, w2, None, FPEConfig(alpha=2))
        assert np.count_nonzero(exp.w2) == 1
    assert exp.nnz_after == exp.nnz_before


def test_large_blocks_sort_only_a_sample_and_the_bracket(monkeypatch) -> None:
    """docs/methods.md 1.3: the threshold of a large block is found without sorting it: only a strided
    sample and the few entries inside the bracket are sorted (a spy on the module's argsort records sizes)."""
    rng = np.random.default_rng(1)
    parts = [(rng.random(2_000_000).astype(np.float32), 1), (rng.random(200_000).astype(np.float32), 4)]
    total = 2_000_000 + 4 * 200_000
    sorted_sizes = record_argsort_sizes(monkeypatch, prune_module)
    for k in (1, total // 3, total - 5):
        sorted_sizes.clear()
        t = kth_weighted_value(parts, k)
        assert t == _reference_kth(parts, k)
        assert max(sorted_sizes) <= 0.1 * 2_200_000, f"sorted {sorted_sizes} of 2.2 M entries"
