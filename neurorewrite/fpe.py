"""The FPE math on numpy arrays: split neurons, copy outgoing columns, prune to the exact count.

This module is the one implementation of Fixed Parameter Expansion. The ONNX pass
(:mod:`neurorewrite.passes.expand`) and the torch side (:mod:`neurorewrite.models.fpe`) both call
:func:`expand_block`, so the same seed and options give the same expansion in both.

Notation follows ``shared/METHODS.md``: a block is ``h = act(W1 x + b1)``, ``y = W2 h + b2`` with
``W1`` of shape ``(H, D)`` and ``W2`` of shape ``(O, H)``. Expanding with ``alpha`` gives ``alpha * H``
children; child ``k`` of parent ``i`` is hidden unit ``i * alpha + k`` (children of one parent are
contiguous).

Counting rule: the nonzero count of a block is ``nnz(W1) + nnz(b1) + nnz(W2) + nnz(b2)``. Splitting
keeps ``nnz(W1)``; copying adds ``(alpha - 1) * (nnz(W2) + nnz(b1))`` (output columns and, for both
bias modes, hidden biases); pruning removes exactly that many weights, so the count after equals the
count before, ties included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from neurorewrite.errors import InvalidOptionError

SPLITS = ("random", "feature", "groups", "shared")
BIAS_MODES = ("copy", "split")
PRUNE_MODES = ("global", "layer")


def check_alpha(alpha: object, minimum: int = 1) -> int:
    """Return ``alpha`` as an int, or raise if it is not an integer >= ``minimum``."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, np.integer)):
        if isinstance(alpha, (float, np.floating)) and float(alpha).is_integer():
            alpha = int(alpha)
        else:
            raise InvalidOptionError(f"--alpha must be an integer >= {minimum}, got {alpha!r}")
    if int(alpha) < minimum:
        raise InvalidOptionError(f"--alpha must be an integer >= {minimum}, got {alpha}")
    return int(alpha)


