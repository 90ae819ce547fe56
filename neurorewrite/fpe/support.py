"""Which weights of a pruned layer the refit may move: each output row's support, chosen again from the
sample's second moments (Optimal Brain Surgeon saliency) before the refit.

The prune at expand time picks ``W2'``'s support from magnitudes (times activation norms); the refit
(:mod:`neurorewrite.fpe.refit`) then moves only the weights it kept. Both scores ignore that the
inputs are correlated: the ``alpha`` children of one parent are parts of one pre-activation, so when a
row keeps all four, three of them add little the fourth does not already carry. With the Gram matrix
``G`` of the row's inputs, ``H = G + damping * mean(diag G) * I`` (damping 0.01) and the row's unconstrained
least-squares weights ``w* = H^-1 c``, the saliency of weight ``j`` is ``w*_j^2 / [H^-1]_jj``: the
increase of the squared error when ``w*_j`` is removed and every other weight compensates (OBS). Keeping
the largest per row spreads a row's weights over more parents.

Invariant: every row keeps exactly the number of nonzero weights it had, so the layer's nonzero count
(and the model's) does not change; the returned weights are ``w*`` on the chosen support, every one of
them nonzero (an exact 0.0 is nudged to the smallest normal float, as the refit does).

Cost: one Cholesky factorisation of ``H`` and the inverse of its triangular factor, ``width^3 / 3``
flops each (LAPACK ``potrf`` and ``trtri`` in float32, in one array beside the Gram), and two triangular
products with the ``(width, O)`` cross moments per layer; ``H^-1`` itself is never formed.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import blas, lapack

from neurorewrite.errors import DataError
from neurorewrite.fpe.gram import Moments, Scratch, set_upper_triangle
from neurorewrite.fpe.refit import relative_ridge

# of the mean diagonal: keeps H^-1 well conditioned where the sample barely moves an input, and the dense fit
# w* that ranks the weights from fitting the sample's noise. Mean cosine on MiniLM (benchmarks.recover_minilm,
# 512 or 2048 fitting sentences) with 0.01 / 0.1: alpha 4, 512: 0.899 / 0.898; alpha 4, 2048: 0.940 / 0.933;
# alpha 2, 512: 0.914 / 0.919. Alpha 4 is where the support matters most.
DAMPING = 0.01


def choose_support(moments: Moments, w0: np.ndarray, damping: float = DAMPING, scratch: Scratch | None = None,
                   counts: np.ndarray | None = None) -> np.ndarray:
    """``w0 (O, width)``'s rows on new supports of the same sizes (or of ``counts`` per row, at most
    ``width``), valued by the unconstrained fit; see the module docstring. ``w0`` is not modified; the
    result has its dtype."""
    if counts is None:
        counts = np.count_nonzero(w0, axis=1)
    factor = inverse_factor(moments.gram, damping, scratch, moments.fit_share)  # L^-1 with H = L L^T, so H^-1 = L^-T L^-1
    # the rows' dense least-squares weights, H^-1 c = L^-T (L^-1 c), through the upper triangular L^-T
    upper = factor.T
    cross = np.asfortranarray(moments.cross, dtype=np.float32)
    best = blas.strmm(1.0, upper, blas.strmm(1.0, upper, cross, trans_a=1), trans_a=0).T  # (O, width)
    h_inverse_diagonal = np.einsum("ij,ij->j", factor, factor, dtype=np.float64)
    saliency = best.astype(np.float64) ** 2 / np.maximum(h_inverse_diagonal, np.finfo(np.float64).tiny)
    keep = np.zeros(w0.shape, dtype=bool)
    width = w0.shape[1]
    for o in np.flatnonzero(counts):
        k = int(counts[o])
        chosen = np.arange(width) if k >= width else np.argpartition(-saliency[o], k - 1)[:k]
        keep[o, chosen] = True
    out = np.where(keep, best, 0).astype(w0.dtype)
    out[keep & (out == 0)] = np.finfo(w0.dtype).tiny
    return out


def inverse_factor(gram: np.ndarray, damping: float = DAMPING, scratch: Scratch | None = None,
                   fit_share: float = 1.0) -> np.ndarray:
    """``L^-1`` (float32, lower triangular, zeros above the diagonal) for the Cholesky factor ``L`` of
    ``H = G + damping * mean(diag G) * I``, so ``H^-1 = L^-T L^-1``. Where float32 rounding leaves the
    damped Gram not positive definite (a Gram whose inputs differ in scale by many orders), the damping
    grows tenfold until it is. With ``scratch`` the factor is its ``"factor"`` array. The mean diagonal
    is of the layer's whole Gram, ``fit_share`` (:attr:`Moments.fit_share`) times ``gram``'s."""
    if not np.isfinite(gram).all():
        raise DataError("the sample's hidden activations overflow float32 (their Gram matrix is not finite); "
                        "scale the sample's inputs down, or use --support kept")
    mean_diagonal = (float(np.diag(gram).astype(np.float64).mean()) if gram.size else 0.0) * fit_share
    width = gram.shape[0]
    for _ in range(30):  # a finite Gram damped by a large enough multiple of its mean diagonal is positive definite
        h = np.empty(gram.shape, np.float32) if scratch is None else scratch.zeros("factor", gram.shape, np.float32)
        np.copyto(h, gram, casting="same_kind")  # a copy, factored in place
        h[np.diag_indices(width)] += np.float32(relative_ridge(damping, mean_diagonal))
        # LAPACK sees the C-ordered h as its transpose: its upper factor U (H = U^T U) is our lower L = U^T,
        # and the inverse of U in place leaves L^-1 in h's lower triangle
        _, info = lapack.spotrf(h.T, lower=0, clean=0, overwrite_a=1)
        if info == 0:
            lapack.strtri(h.T, lower=0, overwrite_c=1)  # cannot fail: potrf left a positive diagonal
            set_upper_triangle(h, mirror=False)  # potrf and trtri left the Gram's values there
            return h
        damping *= 10
    raise DataError("the Gram matrix of the sample's hidden activations stays indefinite however it is damped; "
                    "use --support kept")

