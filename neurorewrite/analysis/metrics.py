"""Weight-only interference metrics of one layer: density, feature capacity, neuron cosine similarity.

Definitions (``W`` is a layer's effective weight, rows = neurons, columns = input features):

- density: ``nnz(W) / W.size``.
- feature capacity (docs/methods.md 1.8) of input feature ``j``: with the feature Gram ``G = W^T W`` (D x D),
  ``C_j = G_jj^2 / sum_k G_jk^2``. It is 1 when column ``j`` is orthogonal to every other column (the
  feature owns its directions) and falls towards ``1/D`` as columns overlap. An unused feature (an
  all-zero column, ``G_jj = 0``) has capacity 0: it takes no room. The sum over features is at most
  ``rank(W) <= min(H, D)``.
- mean |cosine| of neuron rows: the mean over unordered pairs of distinct rows of the absolute cosine
  similarity. Absolute because a row pointing against another interferes as much as one pointing with
  it; the signed mean (reported too) lets such pairs cancel. All-zero rows (dead or fully pruned
  neurons) have no direction and are left out; with fewer than two nonzero rows the mean is undefined
  (None). Orthogonal rows give 0, identical rows give 1.

Everything is computed from Gram matrices without Python loops over pairs; rows are processed in
chunks so an ``(n, n)`` Gram never has to exist at once, and only its upper half is computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNK_ROWS = 1024  # rows of the row Gram computed at once: 1024 x 6144 float64 is 50 MB


@dataclass(frozen=True)
class LayerStats:
    """Size and sparsity of one linear layer (weight (out, in); bias counted separately)."""

    name: str
    out_features: int
    in_features: int
    nonzeros: int  # of the weight
    bias_nonzeros: int
    density: float  # nonzeros / (out * in)


@dataclass(frozen=True)
class CosineStats:
    mean_abs: float | None
    mean_signed: float | None
    rows_used: int  # nonzero rows that entered the mean


def layer_stats(name: str, w: np.ndarray, b: np.ndarray | None) -> LayerStats:
    """Widths, nonzeros and density of a weight ``w`` (out, in) and its bias."""
    nnz = int(np.count_nonzero(w))
    return LayerStats(
        name=name, out_features=int(w.shape[0]), in_features=int(w.shape[1]), nonzeros=nnz,
        bias_nonzeros=0 if b is None else int(np.count_nonzero(b)), density=nnz / max(w.size, 1),
    )


def feature_capacity(w: np.ndarray) -> np.ndarray:
    """``C_j`` for every input feature (column) of ``w`` (H, D); 0 for all-zero columns. Shape (D,)."""
    w64 = np.asarray(w, dtype=np.float64)
    gram = w64.T @ w64
    diag = np.diag(gram)
    denom = np.einsum("jk,jk->j", gram, gram)  # sum_k G_jk^2, row by row
    out = np.zeros(gram.shape[0])
    used = denom > 0
    out[used] = diag[used] ** 2 / denom[used]
    return out


def unit_rows(w: np.ndarray) -> np.ndarray:
    """The nonzero rows of ``w`` scaled to unit length (all-zero rows dropped)."""
    w64 = np.asarray(w, dtype=np.float64)
    norms = np.linalg.norm(w64, axis=1)
    keep = norms > 0
    return w64[keep] / norms[keep, None]


def row_cosines(w: np.ndarray) -> CosineStats:
    """Mean absolute and signed cosine similarity over pairs of distinct nonzero rows of ``w``."""
    u = unit_rows(w)
    n = u.shape[0]
    if n < 2:
        return CosineStats(None, None, n)
    pairs = n * (n - 1)  # ordered pairs; both sums below count each pair twice as well
    # signed: sum over all ordered pairs of u_i.u_k is |sum_i u_i|^2; the diagonal adds n
    total = u.sum(axis=0)
    signed = (float(total @ total) - n) / pairs
    abs_sum = 0.0  # over ordered pairs: |G| is symmetric, so only blocks on and right of the diagonal
    for start in range(0, n, CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, n)
        rows = u[start:stop]
        own = np.abs(rows @ rows.T)
        abs_sum += float(own.sum() - np.trace(own))
        if stop < n:
            abs_sum += 2.0 * float(np.abs(rows @ u[stop:].T).sum())
    return CosineStats(abs_sum / pairs, signed, n)


def cosine_gram(w: np.ndarray, rows: int) -> np.ndarray:
    """The (rows x rows) cosine Gram of the first ``rows`` rows of ``w``; zero rows give zero entries."""
    head = np.asarray(w[:rows], dtype=np.float64)
    norms = np.linalg.norm(head, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    unit = head / safe[:, None]
    return unit @ unit.T


def pooled_density(w: np.ndarray, max_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The nonzero pattern of ``w`` pooled to at most ``max_side`` cells a side.

    Each cell holds the fraction of nonzeros in its tile (1 cell = 1 weight when ``w`` is small enough).
    Returns the pooled array and the (rows, columns) of weights per tile (the largest, when uneven).
    """
    mask = (np.asarray(w) != 0).astype(np.float64)
    edges = [np.linspace(0, n, min(n, max_side) + 1).astype(np.int64) for n in mask.shape]
    rows = np.add.reduceat(mask, edges[0][:-1], axis=0)
    counts = np.add.reduceat(rows, edges[1][:-1], axis=1)
    sizes = np.outer(np.diff(edges[0]), np.diff(edges[1]))
    tile = (int(np.diff(edges[0]).max()), int(np.diff(edges[1]).max()))
    return counts / sizes, tile
