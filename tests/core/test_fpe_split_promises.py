"""The split rules as docs/methods.md 1.1 states them: ``feature`` ignores the sign of a feature,
``groups`` deals each group to the child with the fewest inputs so far (ties to the lowest child)."""

from __future__ import annotations

import numpy as np
import pytest

from neurorewrite.fpe import FPEConfig, split_neurons


def feature_labels(w1: np.ndarray, alpha: int, seed: int) -> np.ndarray:
    a = split_neurons(w1, FPEConfig(alpha=alpha, split="feature", seed=seed))
    assert (a == a[0]).all(), "the feature split is one partition for all neurons"
    return np.asarray(a[0])


@pytest.mark.parametrize("seed", range(5))
def test_feature_split_does_not_depend_on_the_sign_of_a_feature(seed) -> None:
    """|cos| of the W1 columns: flipping the sign of any input feature (a column of W1) leaves the clusters."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((10, 14)).astype(np.float32)
    flips = np.where(rng.random(14) < 0.5, -1.0, 1.0).astype(np.float32)
    np.testing.assert_array_equal(feature_labels(w1, 3, seed), feature_labels(w1 * flips, 3, seed))


def test_feature_split_keeps_a_feature_with_its_negated_twin() -> None:
    """Clusters of features used by the same neurons, some of them negatively: each cluster, signs mixed,
    goes to one child (a signed cosine would put a negated column as far away as possible)."""
    rng = np.random.default_rng(0)
    w1 = np.zeros((8, 12), np.float32)
    perm = rng.permutation(12)  # clusters scattered over the inputs, so no order-based labelling finds them
    clusters = [perm[3 * c : 3 * c + 3] for c in range(4)]
    base = rng.uniform(0.5, 1.5, (2, 1)).astype(np.float32)
    for c, cols in enumerate(clusters):
        for j, sign in zip(cols, (1.0, -1.0, 1.0) if c % 2 else (-1.0, 1.0, -1.0)):
            w1[2 * c : 2 * c + 2, j] = sign * base[:, 0] * rng.uniform(0.9, 1.1)
    for seed in range(4):
        labels = feature_labels(w1, 4, seed)
        for cols in clusters:
            assert len({int(labels[j]) for j in cols}) == 1, (seed, labels)
        assert len({int(labels[cols[0]]) for cols in clusters}) == 4


def group_loads(assignment: np.ndarray, groups, alpha: int) -> np.ndarray:
    """Inputs per child, per neuron, after checking each group went whole to one child."""
    loads = np.zeros((assignment.shape[0], alpha), np.int64)
    for g in groups:
        child = assignment[:, list(g)]
        assert (child == child[:, :1]).all(), "a group was split between children"
        np.add.at(loads, (np.arange(assignment.shape[0]), child[:, 0].astype(np.int64)), len(g))
    return loads


def test_groups_of_one_input_are_dealt_round_robin_from_the_lowest_child() -> None:
    """Equal groups dealt to the least loaded child (ties to the lowest index) fill the children in turn,
    whatever the random order: 7 inputs over 3 children give child 0 three, the others two."""
    groups = tuple((j,) for j in range(7))
    a = split_neurons(np.ones((24, 7), np.float32), FPEConfig(alpha=3, split="groups", groups=groups, seed=4))
    assert group_loads(np.asarray(a), groups, 3).tolist() == [[3, 2, 2]] * 24
    assert len({tuple(r) for r in np.asarray(a)}) > 1, "the order of the groups is random per neuron"


@pytest.mark.parametrize("seed", range(4))
def test_groups_are_dealt_to_the_least_loaded_child(seed) -> None:
    """Greedy dealing to the least loaded child bounds the imbalance by the largest group and leaves no
    child empty (there are at least alpha groups); dealing to a random child breaks both on many neurons."""
    rng = np.random.default_rng(seed)
    sizes = [5, 4, 3, 2, 2, 1, 1, 1, 1]
    perm = rng.permutation(sum(sizes))
    groups, start = [], 0
    for s in sizes:
        groups.append(tuple(int(j) for j in perm[start : start + s]))
        start += s
    for alpha in (2, 3, 4):
        a = split_neurons(np.ones((40, sum(sizes)), np.float32),
                          FPEConfig(alpha=alpha, split="groups", groups=tuple(groups), seed=seed))
        loads = group_loads(np.asarray(a), groups, alpha)
        assert (loads.min(axis=1) > 0).all(), "a child got no group"
        assert (loads.max(axis=1) - loads.min(axis=1) <= max(sizes)).all(), loads
