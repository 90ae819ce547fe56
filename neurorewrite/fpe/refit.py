"""Masked ridge least squares for every output row at once: the refit behind calibration.

Given the statistics of a layer's inputs ``h`` and targets ``t`` (:class:`~neurorewrite.fpe.gram.Moments`,
or the :class:`~neurorewrite.fpe.gram.Rows` themselves when they are few), find for every output row
``o`` the weights on that row's support ``S_o`` (its nonzero pattern, which must not change) minimising
``||t_o - h_S w - b_o||^2 + lam ||w - w0||^2``; ``lam = ridge * mean(diag(G))``. The ridge pulls
towards the current (expanded) weights, not towards zero: where the sample cannot determine a weight
(fewer rows than inputs), it keeps its expanded value instead of being shrunk. A row with a bias
(nonzero ``b_o``) gets its bias refit in closed form (the centred problem); a row without keeps it at
zero (the uncentred problem, a rank-one change of the operator).

Solvers:

- ``cg`` (default): preconditioned conjugate gradients on all rows together, warm-started from the
  current weights. One iteration is one ``(O, width) x (width, width)`` product; its cost does not
  depend on the supports. The preconditioner inverts, per row, the diagonal blocks of the Gram matrix
  that group the ``alpha`` children of one parent (they are the strongly correlated directions),
  masked to the row's support; with ``groups=1`` it is Jacobi. ``groups`` is the group size (adjacent
  columns), or a ``(parents, size)`` array of column indices, ``-1`` where a parent has fewer columns
  (the layer's inputs without its constant ones, :mod:`neurorewrite.fpe.constant_inputs`).
- ``exact``: a dense solve per row on its support, ``O(rows x support^3)``: the reference, and
  fine for small layers.
- ``rows``, whenever the statistics are :class:`~neurorewrite.fpe.gram.Rows` (``n`` rows, ``n << width``):
  the same minimiser in the row space, ``w = w0 + m * (X^T (X_S X_S^T + lam I)^-1 (y - X w0))``, one
  ``n x n`` system per output row. Its cost, ``O(outputs x width x n^2 / 2)``, is below one CG
  iteration's when ``n (n + 1) / 2 <= width``, which is when the accumulator keeps rows.

A fitted weight that comes out exactly 0.0 is nudged to the smallest normal float, so the nonzero
count cannot drop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neurorewrite.errors import InvalidOptionError
from neurorewrite.fpe.gram import Moments, Rows

SOLVERS = ("cg", "exact")  # what a user chooses for Moments; Rows are always solved in the row space
CHUNK_ELEMENTS = 1 << 23  # float64 elements (64 MB) per working array of the row-space solve


@dataclass(frozen=True)
class RefitInfo:
    solver: str
    iterations: int  # CG iterations (0 for exact)
    residual: float  # largest relative residual over rows at the end (0 for exact)
    ridge: float  # the absolute ridge used


def refit_masked(
    moments: Moments | Rows, w0: np.ndarray, b0: np.ndarray | None, ridge: float = 1e-4, solver: str = "cg",
    groups: int | np.ndarray = 1, max_iters: int = 50, tol: float = 1e-3, offset: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, RefitInfo]:
    """Refit ``w0 (O, width)`` (and ``b0``) on its support; see the module docstring. ``offset``: per row,
    what inputs outside ``w0`` add to the output, the same on every row of the sample (constant inputs,
    :mod:`neurorewrite.fpe.constant_inputs`); a fitted bias leaves room for it. The inputs are not
    modified; returns new arrays of ``w0``'s dtype."""
    if solver not in SOLVERS:
        raise InvalidOptionError(f"--solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    mask = w0 != 0
    has_bias = np.zeros(w0.shape[0], bool) if b0 is None else b0 != 0
    if isinstance(moments, Rows):
        mu, tbar = moments.h.mean(axis=0), moments.t.mean(axis=0)
        lam = relative_ridge(ridge, float(((moments.h - mu) ** 2).sum()) / max(1, mask.shape[1] + moments.constant))
        w, iters, res, solver = _rows(moments, mu, tbar, mask, has_bias, lam, w0), 0, 0.0, "rows"
    else:
        g = moments.gram
        lam = relative_ridge(ridge, (float(np.mean(np.diag(g))) if g.size else 1.0) * moments.fit_share)
        mu, tbar, n = moments.mean_h, moments.mean_t, moments.n
        # right-hand side per row: centred for rows with a bias, uncentred for the others; the ridge
        # pulls towards w0
        rhs = moments.cross.T.astype(np.float64)
        rhs[~has_bias] += n * np.outer(tbar[~has_bias], mu)
        rhs += lam * (w0 * mask)
        if solver == "exact":
            w, iters, res = _exact(g, rhs, mask, has_bias, mu, n, lam), 0, 0.0
        else:
            w, iters, res = _cg(g, rhs, mask, has_bias, mu, n, lam, w0, groups, max_iters, tol)
    new_w = w.astype(w0.dtype, copy=False)
    tiny = np.finfo(w0.dtype).tiny
    new_w[mask & (new_w == 0)] = tiny
    new_b = None
    if b0 is not None:
        new_b = b0.copy()
        fitted = (tbar - w @ mu - (0.0 if offset is None else offset)).astype(b0.dtype)
        fitted[fitted == 0] = np.finfo(b0.dtype).tiny
        new_b[has_bias] = fitted[has_bias]
    return new_w, new_b, RefitInfo(solver, iters, res, lam)


def relative_ridge(ridge: float, mean_diagonal: float) -> float:
    """``ridge`` times the Gram's mean diagonal (scale-free), or ``ridge`` itself where that is 0 (every input zero)."""
    lam = ridge * mean_diagonal
    return lam if lam > 0 else ridge


def _rows(rows: Rows, mu: np.ndarray, tbar: np.ndarray, mask: np.ndarray, has_bias: np.ndarray, lam: float,
          w0: np.ndarray) -> np.ndarray:
    """The row-space solve (module docstring), in chunks of output rows and of inputs so no working
    array exceeds ``CHUNK_ELEMENTS``; rows with a bias use the centred rows, the others the raw ones."""
    n, width = rows.h.shape
    w = np.where(mask, w0, 0).astype(w0.dtype, copy=False)  # in w0's type: a float64 copy of a wide W2' is GiBs
    upper = np.triu_indices(n)
    pairs = len(upper[0])
    step_o = max(1, CHUNK_ELEMENTS // max(pairs, n * n, width))
    step_j = max(1, CHUNK_ELEMENTS // max(pairs, step_o))
    for centred in (True, False):
        which = np.flatnonzero(has_bias == centred)
        if which.size == 0:
            continue
        x = rows.h - mu if centred else rows.h
        y = rows.t - tbar if centred else rows.t
        for lo in range(0, which.size, step_o):
            sel = which[lo:lo + step_o]
            m = mask[sel].astype(np.float64)
            # K_o = X diag(m_o) X^T for every row o at once, as m @ (pairwise products of X's columns)
            packed = np.zeros((sel.size, pairs))
            for j in range(0, width, step_j):
                cols = x[:, j:j + step_j]
                packed += m[:, j:j + step_j] @ (cols[upper[0]] * cols[upper[1]]).T
            k = np.zeros((sel.size, n, n))
            k[:, upper[0], upper[1]] = packed
            k[:, upper[1], upper[0]] = packed
            k[:, np.arange(n), np.arange(n)] += lam
            r = y[:, sel].T - w[sel].astype(np.float64) @ x.T  # (rows of W, n): what the current weights miss
            coef = np.linalg.solve(k, r[:, :, None])[:, :, 0]
            w[sel] += (coef @ x) * m
    return w


def _exact(g: np.ndarray, rhs: np.ndarray, mask: np.ndarray, has_bias: np.ndarray, mu: np.ndarray, n: int,
           lam: float) -> np.ndarray:
    w = np.zeros(mask.shape)
    g64 = g.astype(np.float64)
    for o in range(mask.shape[0]):
        support = np.flatnonzero(mask[o])
        if support.size == 0:
            continue
        a = g64[np.ix_(support, support)]
        if not has_bias[o]:
            a = a + n * np.outer(mu[support], mu[support])
        a[np.diag_indices_from(a)] += lam
        w[o, support] = np.linalg.solve(a, rhs[o, support])
    return w


def group_columns(width: int, groups: int | np.ndarray) -> np.ndarray:
    """``groups`` as a ``(parents, size)`` array of column indices (``-1``: none); a size that does not
    divide ``width`` gives Jacobi's single columns."""
    if isinstance(groups, np.ndarray):
        return groups
    size = groups if groups > 0 and width % groups == 0 else 1
    return np.arange(width).reshape(-1, size)


def _block_inverses(g: np.ndarray, mask: np.ndarray, has_bias: np.ndarray, mu: np.ndarray, n: int, lam: float,
                    idx: np.ndarray) -> np.ndarray:
    """Per row and group (``idx``, :func:`group_columns`), the inverse of the row's masked diagonal block
    of its operator (identity outside the support and on missing columns, zeros in the result there):
    shape (O, groups, size, size)."""
    o = mask.shape[0]
    h, a = idx.shape
    present = idx >= 0
    blocks = g[idx[:, :, None], idx[:, None, :]].astype(np.float64)  # (H, a, a); a missing column reads -1, masked below
    m = mask[:, idx] & present  # (O, H, a)
    # masks repeat across rows (a parent's children are kept or pruned together): invert each
    # distinct (pattern, bias) once per parent
    codes = (m * (1 << np.arange(a))).sum(axis=2) * 2 + (~has_bias)[:, None]  # (O, H)
    out = np.empty((o, h, a, a), dtype=g.dtype)
    eye = np.eye(a)
    mu_b = mu[idx]  # (H, a)
    for code in np.unique(codes):
        bits = ((code >> 1) >> np.arange(a)) & 1
        mm = np.outer(bits, bits)
        blk = blocks + (n * mu_b[:, :, None] * mu_b[:, None, :] if code & 1 else 0.0)
        inv = np.linalg.inv(blk * mm + lam * eye + np.diag(1 - bits)) * mm
        rows, parents = np.nonzero(codes == code)
        out[rows, parents] = inv[parents].astype(g.dtype)
    return out


def _cg(g: np.ndarray, rhs: np.ndarray, mask: np.ndarray, has_bias: np.ndarray, mu: np.ndarray, n: int, lam: float,
        w0: np.ndarray, groups: int | np.ndarray, max_iters: int, tol: float) -> tuple[np.ndarray, int, float]:
    dtype = g.dtype
    m = mask.astype(dtype)
    o, width = mask.shape
    idx = group_columns(width, groups)
    present = idx >= 0
    columns = idx[present]  # each column once: the groups partition the inputs
    nob = (~has_bias).astype(dtype)[:, None]
    mu_d = mu.astype(dtype)

    def apply(v: np.ndarray) -> np.ndarray:  # the masked operator, all rows at once
        out = v @ g
        if nob.any():
            out += n * nob * (v @ mu_d)[:, None] * mu_d[None, :]
        out += lam * v
        return out * m

    inv = _block_inverses(g, mask, has_bias, mu, n, lam, idx)

    def precondition(r: np.ndarray) -> np.ndarray:
        grouped = r[:, idx] * present  # a missing column reads column -1; its inverse's rows and columns are zero
        z = np.matmul(inv, grouped[..., None])[..., 0]
        out = np.empty_like(r)
        out[:, columns] = z[:, present]
        return out

    b = (rhs * mask).astype(dtype)  # rhs already holds lam * w0
    x = (w0 * mask).astype(dtype)
    r = b - apply(x)
    bnorm = np.maximum(np.linalg.norm(b, axis=1), 1e-30)
    rel = np.linalg.norm(r, axis=1) / bnorm
    z = precondition(r)
    p = z.copy()
    rz = np.einsum("ij,ij->i", r, z)
    it = 0
    while it < max_iters and float(rel.max()) > tol:
        it += 1
        ap = apply(p)
        pap = np.einsum("ij,ij->i", p, ap)
        step = np.where(pap > 0, rz / np.where(pap > 0, pap, 1), 0).astype(dtype)
        x += step[:, None] * p
        r -= step[:, None] * ap
        rel = np.linalg.norm(r, axis=1) / bnorm
        z = precondition(r)
        rz_new = np.einsum("ij,ij->i", r, z)
        beta = np.where(rz > 0, rz_new / np.where(rz > 0, rz, 1), 0).astype(dtype)
        p = z + beta[:, None] * p
        rz = rz_new
    return x.astype(np.float64), it, float(rel.max())
