"""The FPE core's smaller promises: exact error messages (they name the option), option normalisation,
dtypes kept, the narrowest child-index dtype, boundary cases of the splits, and the gated feature split."""

from __future__ import annotations

import numpy as np
import pytest

from neurorewrite.errors import InvalidOptionError
from neurorewrite.fpe import (
    FPEConfig,
    block_nnz,
    check_alpha,
    check_groups,
    expand_block,
    expand_gated_block,
    smallest_by_count,
    split_neurons,
)


@pytest.mark.parametrize("options, message", [
    ({"split": "nope"}, "--split must be one of random, feature, groups, shared, blocks, tiered, got 'nope'"),
    ({"bias": "half"}, "--bias must be one of copy, split, got 'half'"),
    ({"prune": "local"}, "--prune must be one of global, layer, got 'local'"),
    ({"split": "groups"}, "--split groups needs a partition: pass --groups FILE.json"),
    ({"alpha": 0}, "--alpha must be an integer >= 1, got 0"),
    ({"alpha": 2.5}, "--alpha must be an integer >= 1, got 2.5"),
])
def test_option_errors_name_the_option(options, message) -> None:
    with pytest.raises(InvalidOptionError) as caught:
        FPEConfig(**{"alpha": 2, **options})
    assert str(caught.value) == message


@pytest.mark.parametrize("groups, d, message", [
    (((0, 1, 2, 3),), 4, "--groups has 1 groups but alpha is 2: give at least alpha groups"),
    (((0, 1, 2, 3), ()), 4, "--groups contains an empty group; every group needs at least one input index"),
    (((0, 1), (2, 9)), 4, "--groups has index 9 outside 0..3"),
    (((0, 1), (2, 4)), 4, "--groups has index 4 outside 0..3"),
    (((0, 1), (2, -1)), 4, "--groups has index -1 outside 0..3"),
    (((0, 1), (1, 2), (3,)), 4, "--groups is not a partition: input 1 is in several groups"),
    (((0, 1), (2,)), 4, "--groups is not a partition: input 3 is in no group"),
    (((1, 2), (3,)), 4, "--groups is not a partition: input 0 is in no group"),
])
def test_group_errors_name_the_input(groups, d, message) -> None:
    with pytest.raises(InvalidOptionError) as caught:
        check_groups(groups, d, 2)
    assert str(caught.value) == message


def test_too_small_block_and_mismatched_layers_say_why() -> None:
    parts = [(np.array([1.0, 2.0], np.float32), 1), (np.array([3.0], np.float32), 2)]
    with pytest.raises(InvalidOptionError) as caught:
        smallest_by_count(parts, 5)
    assert str(caught.value) == (
        "cannot prune 5 weights from a block with only 4 nonzero candidates: the block is too small to absorb the "
        "copies at this alpha; lower --alpha (with --prune layer, try --prune global)")
    assert [c[0].size for c in smallest_by_count(parts, 4)] == [2, 1], "exactly the candidates: all go"
    w1, w2 = np.ones((4, 3), np.float32), np.ones((2, 5), np.float32)
    with pytest.raises(InvalidOptionError) as caught:
        expand_block(w1, None, w2, None, FPEConfig(alpha=2))
    assert str(caught.value) == "the output layer has 5 inputs but the input layer has 4 outputs"
    with pytest.raises(InvalidOptionError) as caught:
        expand_gated_block(np.ones((4, 6), np.float32), None, np.ones((4, 5), np.float32), None, w2, None, FPEConfig(alpha=2))
    assert str(caught.value) == "the up weight has shape [4, 5] but the gate weight [4, 6]"


