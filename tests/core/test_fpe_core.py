"""The numpy FPE core: partitions, output copies, exact-count pruning, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from neurorewrite.errors import InvalidOptionError
from neurorewrite.fpe import (
    BIAS_MODES,
    PRUNE_MODES,
    FPEConfig,
    block_nnz,
    check_alpha,
    expand_block,
    split_neurons,
)


def random_block(rng: np.random.Generator, h: int, d: int, o: int, ties: bool = False):
    w1 = rng.standard_normal((h, d)).astype(np.float32)
    w2 = rng.standard_normal((o, h)).astype(np.float32)
    if ties:  # quantise so many magnitudes are equal, across both layers
        w1 = np.round(w1 * 2) / 2
        w2 = np.round(w2 * 2) / 2
    b1 = rng.standard_normal(h).astype(np.float32)
    b2 = rng.standard_normal(o).astype(np.float32)
    return w1, b1, w2, b2


def assert_partition(assignment: np.ndarray, alpha: int) -> None:
    h, d = assignment.shape
    assert assignment.min() >= 0 and assignment.max() < alpha
    # disjoint and covering per neuron: every input goes to exactly one child
    one_hot = assignment[:, :, None] == np.arange(alpha)[None, None, :]
    assert (one_hot.sum(axis=2) == 1).all()


def children_support_disjoint(w1e: np.ndarray, w1: np.ndarray, alpha: int) -> None:
    h = w1.shape[0]
    by_parent = (w1e != 0).reshape(h, alpha, -1)
    assert (by_parent.sum(axis=1) <= 1).all()
    # a child's kept weights are exactly the parent's weights
    np.testing.assert_array_equal(w1e.reshape(h, alpha, -1).sum(axis=1)[w1e.reshape(h, alpha, -1).any(axis=1)],
                                  w1[w1e.reshape(h, alpha, -1).any(axis=1)])


@settings(max_examples=60, deadline=None)
@example(h=1, d=1, o=1, alpha=2, seed=0, split="random", prune="global", bias="copy", ties=True)  # all weights 0
@given(
    h=st.integers(1, 12), d=st.integers(1, 20), o=st.integers(1, 8), alpha=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1), split=st.sampled_from(["random", "shared", "blocks", "feature", "groups", "tiered"]),
    prune=st.sampled_from(PRUNE_MODES), bias=st.sampled_from(BIAS_MODES), ties=st.booleans(),
)
def test_count_and_partition_invariants(h, d, o, alpha, seed, split, prune, bias, ties):
    rng = np.random.default_rng(seed)
    w1, b1, w2, b2 = random_block(rng, h, d, o, ties)
    groups = tuple((j,) for j in range(d)) if split == "groups" else None
    if split in ("feature", "groups") and d < alpha:
        split = "random"  # clustering/groups need at least alpha inputs
        groups = None
    cfg = FPEConfig(alpha=alpha, split=split, seed=seed, bias=bias, prune=prune, groups=groups)
    try:
        exp = expand_block(w1, b1, w2, b2, cfg)
    except InvalidOptionError as e:  # a block too small to absorb the copies: only when it truly is
        assert "cannot prune" in str(e)
        extra = (alpha - 1) * (np.count_nonzero(w2) + np.count_nonzero(b1))
        if prune == "global":
            assert np.count_nonzero(w1) + alpha * np.count_nonzero(w2) < extra
        else:  # W2' can always shed its own copies; W1' must absorb the hidden-bias copies
            assert np.count_nonzero(w1) < (alpha - 1) * np.count_nonzero(b1)
        return
    assert exp.nnz_after == exp.nnz_before == block_nnz(w1, b1, w2, b2)
    assert exp.nnz_after == block_nnz(exp.w1, exp.b1, exp.w2, exp.b2)
    assert exp.w1.shape == (alpha * h, d) and exp.w2.shape == (o, alpha * h)
    assert_partition(np.asarray(exp.assignment), alpha)
    children_support_disjoint(exp.w1, w1, alpha)
    if prune == "layer":
        assert np.count_nonzero(exp.w2) == np.count_nonzero(w2)


def test_global_prune_matches_a_stable_sort_of_the_expanded_weights():
    """Reference: materialise every expanded nonzero, stable-sort by magnitude (W1' first), cut k."""
    rng = np.random.default_rng(3)
    for trial in range(20):
        w1, b1, w2, b2 = random_block(rng, 5, 7, 4, ties=True)
        alpha = 3
        cfg = FPEConfig(alpha=alpha, seed=trial, bias="copy")
        exp = expand_block(w1, b1, w2, b2, cfg)
        unpruned1 = np.zeros_like(exp.w1)
        h = w1.shape[0]
        for i in range(h):
            for j in range(w1.shape[1]):
                unpruned1[i * alpha + exp.assignment[i, j], j] = w1[i, j]
        unpruned2 = np.repeat(w2, alpha, axis=1)
        k = (alpha - 1) * (np.count_nonzero(w2) + np.count_nonzero(b1))
        # order of candidates: W1' entries in (parent, input) order, then W2 entries (o, parent) with copies
        cand = [(abs(w1[i, j]), 0, i * w1.shape[1] + j, 0) for i in range(h) for j in range(w1.shape[1]) if w1[i, j]]
        cand += [(abs(w2[oo, i]), 1, oo * h + i, c) for oo in range(w2.shape[0]) for i in range(h) for c in range(alpha) if w2[oo, i]]
        cand.sort(key=lambda t: t[0])  # Python's sort is stable
        for mag, layer, flat, c in cand[:k]:
            if layer == 0:
                i, j = divmod(flat, w1.shape[1])
                unpruned1[i * alpha + exp.assignment[i, j], j] = 0
            else:
                oo, i = divmod(flat, h)
                unpruned2[oo, i * alpha + c] = 0
        np.testing.assert_array_equal(exp.w1, unpruned1)
        np.testing.assert_array_equal(exp.w2, unpruned2)


def test_outputs_copy_parent_column_and_bias_modes():
    rng = np.random.default_rng(0)
    w1, b1, w2, b2 = random_block(rng, 4, 16, 3)
    for bias, factor in (("copy", 1.0), ("split", 0.25)):
        exp = expand_block(w1, b1, w2, b2, FPEConfig(alpha=4, bias=bias, seed=1))
        np.testing.assert_allclose(exp.b1, np.repeat(b1, 4) * factor, rtol=1e-7)
        kept = exp.w2 != 0
        np.testing.assert_array_equal(exp.w2[kept], np.repeat(w2, 4, axis=1)[kept])
        np.testing.assert_array_equal(exp.b2, b2)


def test_alpha_one_is_the_identity():
    rng = np.random.default_rng(0)
    w1, b1, w2, b2 = random_block(rng, 6, 9, 5)
    exp = expand_block(w1, b1, w2, b2, FPEConfig(alpha=1))
    np.testing.assert_array_equal(exp.w1, w1)
    np.testing.assert_array_equal(exp.w2, w2)
    np.testing.assert_array_equal(exp.b1, b1)


def test_same_seed_same_expansion_and_seeds_differ():
    rng = np.random.default_rng(0)
    w1, b1, w2, b2 = random_block(rng, 8, 32, 4)
    a = expand_block(w1, b1, w2, b2, FPEConfig(alpha=4, seed=5))
    b = expand_block(w1, b1, w2, b2, FPEConfig(alpha=4, seed=5))
    c = expand_block(w1, b1, w2, b2, FPEConfig(alpha=4, seed=6))
    np.testing.assert_array_equal(a.w1, b.w1)
    np.testing.assert_array_equal(a.w2, b.w2)
    assert not np.array_equal(a.assignment, c.assignment)


def test_inputs_are_not_modified():
    rng = np.random.default_rng(0)
    arrays = random_block(rng, 8, 32, 4)
    before = [a.copy() for a in arrays]
    expand_block(*arrays, FPEConfig(alpha=3))
    for a, b in zip(arrays, before):
        np.testing.assert_array_equal(a, b)


def test_random_split_is_balanced_per_neuron():
    a = split_neurons(np.ones((10, 23), np.float32), FPEConfig(alpha=4, seed=0))
    for row in a:
        counts = np.bincount(row, minlength=4)
        assert counts.max() - counts.min() <= 1


def test_shared_split_is_one_partition_for_all_neurons():
    a = split_neurons(np.ones((10, 24), np.float32), FPEConfig(alpha=4, split="shared", seed=0))
    assert (a == a[0]).all()
    assert np.bincount(a[0], minlength=4).tolist() == [6, 6, 6, 6]


def test_blocks_split_gives_each_child_one_contiguous_slice():
    a = split_neurons(np.ones((5, 10), np.float32), FPEConfig(alpha=4, split="blocks", seed=3))
    assert (a == a[0]).all()
    assert a[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]  # sizes differ by at most one, in order


def test_feature_split_separates_feature_clusters():
    """Inputs used by disjoint sets of neurons form clusters; each cluster goes to one child."""
    rng = np.random.default_rng(0)
    w1 = np.zeros((8, 12), np.float32)
    clusters = [range(0, 3), range(3, 6), range(6, 9), range(9, 12)]
    for c, cols in enumerate(clusters):
        w1[2 * c : 2 * c + 2, list(cols)] = rng.uniform(0.5, 1.5, (2, 3))
    a = split_neurons(w1, FPEConfig(alpha=4, split="feature", seed=0))
    labels = a[0]
    for cols in clusters:
        assert len({int(labels[j]) for j in cols}) == 1
    assert len({int(labels[cols[0]]) for cols in clusters}) == 4


def test_groups_split_keeps_each_group_in_one_child():
    groups = ((0, 1, 2), (3, 4), (5, 6, 7), (8,), (9, 10, 11))
    a = split_neurons(np.ones((16, 12), np.float32), FPEConfig(alpha=2, split="groups", groups=groups, seed=0))
    for row in a:
        for g in groups:
            assert len({int(row[j]) for j in g}) == 1
    assert len({tuple(r) for r in a}) > 1  # groups are dealt per neuron, not once for all


@pytest.mark.parametrize(
    "groups, message",
    [
        (((0, 1), (1, 2), (3,)), "several groups"),
        (((0, 1), (2,)), "in no group"),
        (((0, 1, 2, 3),), "at least alpha"),
        (((0, 1), (2, 9)), "outside"),
        (((0, 1, 2, 3), ()), "empty group"),
    ],
)
def test_groups_that_are_not_a_partition_are_rejected(groups, message):
    with pytest.raises(InvalidOptionError, match=message):
        split_neurons(np.ones((2, 4), np.float32), FPEConfig(alpha=2, split="groups", groups=groups))


@pytest.mark.parametrize("alpha", [0, -1, 2.5, "4", True, None])
def test_bad_alpha(alpha):
    with pytest.raises(InvalidOptionError, match="alpha"):
        check_alpha(alpha)


@pytest.mark.parametrize("option", [{"split": "nope"}, {"bias": "half"}, {"prune": "local"}])
def test_bad_options(option):
    with pytest.raises(InvalidOptionError):
        FPEConfig(alpha=2, **option)
