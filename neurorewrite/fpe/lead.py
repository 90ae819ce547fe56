"""The lead child: one child per parent refit to carry the parent's whole pre-activation.

After the split, child ``k`` of parent ``i`` computes ``W1[i, S_k] x + b_k``: a share of the parent's
pre-activation ``z_i = W1[i] x + b1[i]``, so ``act`` of any one child is far from ``act(z_i)``. On a
sample, the best the child's own inputs can do for the whole ``z_i`` is the least-squares fit

    min_{w, b}  sum_rows (w . x_student[S_k] + b - z_i(x_teacher))^2 + ridge |w|^2,

whose solution uses the correlations between the inputs the child has and those it lost. The *lead*
child of a parent is the one whose share carries the most of ``z_i``: the largest
``sum_j (W1[i, j] * rms(x_j))^2`` over its inputs (with the ``tiered`` split, child 0). Only the lead
is refit; its siblings keep their shares (refitting them to their own shares measured no gain).
``x_student`` is the expanded model's input to the layer (after the earlier, already calibrated
blocks) and ``x_teacher`` the original's, so the fit also absorbs the earlier blocks' drift.

Invariant: every row keeps its support (the nonzero count does not change; a solved weight that
comes out exactly 0.0 is the caller's to restore), and only the lead rows and their biases change.
The statistics are :class:`InputMoments`: ``[x_s, 1]^T [x_s, 1]`` and ``[x_s, 1]^T [x_t, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neurorewrite.fpe.refit import relative_ridge


@dataclass
class InputMoments:
    """Sums over the sample rows of ``a a^T`` (``gram``) and ``a c^T`` (``cross``) with
    ``a = [x_student, 1]`` and ``c = [x_teacher, 1]``, in float64; ``rows`` counted."""

    gram: np.ndarray  # (D + 1, D + 1)
    cross: np.ndarray  # (D + 1, D + 1)
    rows: int = 0

    @classmethod
    def zeros(cls, features: int) -> InputMoments:
        return cls(np.zeros((features + 1, features + 1)), np.zeros((features + 1, features + 1)))

    def add(self, student: np.ndarray, teacher: np.ndarray) -> None:
        """Add rows ``(n, D)`` of the layer's input in the expanded (student) and original (teacher) model."""
        a = np.hstack([np.asarray(student, np.float64), np.ones((len(student), 1))])
        c = np.hstack([np.asarray(teacher, np.float64), np.ones((len(teacher), 1))])
        self.gram += a.T @ a
        self.cross += a.T @ c
        self.rows += len(student)


def lead_children(w1e: np.ndarray, alpha: int, input_scale: np.ndarray) -> np.ndarray:
    """Row index in ``w1e`` (``(alpha * H, D)``, a parent's children adjacent) of each parent's lead child."""
    share = ((w1e * input_scale) ** 2).sum(axis=1).reshape(-1, alpha)
    return np.arange(share.shape[0]) * alpha + share.argmax(axis=1)


def refit_lead_children(
    moments: InputMoments, w1e: np.ndarray, b1e: np.ndarray | None, w1: np.ndarray, b1: np.ndarray | None,
    alpha: int, ridge: float = 1e-4,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """New ``(W1', b1', leads)``: each parent's lead child fit to the parent's pre-activation on the sample.

    ``w1e`` ``(alpha * H, D)`` is the expanded first layer (children of parent ``i`` in rows
    ``i * alpha .. i * alpha + alpha - 1``), ``w1`` ``(H, D)`` the original one. ``ridge`` is relative to
    the mean diagonal of the inputs' Gram. Without a bias (``b1e`` None) the fit has no intercept. The
    inputs are not modified.
    """
    d = w1e.shape[1]
    if moments.rows < 2:
        return w1e.copy(), None if b1e is None else b1e.copy(), np.zeros(0, dtype=np.int64)
    gram = moments.gram.copy()
    gram[np.arange(d), np.arange(d)] += relative_ridge(ridge, float(np.mean(np.diag(gram)[:d])))
    scale = np.sqrt(np.maximum(np.diag(moments.gram)[:d], 0.0) / moments.rows)
    leads = lead_children(w1e, alpha, scale)
    # the parent's pre-activation as a linear function of [x_teacher, 1]
    target = np.hstack([w1.astype(np.float64), (np.zeros(len(w1)) if b1 is None else b1.astype(np.float64))[:, None]])
    rhs = target @ moments.cross.T  # (H, D + 1): row i is cross @ target_i
    new_w = w1e.copy()
    new_b = None if b1e is None else b1e.copy()
    inverse: np.ndarray | None = None
    unknowns = d + 1 if b1e is not None else d  # the inputs, and the intercept where there is a bias
    for parent, row in enumerate(leads):
        support = np.flatnonzero(w1e[row])
        if support.size == 0:
            continue
        index = support if b1e is None else np.append(support, d)
        if 2 * index.size <= unknowns:
            solution = np.linalg.solve(gram[np.ix_(index, index)], rhs[parent, index])
        else:  # a lead holding most inputs (a large --lead-share): solve on the few it lacks
            if inverse is None:
                inverse = np.linalg.inv(gram[:unknowns, :unknowns])
            solution = solve_on_subset(inverse, index, rhs[parent, index])
        new_w[row, support] = solution[: support.size]
        if new_b is not None:
            new_b[row] = solution[-1]
    return new_w, new_b, leads


def solve_on_subset(inverse: np.ndarray, index: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``x`` with ``G[index, index] x = rhs``, given ``inverse = G^-1`` of the whole symmetric positive
    definite ``G``: ``G_SS^-1 = M_SS - M_SC M_CC^-1 M_CS`` (``M = G^-1``, ``C`` the indices not in ``S``),
    so the solve is of the size of the complement: for a lead child that kept 250 of MiniLM's 384 inputs
    (plus the bias), 134 unknowns instead of 251. With the default lead share most leads hold more than
    half of their parent's inputs; the direct solves made MiniLM's per-child calibration about 10 s
    slower than balanced tiers (``benchmarks.recover_minilm``, 80 s against 70 s), this one 2 s (68 s
    against 66 s)."""
    other = np.setdiff1d(np.arange(inverse.shape[0]), index, assume_unique=True)
    full = np.zeros(inverse.shape[0])
    full[index] = rhs
    y = inverse @ full  # [M_SS rhs, M_CS rhs]
    if other.size:
        full[:] = 0.0
        full[other] = np.linalg.solve(inverse[np.ix_(other, other)], y[other])
        y -= inverse @ full  # minus [M_SC z, M_CC z] with z = M_CC^-1 M_CS rhs
    return y[index]
