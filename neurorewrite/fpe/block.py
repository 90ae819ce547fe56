"""Expanding one block: scatter children, copy outgoing columns, prune back to the count.

:func:`expand_block` expands ``h = act(W1 x + b1), y = W2 h + b2``; :func:`expand_gated_block` a gated
block ``h = act(Wg x + bg) * (Wu x + bu), y = Wd h + bd`` (``docs/methods.md`` 1b): one input partition
per parent used for both its gate row and its up row, the down column copied, and the prune over
Wg', Wu' and Wd' together. Both share :func:`_expand`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neurorewrite.errors import InvalidOptionError
from neurorewrite.fpe.config import FPEConfig
from neurorewrite.fpe.prune import PruneScales, choose_pruned
from neurorewrite.fpe.split import split_neurons


@dataclass(frozen=True)
class GatedExpansion:
    """The expanded weights of one gated block. Pruned entries are exact zeros."""

    wg: np.ndarray  # (alpha*H, D)
    bg: np.ndarray | None
    wu: np.ndarray  # (alpha*H, D), the same partition as wg
    bu: np.ndarray | None
    wd: np.ndarray  # (O, alpha*H)
    bd: np.ndarray | None  # unchanged
    assignment: np.ndarray  # (H, D) child index of every input of every parent (gate and up alike)
    nnz_before: int
    nnz_after: int


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


def expand_block(
    w1: np.ndarray,
    b1: np.ndarray | None,
    w2: np.ndarray,
    b2: np.ndarray | None,
    cfg: FPEConfig,
    scales: PruneScales | None = None,
    input_scale: np.ndarray | None = None,
) -> BlockExpansion:
    """Split every hidden neuron into ``cfg.alpha`` children and prune back to the original count.

    Invariants: each row of ``assignment`` partitions ``range(D)``; ``nnz_after == nnz_before``.
    The inputs are not modified. ``scales`` makes the prune activation-aware (:class:`PruneScales`);
    without it the prune is by magnitude. ``input_scale`` (the inputs' rms on a sample) weighs the
    ``tiered`` split's ranking.
    """
    ((w1e, b1e),), w2e, assignment, before, after = _expand([(w1, b1)], w2, b2, cfg, None, scales, input_scale)
    return BlockExpansion(w1e, b1e, w2e, None if b2 is None else b2.copy(), assignment, before, after)


def expand_gated_block(
    wg: np.ndarray, bg: np.ndarray | None, wu: np.ndarray, bu: np.ndarray | None,
    wd: np.ndarray, bd: np.ndarray | None, cfg: FPEConfig, scales: PruneScales | None = None,
    input_scale: np.ndarray | None = None,
) -> GatedExpansion:
    """Expand a gated block: child ``k`` of parent ``i`` computes
    ``act(Wg[i, S_k] x + bg_ik) * (Wu[i, S_k] x + bu_ik)`` with one partition ``S`` per parent for
    both rows; ``Wd``'s column is copied to every child; Wg', Wu' and Wd' are pruned together
    (``prune="global"``) or each by its own excess (``"layer"``) to exactly the original count.
    The ``feature`` split clusters the inputs by the gate and up rows together, and the ``tiered``
    split ranks them by both rows' root-sum-square magnitude.
    """
    if wu.shape != wg.shape:
        raise InvalidOptionError(f"the up weight has shape {list(wu.shape)} but the gate weight {list(wg.shape)}")
    (ge, ue), wde, assignment, before, after = _expand([(wg, bg), (wu, bu)], wd, bd, cfg, np.vstack([wg, wu]), scales,
                                                         input_scale)
    return GatedExpansion(*ge, *ue, wde, None if bd is None else bd.copy(), assignment, before, after)


def _expand(
    inputs: list[tuple[np.ndarray, np.ndarray | None]], w_out: np.ndarray, b_out: np.ndarray | None,
    cfg: FPEConfig, features: np.ndarray | None, scales: PruneScales | None = None,
    input_scale: np.ndarray | None = None,
) -> tuple[list[tuple[np.ndarray, np.ndarray | None]], np.ndarray, np.ndarray, int, int]:
    """Split, copy and prune a block with input-side layers ``inputs`` (one partition for all of them)
    and the output layer ``w_out``; returns the expanded inputs, ``W_out'``, the assignment and the
    counts before and after (equal, or this raises)."""
    h, d = inputs[0][0].shape
    if w_out.shape[1] != h:
        raise InvalidOptionError(f"the output layer has {w_out.shape[1]} inputs but the input layer has {h} outputs")
    alpha = cfg.alpha
    assignment = split_neurons(inputs[0][0], cfg, features, input_scale)
    biases = [expand_bias(b, alpha, cfg.bias) for _, b in inputs]
    # b/alpha can underflow to zero for subnormal biases: count what is really there
    excess_in = [_nnz(be) - _nnz(b) for (_, b), be in zip(inputs, biases)]
    excess_out = (alpha - 1) * int(np.count_nonzero(w_out))
    cut_in, (whole, last, copies) = choose_pruned([w for w, _ in inputs], w_out, alpha, excess_in, excess_out, cfg.prune, scales)
    expanded = []
    for (w, _), be, cut in zip(inputs, biases, cut_in):
        kept = w.copy()
        kept.ravel()[cut] = 0
        expanded.append((scatter_children(kept, assignment, alpha), be))
        del kept
    del cut_in, cut  # index arrays as large as the pruned count: freed before the output copies are made
    kept_out = w_out.copy()
    kept_out.ravel()[whole] = 0
    del whole
    w_out_e = copy_outputs(kept_out, alpha)
    del kept_out
    if last >= 0:  # the lowest-numbered children of the last entry lose their copies
        o, i = divmod(last, h)
        w_out_e[o, i * alpha : i * alpha + copies] = 0
    before = sum(_nnz(w) + _nnz(b) for w, b in inputs) + _nnz(w_out) + _nnz(b_out)
    after = sum(_nnz(w) + _nnz(b) for w, b in expanded) + _nnz(w_out_e) + _nnz(b_out)
    if after != before:
        raise AssertionError(f"FPE count invariant broken: {before} -> {after}")
    return expanded, w_out_e, assignment, before, after


def _nnz(a: np.ndarray | None) -> int:
    return 0 if a is None else int(np.count_nonzero(a))


Weights = tuple[np.ndarray, np.ndarray | None]


def split_fused(w: np.ndarray, b: np.ndarray | None, gate_half: int) -> tuple[Weights, Weights]:
    """(gate, up) weights of a fused gate/up projection whose output is cut in two halves; the gate's
    rows are half ``gate_half`` (0: the first)."""
    h = w.shape[0] // 2
    parts = [(w[:h], None if b is None else b[:h]), (w[h:], None if b is None else b[h:])]
    return (parts[0], parts[1]) if gate_half == 0 else (parts[1], parts[0])


def join_fused(gate: Weights, up: Weights, gate_half: int) -> Weights:
    """The inverse of :func:`split_fused`: the fused projection's weights, the gate's rows in ``gate_half``."""
    first, second = (gate, up) if gate_half == 0 else (up, gate)
    b = None if first[1] is None or second[1] is None else np.concatenate([first[1], second[1]])
    return np.vstack([first[0], second[0]]), b
