"""``cluster_features`` (the ``feature`` split) on small crafted layers: features on one line (up to sign
and scale) share a cluster, exact ties are broken in one machine-independent order, the balanced
k-means stops once an assignment repeats, and too large an alpha is refused naming the option."""

from __future__ import annotations

import numpy as np
import pytest

from neurorewrite.errors import InvalidOptionError
from neurorewrite.fpe import balanced_labels, cluster_features
from neurorewrite.fpe import split as split_module
from tests.core.argsort_spy import record_argsort_sizes


def partition(labels: np.ndarray) -> list[tuple[int, ...]]:
    """The clusters as sorted tuples of features: children are interchangeable, so names do not matter."""
    return sorted(tuple(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels))


def columns(*cols) -> np.ndarray:
    """A W1 (neurons x features) from its feature columns."""
    return np.array(cols, np.float64).T


# (W1, the clusters): a feature, its negation and its multiples are one feature for |cos|; the features
# left over are orthogonal to them or dead (all zero), so only the line can be a cluster of its own
LINES = [
    (columns((0, 1), (1, 0), (-1, -1), (1, 1), (-2, -2)), [(0, 1), (2, 3, 4)]),
    (columns((0, 1), (-1, 0), (0, 0), (3, 0)), [(0, 2), (1, 3)]),
    (columns((1, -1), (1, 1), (-0.5, 0.5), (0, -1)), [(0, 2), (1, 3)]),
]


@pytest.mark.parametrize("w1, clusters", LINES)
@pytest.mark.parametrize("seed", range(4))
def test_features_on_one_line_share_a_cluster(w1, clusters, seed) -> None:
    """Centres are the normalised, sign-aligned sums of their members (each member once) and scores are
    |cos| to them: whichever features start the clusters, the collinear ones end up together."""
    assert partition(cluster_features(w1, 2, np.random.default_rng(seed))) == clusters


def dealt_in_index_order(w1: np.ndarray, alpha: int, starts: np.ndarray) -> np.ndarray:
    """Each live starting feature in its own cluster; every other feature, in index order, to the lowest
    cluster with room left (cluster sizes as ``balanced_labels``)."""
    d = w1.shape[1]
    labels = np.full(d, -1)
    room = np.bincount(balanced_labels(d, alpha), minlength=alpha)
    for c, j in enumerate(starts):
        if w1[:, j].any():
            labels[j], room[c] = c, room[c] - 1
    for j in np.flatnonzero(labels < 0):
        c = int(np.flatnonzero(room > 0)[0])
        labels[j], room[c] = c, room[c] - 1
    return labels


@pytest.mark.parametrize("seed", range(8))
def test_exact_ties_go_in_index_order_to_the_lowest_cluster(seed) -> None:
    """Orthogonal and dead features tie at |cos| 0 with every centre but their own: the stable order
    (by feature, then cluster) deals them in index order, the same partition on every machine; a cluster
    left with dead features only keeps its centre rather than turning it into NaN."""
    rng = np.random.default_rng(100 + seed)
    live = [3, 5, 6, 7]  # dead features first: a cluster may hold nothing else
    w1 = np.zeros((4, 8))
    w1[np.arange(4), live] = rng.choice([-1.0, 1.0], 4) * rng.uniform(0.5, 2.0, 4)
    starts = np.random.default_rng(seed).choice(8, size=3, replace=False)  # the seed picks the starting features
    labels = cluster_features(w1, 3, np.random.default_rng(seed))
    np.testing.assert_array_equal(labels, dealt_in_index_order(w1, 3, starts))


def test_the_clustering_stops_once_an_assignment_repeats(monkeypatch) -> None:
    """Balanced k-means to a fixed point: clearly separated clusters settle in a few rounds (one sort of
    the scores each) and the remaining ``iters`` rounds are not run."""
    rng = np.random.default_rng(3)
    w1 = np.kron(np.eye(3), np.ones((4, 3))) * rng.uniform(0.8, 1.2, (12, 9))  # three blocks of three features
    sorts = record_argsort_sizes(monkeypatch, split_module)  # one entry per round's sort
    labels = cluster_features(w1, 3, np.random.default_rng(0), iters=20)
    assert partition(labels) == [(0, 1, 2), (3, 4, 5), (6, 7, 8)]
    assert len(sorts) <= 4, f"{len(sorts)} rounds for three separated clusters"


def test_alpha_above_the_feature_count_names_the_options() -> None:
    with pytest.raises(InvalidOptionError) as caught:
        cluster_features(np.ones((2, 3)), 4, np.random.default_rng(0))
    assert str(caught.value) == "--split feature needs --alpha <= the block's 3 input features, got 4"


def test_the_centres_move_even_when_the_first_assignment_is_the_round_robin_one() -> None:
    """Two identical features belong together. Here the first assignment, from random centres, happens to
    be 0, 1, 0, 1: a clustering that took it for converged (it compared with a round-robin start instead
    of a previous assignment) returned it without ever moving the centres."""
    w1 = np.array([[-1.0, -1.0, 0.0, 0.0], [-1.0, -1.0, -1.0, 0.0]])
    assert partition(cluster_features(w1, 2, np.random.default_rng(0))) == [(0, 1), (2, 3)]
