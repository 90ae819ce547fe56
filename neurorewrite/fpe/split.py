"""Split strategies: which child of each parent neuron keeps each input weight."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from neurorewrite.errors import InvalidOptionError
from neurorewrite.fpe.config import FPEConfig


def _child_dtype(alpha: int) -> type:
    return np.uint8 if alpha <= 256 else np.uint16 if alpha <= 65536 else np.uint32


def balanced_labels(n: int, alpha: int, dtype: type = np.int64) -> np.ndarray:
    """``[0, 1, ..., alpha-1, 0, 1, ...]`` of length n: group sizes differ by at most one."""
    return (np.arange(n) % alpha).astype(dtype)


def split_random(h: int, d: int, alpha: int, rng: np.random.Generator) -> np.ndarray:
    """An independent random balanced partition of the ``d`` inputs for each of ``h`` neurons."""
    base = np.tile(balanced_labels(d, alpha, _child_dtype(alpha)), (h, 1))
    return rng.permuted(base, axis=1)


def split_shared(h: int, d: int, alpha: int, rng: np.random.Generator) -> np.ndarray:
    """One random balanced partition used by every neuron: W1' becomes ``alpha`` dense blocks."""
    row = np.empty(d, dtype=_child_dtype(alpha))
    row[rng.permutation(d)] = balanced_labels(d, alpha, row.dtype)
    return np.broadcast_to(row, (h, d))


def split_blocks(h: int, d: int, alpha: int) -> np.ndarray:
    """One contiguous partition used by every neuron: child ``k`` reads the ``k``-th block of inputs
    (blocks differ in size by at most one). Like ``shared``, but the children's inputs are slices."""
    row = np.repeat(np.arange(alpha), np.bincount(balanced_labels(d, alpha), minlength=alpha)).astype(_child_dtype(alpha))
    return np.broadcast_to(row, (h, d))


def cluster_features(w1: np.ndarray, alpha: int, rng: np.random.Generator, iters: int = 20) -> np.ndarray:
    """Balanced clustering of the input features (columns of W1) by the Gram matrix ``W1^T W1``.

    Features are compared by ``|cos|`` of their weight columns, which is the normalised Gram entry;
    the sign is ignored because a neuron that uses a feature negatively still mixes it in. Each of the
    ``alpha`` clusters gets ``d // alpha`` or ``d // alpha + 1`` features (greedy balanced k-means).
    """
    d = w1.shape[1]
    if alpha > d:  # every cluster needs a feature to start from
        raise InvalidOptionError(f"--split feature needs --alpha <= the block's {d} input features, got {alpha}")
    cols = w1.astype(np.float64, copy=False)
    norms = np.linalg.norm(cols, axis=0)
    unit = cols / np.where(norms > 0, norms, 1.0)
    capacity = np.bincount(balanced_labels(d, alpha), minlength=alpha)
    centers = unit[:, rng.choice(d, size=alpha, replace=False)]
    labels = np.full(d, -1, dtype=np.int64)  # no assignment yet: the first one always moves the centres
    for _ in range(max(iters, 1)):
        score = np.abs(unit.T @ centers)  # (d, alpha)
        order = np.argsort(-score, axis=None, kind="stable")
        new = np.full(d, -1, dtype=np.int64)
        room = capacity.copy()
        for flat in order:
            j, c = divmod(int(flat), alpha)
            if new[j] < 0 and room[c] > 0:
                new[j] = c
                room[c] -= 1
        if np.array_equal(new, labels):
            break
        labels = new
        for c in range(alpha):
            members = unit[:, labels == c]
            signs = np.sign(members.T @ centers[:, c])
            signs[signs == 0] = 1.0
            center = members @ signs
            n = np.linalg.norm(center)
            if n > 0:
                centers[:, c] = center / n
    return labels


def split_feature(w1: np.ndarray, alpha: int, rng: np.random.Generator) -> np.ndarray:
    """Every neuron sends each feature cluster to one child, so clusters that interfere separate.

    The clustering is global (one per layer), so all neurons share the partition; children of a parent
    are interchangeable, so a per-neuron relabelling of clusters would compute the same function.
    """
    labels = cluster_features(w1, alpha, rng).astype(_child_dtype(alpha))
    return np.broadcast_to(labels, w1.shape)


def tier_sizes(d: int, alpha: int, lead_share: float | None = None) -> np.ndarray:
    """How many of a neuron's ``d`` inputs each child of the ``tiered`` split takes, child 0 first.

    Balanced (sizes differ by at most one) without ``lead_share`` or with ``lead_share == 1 / alpha``; else
    child 0 (the lead) takes ``round(lead_share * d)`` inputs and the other children share the rest in
    balanced tiers. Every child keeps at least one input where ``d >= alpha``."""
    if lead_share is None or alpha == 1 or abs(lead_share * alpha - 1.0) < 1e-9:
        return np.bincount(balanced_labels(d, alpha), minlength=alpha)
    lead = int(round(lead_share * d))
    lead = min(max(lead, 1), d - (alpha - 1)) if d >= alpha else min(lead, d)
    return np.concatenate([[lead], np.bincount(balanced_labels(d - lead, alpha - 1), minlength=alpha - 1)])


