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

Cost: one ``width x width`` inverse (float32, in one array beside the Gram) and one ``(O, width) x
(width, width)`` product per layer.
"""

from __future__ import annotations

import numpy as np

from neurorewrite.errors import DataError
from neurorewrite.fpe.gram import Moments

# of the mean diagonal: keeps H^-1 well conditioned where the sample barely moves an input, and the dense fit
# w* that ranks the weights from fitting the sample's noise. Mean cosine on MiniLM (benchmarks.recover_minilm,
# 512 or 2048 fitting sentences) with 0.01 / 0.1: alpha 4, 512: 0.899 / 0.898; alpha 4, 2048: 0.940 / 0.933;
# alpha 2, 512: 0.914 / 0.919. Alpha 4 is where the support matters most.
DAMPING = 0.01


def choose_support(moments: Moments, w0: np.ndarray, damping: float = DAMPING) -> np.ndarray:
    """``w0 (O, width)``'s rows on new supports of the same sizes, valued by the unconstrained fit; see
    the module docstring. ``w0`` is not modified; the result has its dtype."""
    counts = np.count_nonzero(w0, axis=1)
    h_inverse = damped_inverse(moments.gram, damping)
    best = moments.cross.T.astype(np.float32) @ h_inverse  # (O, width): the rows' dense least-squares weights
    saliency = best.astype(np.float64) ** 2 / np.maximum(np.diag(h_inverse).astype(np.float64), np.finfo(np.float64).tiny)
    keep = np.zeros(w0.shape, dtype=bool)
    width = w0.shape[1]
    for o in np.flatnonzero(counts):
        k = int(counts[o])
        chosen = np.arange(width) if k >= width else np.argpartition(-saliency[o], k - 1)[:k]
        keep[o, chosen] = True
    out = np.where(keep, best, 0).astype(w0.dtype)
    out[keep & (out == 0)] = np.finfo(w0.dtype).tiny
    return out


def damped_inverse(gram: np.ndarray, damping: float = DAMPING) -> np.ndarray:
    """``(G + damping * mean(diag G) * I)^-1`` in float32, by Cholesky; where float32 rounding leaves the
    damped Gram not positive definite (a Gram whose inputs differ in scale by many orders), the damping
    grows tenfold until it is."""
    import torch  # torch's Cholesky inverse: 3 s for a 6144-wide Gram where numpy's LU inverse takes 15 s

    if not np.isfinite(gram).all():
        raise DataError("the sample's hidden activations overflow float32 (their Gram matrix is not finite); "
                        "scale the sample's inputs down, or use --support kept")
    diagonal = np.diag(gram).astype(np.float64)
    scale = float(diagonal.mean()) if diagonal.size and diagonal.mean() > 0 else 1.0
    info = torch.empty((), dtype=torch.int32)
    for _ in range(30):  # a finite Gram damped by a large enough multiple of its mean diagonal is positive definite
        h = torch.from_numpy(np.array(gram, dtype=np.float32))  # a copy, factored in place
        h.diagonal().add_(damping * scale)
        torch.linalg.cholesky_ex(h, out=(h, info))
        if int(info) == 0:
            return torch.cholesky_inverse(h, out=h).numpy()  # in place: one width^2 array beside the Gram, not two
        damping *= 10
    raise DataError("the Gram matrix of the sample's hidden activations stays indefinite however it is damped; "
                    "use --support kept")
