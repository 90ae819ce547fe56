"""Exact-count pruning of the expanded block, chosen on the original matrices.

The order is by magnitude, or, with :class:`PruneScales` (activation-aware pruning, ``docs/methods.md``
1.3b), by magnitude times per-row and per-column factors measured on sample inputs, so the weights
that carry real inputs' signal survive. Either way the count removed is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from neurorewrite.errors import InvalidOptionError

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
            f"cannot prune {k} weights from a block with only {available} nonzero candidates: the block is "
            "too small to absorb the copies at this alpha; lower --alpha (with --prune layer, try --prune global)"
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
        below = _flat_below(m, t)
        cuts.append((np.concatenate([below, ties[:n_full].astype(below.dtype)]), last, copies))
    return cuts


def _flat_below(m: np.ndarray, t: np.floating, chunk: int = 1 << 24) -> np.ndarray:
    """``np.flatnonzero(m < t)`` in the narrowest index type that fits, built a chunk at a time: the
    indices of a large pruned count would otherwise be 8 bytes each, plus a mask of ``m``'s size."""
    dtype = np.int32 if m.size < 2**31 else np.int64
    parts = [(np.flatnonzero(m[s:s + chunk] < t) + s).astype(dtype) for s in range(0, m.size, chunk)]
    return np.concatenate(parts) if parts else np.empty(0, dtype)


SCORE_CHUNK = 1 << 22  # listed entries scored at a time: their row and column indices are 16 bytes each


@dataclass(frozen=True)
class PruneScales:
    """Factors that turn a block's weight magnitudes into importance scores (all entries >= 0).

    The score of input-side entry ``(i, j)`` of matrix ``m`` is ``|W_m[i, j]| * in_rows[m][i] *
    in_columns[j]``; of output entry ``(o, i)`` it is ``|W_out[o, i]| * out_columns[i]``. With
    ``in_columns = rms(x_j)`` and ``out_columns = rms(h_i)`` a score is the size of the entry's
    contribution on real inputs; ``in_rows`` carries an input-side contribution on to the block's output
    (e.g. ``rms(act'(z_i)) * ||W_out[:, i]||``), so one threshold over both layers compares like with like.
    ``None`` is a factor of one. Every copy of an output entry keeps the parent's score.
    """

    in_columns: np.ndarray | None = None  # (D,)
    in_rows: tuple[np.ndarray | None, ...] = ()  # per input-side matrix, (H,)
    out_columns: np.ndarray | None = None  # (H,)

    def scores(self, magnitudes: np.ndarray, flat: np.ndarray | None, shape: tuple[int, int], matrix: int | None) -> np.ndarray:
        """Scores of the entries ``flat`` (flat indices into a matrix of ``shape``; None: every entry in
        order) whose magnitudes are given; ``matrix`` is the input-side matrix's position, or None for
        the output matrix."""
        out = magnitudes.astype(np.float64)
        row = self.in_rows[matrix] if matrix is not None and matrix < len(self.in_rows) else None
        col = self.in_columns if matrix is not None else self.out_columns
        row = None if row is None else np.asarray(row, np.float64)
        col = None if col is None else np.asarray(col, np.float64)
        if flat is None:  # every entry in order: broadcast, no index arrays (24 bytes per weight on a 2 GiB layer)
            grid = out.reshape(shape)
            if row is not None:
                grid *= row[:, None]
            if col is not None:
                grid *= col[None, :]
            return out
        step = SCORE_CHUNK
        for lo in range(0, flat.size, step):  # the row and column of each listed entry, a chunk at a time
            rows, cols = np.divmod(flat[lo:lo + step], shape[1])
            if row is not None:
                out[lo:lo + step] *= row[rows]
            if col is not None:
                out[lo:lo + step] *= col[cols]
        return out


def choose_pruned(
    inputs: Sequence[np.ndarray], w_out: np.ndarray, alpha: int, excess_in: Sequence[int], excess_out: int, mode: str,
    scales: PruneScales | None = None,
) -> tuple[list[np.ndarray], Cut]:
    """Which weights FPE prunes, chosen on the original matrices.

    ``inputs`` are the block's input-side matrices (W1; or Wg and Wu of a gated block), each of whose
    entries has exactly one child copy; ``w_out`` is the output matrix, each of whose entries stands for
    its ``alpha`` equal copies, so nothing of the expanded size is sorted. Returns, per input matrix, the
    flat indices whose copy goes, and a :data:`Cut` of flat ``w_out`` indices whose copies go (whole, or
    the first ``copies`` children of one entry). ``global`` removes the smallest magnitudes over all the
    matrices at once (the paper's rule; at equal magnitude the earlier matrix goes first); ``layer``
    removes ``excess_in[i]`` from input matrix ``i`` and ``excess_out`` from the output copies
    separately, so each layer keeps its own count. ``scales`` orders by importance score instead of
    magnitude (:class:`PruneScales`).
    """
    # a matrix without zeros (the usual dense layer) needs no index array: 8 bytes per weight saved
    nonzero = [None if np.count_nonzero(w) == w.size else np.flatnonzero(w) for w in (*inputs, w_out)]
    mags = [np.abs(w.ravel() if i is None else w.ravel()[i]) for w, i in zip((*inputs, w_out), nonzero)]
    # one type to compare in (a float16 W1 beside a float32 W2 must not round W2's magnitudes)
    common = np.result_type(*mags)
    mags = [m.astype(common, copy=False) for m in mags]
    if scales is not None:
        positions: list[int | None] = [*range(len(inputs)), None]
        mags = [scales.scores(m, i, w.shape, p) for m, i, w, p in zip(mags, nonzero, (*inputs, w_out), positions)]
    if mode == "global":
        cuts = smallest_by_count([(m, 1) for m in mags[:-1]] + [(mags[-1], alpha)], sum(excess_in) + excess_out)
    else:
        cuts = [smallest_by_count([(m, 1)], k)[0] for m, k in zip(mags[:-1], excess_in)]
        cuts += smallest_by_count([(mags[-1], alpha)], excess_out)
    del mags
    flat_in = []
    for (whole, last, _), idx in zip(cuts[:-1], nonzero[:-1]):  # multiplicity 1: a partly cut entry is cut whole
        flat_in.append(_at(idx, whole if last < 0 else np.append(whole, last)))
    whole, last, copies = cuts[-1]
    return flat_in, (_at(nonzero[-1], whole), int(_at(nonzero[-1], last)) if last >= 0 else -1, copies)


def _at(positions: np.ndarray | None, i):  # noqa: ANN001, ANN202
    """``positions[i]``, where None stands for ``arange`` (every entry of the matrix is a candidate)."""
    return i if positions is None else positions[i]