def split_tiered(w1: np.ndarray, alpha: int, input_scale: np.ndarray | None = None,
                 lead_share: float | None = None) -> np.ndarray:
    """Every neuron ranks its inputs by the size of their term, ``|W1[i, j]| * input_scale[j]``, and
    deals them out in tiers: child 0 takes the largest ``D / alpha``, child 1 the next, and so on;
    with ``lead_share`` child 0 takes that share of the inputs, the largest, and the others the rest in
    balanced tiers (:func:`tier_sizes`).

    ``input_scale`` is a typical size of each input on real data (``rms(x_j)`` on a sample; none: all
    ones, the weights' magnitudes alone). So child 0 carries most of its parent's pre-activation and
    its activation stays close to the parent's, which a post-hoc refit of ``W2'`` builds on: on
    all-MiniLM-L6-v2 it cuts the refit's held-out error by a fifth against ``random`` (``docs/methods.md``
    1.3c). Ties go to the lower input index. ``w1`` may stack several rows per neuron's inputs (a gated
    block's gate and up rows): pass their root-sum-square magnitudes.
    """
    h, d = w1.shape
    scale = None if input_scale is None else np.asarray(input_scale, np.float64)[None, :]
    sizes = tier_sizes(d, alpha, lead_share)
    tier_of_rank = np.searchsorted(np.cumsum(sizes), np.arange(d), side="right").astype(_child_dtype(alpha))
    out = np.empty((h, d), dtype=tier_of_rank.dtype)
    for lo in range(0, h, 1024):  # in strips of rows: the sort's index arrays are 8 bytes per weight
        score = np.abs(w1[lo : lo + 1024]).astype(np.float64)
        if scale is not None:
            score *= scale
        order = np.argsort(-score, axis=1, kind="stable")
        np.put_along_axis(out[lo : lo + 1024], order, tier_of_rank[None, :], axis=1)
    return out


def check_groups(groups: Sequence[Sequence[int]], d: int, alpha: int) -> list[np.ndarray]:
    """Validate that ``groups`` partitions ``range(d)`` into at least ``alpha`` non-empty groups."""
    out = [np.asarray(list(g), dtype=np.int64) for g in groups]
    if len(out) < alpha:
        raise InvalidOptionError(f"--groups has {len(out)} groups but alpha is {alpha}: give at least alpha groups")
    if any(g.size == 0 for g in out):
        raise InvalidOptionError("--groups contains an empty group; every group needs at least one input index")
    flat = np.concatenate(out)
    if flat.min() < 0 or flat.max() >= d:
        raise InvalidOptionError(f"--groups has index {int(flat.max()) if flat.max() >= d else int(flat.min())} outside 0..{d - 1}")
    counts = np.bincount(flat, minlength=d)
    if (counts > 1).any():
        raise InvalidOptionError(f"--groups is not a partition: input {int(np.argmax(counts > 1))} is in several groups")
    if (counts == 0).any():
        raise InvalidOptionError(f"--groups is not a partition: input {int(np.argmax(counts == 0))} is in no group")
    return out


def split_groups(h: int, d: int, alpha: int, groups: Sequence[Sequence[int]], rng: np.random.Generator) -> np.ndarray:
    """Each user group goes whole to one child; per neuron, groups are dealt to children in a random
    order, each to the child with the fewest inputs so far (ties to the lowest child index)."""
    parts = check_groups(groups, d, alpha)
    sizes = np.array([p.size for p in parts])
    group_child = np.empty((h, len(parts)), dtype=np.int64)
    for i in range(h):
        load = np.zeros(alpha, dtype=np.int64)
        for g in rng.permutation(len(parts)):
            c = int(np.argmin(load))
            group_child[i, g] = c
            load[c] += sizes[g]
    feature_group = np.empty(d, dtype=np.int64)
    for g, p in enumerate(parts):
        feature_group[p] = g
    return group_child[:, feature_group].astype(_child_dtype(alpha))


def split_neurons(w1: np.ndarray, cfg: FPEConfig, features: np.ndarray | None = None,
                  input_scale: np.ndarray | None = None) -> np.ndarray:
    """The ``(H, D)`` child index of every input weight: row ``i`` partitions ``range(D)`` into
    ``alpha`` disjoint, covering subsets.

    ``features`` (any number of rows over the same ``D`` inputs, default ``w1``) are the weights the
    ``feature`` split clusters the inputs by: a gated block passes its gate and up rows together.
    ``input_scale`` (``(D,)``, the inputs' rms on a sample) weighs the ``tiered`` split's ranking.
    """
    h, d = w1.shape
    rng = np.random.default_rng(cfg.seed)
    if cfg.alpha == 1:
        return np.zeros((h, d), dtype=np.uint8)
    if cfg.split == "random":
        return split_random(h, d, cfg.alpha, rng)
    if cfg.split == "shared":
        return split_shared(h, d, cfg.alpha, rng)
    if cfg.split == "blocks":
        return split_blocks(h, d, cfg.alpha)
    if cfg.split == "feature":
        labels = split_feature(w1 if features is None else features, cfg.alpha, rng)[0]
        return np.broadcast_to(labels, (h, d))
    if cfg.split == "tiered":
        magnitude = w1 if features is None else np.sqrt((features.reshape(-1, h, d).astype(np.float64) ** 2).sum(axis=0))
        return split_tiered(magnitude, cfg.alpha, input_scale, cfg.lead_share)
    assert cfg.groups is not None  # FPEConfig guarantees it
    return split_groups(h, d, cfg.alpha, cfg.groups, rng)