@dataclass(frozen=True)
class FPEConfig:
    """Options of one expansion. ``groups`` is only read by ``split="groups"``."""

    alpha: int
    split: str = "random"
    seed: int = 0
    bias: str = "split"
    prune: str = "global"
    groups: tuple[tuple[int, ...], ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        for name, value, allowed in (
            ("split", self.split, SPLITS),
            ("bias", self.bias, BIAS_MODES),
            ("prune", self.prune, PRUNE_MODES),
        ):
            if value not in allowed:
                raise InvalidOptionError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.split == "groups" and self.groups is None:
            raise InvalidOptionError("--split groups needs a partition: pass --groups FILE.json")


@dataclass(frozen=True)
class BlockExpansion:
    """The expanded weights of one block. Pruned entries are exact zeros."""

    w1: np.ndarray  # (alpha*H, D)
    b1: np.ndarray | None  # (alpha*H,)
    w2: np.ndarray  # (O, alpha*H)
    b2: np.ndarray | None  # (O,), unchanged
    assignment: np.ndarray  # (H, D) child index of every input weight of every parent
    nnz_before: int
    nnz_after: int

    @property
    def alpha(self) -> int:
        return self.w1.shape[0] // self.assignment.shape[0]

    @property
    def mask1(self) -> np.ndarray:
        return self.w1 != 0

    @property
    def mask2(self) -> np.ndarray:
        return self.w2 != 0


def block_seed(seed: int, position: int) -> int:
    """The seed of the ``position``-th expanded block of a model: blocks get independent streams,
    and the ONNX pass and the torch module derive them the same way."""
    return int(np.random.SeedSequence((seed, position)).generate_state(1)[0])


def block_nnz(w1: np.ndarray, b1: np.ndarray | None, w2: np.ndarray, b2: np.ndarray | None) -> int:
    """Nonzero count of a block under the module's counting rule."""
    return sum(int(np.count_nonzero(a)) for a in (w1, b1, w2, b2) if a is not None)


# --- splitting -----------------------------------------------------------------------------------


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


def cluster_features(w1: np.ndarray, alpha: int, rng: np.random.Generator, iters: int = 20) -> np.ndarray:
    """Balanced clustering of the input features (columns of W1) by the Gram matrix ``W1^T W1``.

    Features are compared by ``|cos|`` of their weight columns, which is the normalised Gram entry;
    the sign is ignored because a neuron that uses a feature negatively still mixes it in. Each of the
    ``alpha`` clusters gets ``d // alpha`` or ``d // alpha + 1`` features (greedy balanced k-means).
    """
    d = w1.shape[1]
    cols = w1.astype(np.float64, copy=False)
    norms = np.linalg.norm(cols, axis=0)
    unit = cols / np.where(norms > 0, norms, 1.0)
    capacity = np.bincount(balanced_labels(d, alpha), minlength=alpha)
    centers = unit[:, rng.choice(d, size=alpha, replace=False)]
    labels = balanced_labels(d, alpha)
    for _ in range(iters):
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


def split_neurons(w1: np.ndarray, cfg: FPEConfig) -> np.ndarray:
    """The ``(H, D)`` child index of every input weight: row ``i`` partitions ``range(D)`` into
    ``alpha`` disjoint, covering subsets."""
    h, d = w1.shape
    rng = np.random.default_rng(cfg.seed)
    if cfg.alpha == 1:
        return np.zeros((h, d), dtype=np.uint8)
    if cfg.split == "random":
        return split_random(h, d, cfg.alpha, rng)
    if cfg.split == "shared":
        return split_shared(h, d, cfg.alpha, rng)
    if cfg.split == "feature":
        return split_feature(w1, cfg.alpha, rng)
    assert cfg.groups is not None  # FPEConfig guarantees it
    return split_groups(h, d, cfg.alpha, cfg.groups, rng)


def scatter_children(w1: np.ndarray, assignment: np.ndarray, alpha: int) -> np.ndarray:
    """W1' of shape ``(alpha*H, D)``: child ``k`` of parent ``i`` keeps ``W1[i, assignment[i] == k]``."""
    h, d = w1.shape
    out = np.zeros((h, alpha, d), dtype=w1.dtype)
    rows = np.arange(h)[:, None]
    cols = np.arange(d)[None, :]
    out[rows, assignment, cols] = w1
    return out.reshape(h * alpha, d)


def copy_outputs(w2: np.ndarray, alpha: int) -> np.ndarray:
    """W2' of shape ``(O, alpha*H)``: every child inherits its parent's outgoing column."""
    return np.repeat(w2, alpha, axis=1)


def expand_bias(b1: np.ndarray | None, alpha: int, mode: str) -> np.ndarray | None:
    if b1 is None:
        return None
    out = np.repeat(b1, alpha)
    return out / np.asarray(alpha, dtype=b1.dtype) if mode == "split" else out


# --- pruning -------------------------------------------------------------------------------------


Cut = tuple[np.ndarray, int, int]  # (indices removed whole, index of a partly removed entry or -1, its copies)


def _count_le(parts: Sequence[tuple[np.ndarray, int]], v: float) -> int:
    return sum(int(np.count_nonzero(m <= v)) * mult for m, mult in parts)


def kth_weighted_value(parts: Sequence[tuple[np.ndarray, int]], k: int, sample_size: int = 20_000) -> np.floating:
    """The smallest value ``t`` with at least ``k`` entries ``<= t`` (entries counted with multiplicity).

    A strided sample brackets ``t`` between two values whose counts are checked exactly; only the
    entries inside the bracket (a few percent) are sorted. Exact whatever the sample: the bracket widens
    until the checks pass.
    """
    n = sum(m.size for m, _ in parts)
    step = max(1, n // sample_size)
    s_vals = np.concatenate([m[::step] for m, _ in parts])
    s_mult = np.concatenate([np.full(m[::step].size, mult * step, np.int64) for m, mult in parts])
    order = np.argsort(s_vals, kind="stable")
    s_sorted, s_cum = s_vals[order], np.cumsum(s_mult[order])
    margin = 0.02
    while True:
        lo_i = int(np.searchsorted(s_cum, k * (1 - margin), side="left")) - 1
        hi_i = int(np.searchsorted(s_cum, k * (1 + margin), side="left"))
        lo = s_sorted[lo_i] if lo_i >= 0 else None
        hi = s_sorted[hi_i] if hi_i < s_sorted.size else None
        below = 0 if lo is None else _count_le(parts, lo)
        if below < k and (hi is None or _count_le(parts, hi) >= k):
            break
        margin *= 4
    inside = [(m[(m > lo) if lo is not None else slice(None)], mult) for m, mult in parts]
    if hi is not None:
        inside = [(m[m <= hi], mult) for m, mult in inside]
    vals = np.concatenate([m for m, _ in inside])
    mults = np.concatenate([np.full(m.size, mult, np.int64) for m, mult in inside])
    order = np.argsort(vals, kind="stable")
    cum = below + np.cumsum(mults[order])
    return vals[order][int(np.searchsorted(cum, k, side="left"))]


def smallest_by_count(parts: Sequence[tuple[np.ndarray, int]], k: int) -> list[Cut]:
    """Choose the ``k`` smallest entries of a multiset given as parts ``(magnitudes, multiplicity)``.

    The order is by magnitude; ties go by part, then by position within the part, exactly as a stable
    sort of the concatenated parts would order them. Returns one :data:`Cut` per part. No array of the
    expanded size is built, and nothing of the original size is sorted (see :func:`kth_weighted_value`).
    """
    if k == 0:
        return [(np.empty(0, dtype=np.int64), -1, 0) for _ in parts]
    available = sum(m.size * mult for m, mult in parts)
    if available < k:
        raise InvalidOptionError(
            f"cannot prune {k} weights from a block with only {available} candidates: "
            "the block is too small for this alpha; lower --alpha or use --prune global"
        )
    t = kth_weighted_value(parts, k)
    remaining = k - sum(int(np.count_nonzero(m < t)) * mult for m, mult in parts)
    cuts: list[Cut] = []
    for m, mult in parts:
        ties = np.flatnonzero(m == t)
        n_full = min(ties.size, remaining // mult)
        remaining -= n_full * mult
        last, copies = -1, 0
        if 0 < remaining < mult and n_full < ties.size:
            last, copies, remaining = int(ties[n_full]), remaining, 0
        cuts.append((np.concatenate([np.flatnonzero(m < t), ties[:n_full]]), last, copies))
    return cuts


def choose_pruned(
    w1: np.ndarray, w2: np.ndarray, alpha: int, excess_w1: int, excess_w2: int, mode: str
) -> tuple[np.ndarray, Cut]:
    """Which weights FPE prunes, chosen on the original matrices.

    Returns the flat indices into W1 whose (single) child copy goes, and a :data:`Cut` of flat W2
    indices whose ``alpha`` copies go (whole, or the first ``copies`` children of one entry). A W2 entry
    stands for its ``alpha`` equal copies, so nothing of the expanded size is sorted. ``global``
    removes the smallest magnitudes over both layers at once (the paper's rule; at equal magnitude W1'
    goes first); ``layer`` removes ``excess_w1`` from W1' and ``excess_w2`` from W2' separately, so each
    layer keeps its own count.
    """
    i1 = np.flatnonzero(w1)
    i2 = np.flatnonzero(w2)
    m1 = np.abs(w1.ravel()[i1])
    m2 = np.abs(w2.ravel()[i2]).astype(m1.dtype, copy=False)
    if mode == "global":
        cut1, cut2 = smallest_by_count([(m1, 1), (m2, alpha)], excess_w1 + excess_w2)
    else:
        (cut1,) = smallest_by_count([(m1, 1)], excess_w1)
        (cut2,) = smallest_by_count([(m2, alpha)], excess_w2)
    whole1, last1, _ = cut1  # multiplicity 1: a partly cut entry is cut whole
    whole2, last2, copies2 = cut2
    flat1 = i1[whole1 if last1 < 0 else np.append(whole1, last1)]
    return flat1, (i2[whole2], int(i2[last2]) if last2 >= 0 else -1, copies2)


def expand_block(
    w1: np.ndarray,
    b1: np.ndarray | None,
    w2: np.ndarray,
    b2: np.ndarray | None,
    cfg: FPEConfig,
) -> BlockExpansion:
    """Split every hidden neuron into ``cfg.alpha`` children and prune back to the original count.

    Invariants: each row of ``assignment`` partitions ``range(D)``; ``nnz_after == nnz_before``.
    The inputs are not modified.
    """
    h, d = w1.shape
    if w2.shape[1] != h:
        raise InvalidOptionError(f"W2 has {w2.shape[1]} inputs but W1 has {h} outputs")
    alpha = cfg.alpha
    assignment = split_neurons(w1, cfg)
    b1e = expand_bias(b1, alpha, cfg.bias)
    nb1 = 0 if b1 is None else int(np.count_nonzero(b1))
    excess_w2 = (alpha - 1) * int(np.count_nonzero(w2))
    excess_w1 = (alpha - 1) * nb1
    if cfg.bias == "split" and b1 is not None:
        # b/alpha can underflow to zero for subnormal biases; count what is really there
        excess_w1 = int(np.count_nonzero(b1e)) - nb1
    cut1, (whole2, last2, copies2) = choose_pruned(w1, w2, alpha, excess_w1, excess_w2, cfg.prune)
    kept1 = w1.copy()
    kept1.ravel()[cut1] = 0
    w1e = scatter_children(kept1, assignment, alpha)
    kept2 = w2.copy()
    kept2.ravel()[whole2] = 0
    w2e = copy_outputs(kept2, alpha)
    if last2 >= 0:  # the lowest-numbered children of the last entry lose their copies
        o, i = divmod(last2, h)
        w2e[o, i * alpha : i * alpha + copies2] = 0
    before = block_nnz(w1, b1, w2, b2)
    after = block_nnz(w1e, b1e, w2e, b2)
    if after != before:
        raise AssertionError(f"FPE count invariant broken: {before} -> {after}")
    return BlockExpansion(w1e, b1e, w2e, None if b2 is None else b2.copy(), assignment, before, after)