@pytest.mark.parametrize("value", [3, np.int64(3), 3.0, np.float32(3.0)])
def test_alpha_is_normalised_to_int(value) -> None:
    assert type(FPEConfig(alpha=value).alpha) is int and FPEConfig(alpha=value).alpha == 3
    assert type(check_alpha(value)) is int and check_alpha(value) == 3
    with pytest.raises(InvalidOptionError, match=">= 4"):
        check_alpha(value, minimum=4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("bias", ["split", "copy"])
def test_expanded_weights_keep_the_dtype(dtype, bias) -> None:
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((5, 8)).astype(dtype), rng.standard_normal((3, 5)).astype(dtype)
    b1, b2 = rng.standard_normal(5).astype(dtype), rng.standard_normal(3).astype(dtype)
    exp = expand_block(w1, b1, w2, b2, FPEConfig(alpha=3, bias=bias))
    assert [a.dtype for a in (exp.w1, exp.b1, exp.w2, exp.b2)] == [np.dtype(dtype)] * 4


def test_counts_without_biases() -> None:
    rng = np.random.default_rng(1)
    w1, w2 = rng.standard_normal((5, 8)).astype(np.float32), rng.standard_normal((3, 5)).astype(np.float32)
    exp = expand_block(w1, None, w2, None, FPEConfig(alpha=2))
    assert exp.nnz_before == exp.nnz_after == block_nnz(w1, None, w2, None) == 55
    assert exp.b1 is None and exp.b2 is None


@pytest.mark.parametrize("split, alpha, dtype", [
    *[(split, alpha, dtype) for split in ("random", "shared", "blocks", "groups", "tiered")
      for alpha, dtype in ((2, np.uint8), (256, np.uint8), (257, np.uint16))],
    ("feature", 2, np.uint8), ("feature", 3, np.uint8),  # the clustering is quadratic in alpha: small ones only
])
def test_child_indices_are_stored_narrow_and_stay_exact(split, alpha, dtype) -> None:
    """The (H, D) child-index array is the largest thing a split builds: uint8 up to 256 children, then uint16;
    at the boundaries every child index still fits (each child of a 2*alpha-input neuron gets exactly two)."""
    d = 2 * alpha
    groups = tuple((j,) for j in range(d)) if split == "groups" else None
    w1 = np.random.default_rng(0).standard_normal((3, d)).astype(np.float32)
    a = np.asarray(split_neurons(w1, FPEConfig(alpha=alpha, split=split, groups=groups, seed=1)))
    assert a.dtype == dtype
    for row in a:
        assert np.bincount(row.astype(np.int64), minlength=alpha).tolist() == [2] * alpha


def test_more_than_65536_children_use_uint32() -> None:
    alpha = 65_537
    a = np.asarray(split_neurons(np.ones((2, alpha), np.float32), FPEConfig(alpha=alpha, split="random")))
    assert a.dtype == np.uint32 and all(sorted(row.tolist()) == list(range(alpha)) for row in a)


def test_feature_split_with_as_many_children_as_inputs() -> None:
    """alpha == D is allowed: every cluster starts from one feature, so each child reads one input."""
    w1 = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    a = np.asarray(split_neurons(w1, FPEConfig(alpha=4, split="feature", seed=0)))
    assert all(sorted(row.tolist()) == [0, 1, 2, 3] for row in a)


def test_blocks_split_with_fewer_inputs_than_children() -> None:
    """Child k reads input k; children beyond the inputs read nothing (their slices are empty)."""
    a = np.asarray(split_neurons(np.ones((2, 3), np.float32), FPEConfig(alpha=5, split="blocks")))
    assert a.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_feature_split_is_scale_invariant_per_feature() -> None:
    """|cos| of the columns: scaling a feature (a column of W1) by any positive factor changes nothing."""
    rng = np.random.default_rng(3)
    for seed in range(4):
        w1 = rng.standard_normal((9, 13)).astype(np.float32)
        scales = np.exp(rng.uniform(-3, 3, 13)).astype(np.float32)
        first = split_neurons(w1, FPEConfig(alpha=3, split="feature", seed=seed))
        np.testing.assert_array_equal(first, split_neurons(w1 * scales, FPEConfig(alpha=3, split="feature", seed=seed)))


def test_feature_split_stays_balanced_when_features_are_alike() -> None:
    """Balanced whatever the geometry: 11 features along one direction, 2 others, 3 clusters of 4 or 5."""
    rng = np.random.default_rng(4)
    w1 = np.repeat(rng.standard_normal((6, 1)), 13, axis=1) + 0.01 * rng.standard_normal((6, 13))
    w1[:, [3, 9]] = rng.standard_normal((6, 2))
    for seed in range(4):
        labels = np.asarray(split_neurons(w1.astype(np.float32), FPEConfig(alpha=3, split="feature", seed=seed))[0])
        assert sorted(np.bincount(labels.astype(np.int64), minlength=3).tolist()) == [4, 4, 5]


def test_gated_feature_split_clusters_by_gate_and_up_rows() -> None:
    """docs/methods.md 1.4b: the features are clustered by the gate and up rows together. Here the up rows
    carry the clusters and the gate rows are faint noise: the clusters must come out whole."""
    rng = np.random.default_rng(5)
    h, d, alpha = 8, 12, 4
    perm = rng.permutation(d)
    clusters = [perm[3 * c : 3 * c + 3] for c in range(alpha)]
    wu = np.zeros((h, d), np.float32)
    for c, cols in enumerate(clusters):
        wu[2 * c : 2 * c + 2, cols] = rng.uniform(0.5, 1.5, (2, 3))
    wg = (1e-3 * rng.standard_normal((h, d))).astype(np.float32)
    wd = rng.standard_normal((3, h)).astype(np.float32)
    for seed in range(3):
        exp = expand_gated_block(wg, None, wu, None, wd, None, FPEConfig(alpha=alpha, split="feature", seed=seed))
        labels = np.asarray(exp.assignment[0])
        assert all(len({int(labels[j]) for j in cols}) == 1 for cols in clusters), (seed, labels, clusters)


def test_structured_split_keeps_one_partition_splits_and_refuses_the_rest() -> None:
    from neurorewrite.fpe import structured_split

    assert structured_split("random") == "blocks", "the default random split becomes contiguous blocks"
    assert [structured_split(s) for s in ("blocks", "shared", "feature")] == ["blocks", "shared", "feature"]
    with pytest.raises(InvalidOptionError) as caught:
        structured_split("groups")
    assert str(caught.value) == ("--structured needs one input partition for all neurons (split blocks, shared, feature), "
                                 "got 'groups'")
    with pytest.raises(InvalidOptionError, match="^fpe_expand.structured needs one input partition"):
        structured_split("groups", where="fpe_expand.structured")


def test_65536_children_still_fit_uint16() -> None:
    a = np.asarray(split_neurons(np.ones((1, 65_536), np.float32), FPEConfig(alpha=65_536, split="random")))
    assert a.dtype == np.uint16 and sorted(a[0].tolist()) == list(range(65_536))


def test_feature_split_of_a_single_neuron() -> None:
    a = np.asarray(split_neurons(np.random.default_rng(0).standard_normal((1, 6)).astype(np.float32),
                                 FPEConfig(alpha=2, split="feature")))
    assert a.shape == (1, 6) and np.bincount(a[0].astype(np.int64)).tolist() == [3, 3]


def test_dead_input_features_do_not_disturb_the_clustering() -> None:
    """An all-zero column (an input no neuron reads) has no direction: it must not poison the clusters."""
    rng = np.random.default_rng(6)
    perm = rng.permutation(12)
    clusters = [perm[3 * c : 3 * c + 3] for c in range(4)]
    w1 = np.zeros((8, 13), np.float32)  # column 12 stays zero
    for c, cols in enumerate(clusters):
        w1[2 * c : 2 * c + 2, cols] = rng.uniform(0.5, 1.5, (2, 3))
    for seed in range(4):
        labels = np.asarray(split_neurons(w1, FPEConfig(alpha=4, split="feature", seed=seed))[0])
        assert all(len({int(labels[j]) for j in cols}) == 1 for cols in clusters), (seed, labels)
        assert sorted(np.bincount(labels.astype(np.int64), minlength=4).tolist()) == [3, 3, 3, 4]


def test_block_seeds_are_pinned_and_independent() -> None:
    """docs/methods.md 1.1: block p of a model is seeded with block_seed(seed, p). The values are pinned:
    changing them would change every expansion ever made with a given seed (and the torch side's match)."""
    from neurorewrite.fpe import block_seed

    assert [block_seed(0, 0), block_seed(0, 1), block_seed(7, 2)] == [2968811710, 3964924996, 1009178997]
    seeds = {block_seed(s, p) for s in range(4) for p in range(4)}
    assert len(seeds) == 16 and all(type(x) is int for x in seeds)
