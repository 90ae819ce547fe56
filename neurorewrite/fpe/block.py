"""Expanding one block: scatter children, copy outgoing columns, prune back to the count."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neurorewrite.errors import InvalidOptionError
from neurorewrite.fpe.config import FPEConfig, block_nnz
from neurorewrite.fpe.prune import choose_pruned
from neurorewrite.fpe.split import split_neurons


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
