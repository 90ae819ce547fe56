"""The statistics of a least-squares refit, one chunk of rows at a time: the rows themselves while they
are few, their second moments (Gram and cross terms) once they are many.

Memory is that of the statistics (``width x width`` and ``width x outputs``), whatever the number of
rows. Rows are accumulated shifted by the first chunk's means (``G = sum (h - c)(h - c)^T``), so the
centred Gram at the end does not lose its digits to large activation means (GELU outputs are mostly
positive: summing ``h h^T`` and subtracting ``n mu mu^T`` would cancel most of them in float32).

:class:`FitAccumulator` keeps the rows (:class:`Rows`) as long as ``n (n + 1) / 2 <= width``: a sample
that small is solved in the ``n``-dimensional row space (:mod:`neurorewrite.fpe.refit`), with memory
``n x width`` instead of the ``width^2`` Gram (a 65,536-wide layer and 64 rows: 32 MB, not 16 GiB).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Moments:
    """Centred statistics of ``n`` rows of inputs ``h`` and targets ``t``.

    ``gram = sum (h - mean_h)(h - mean_h)^T``, ``cross = sum (h - mean_h)(t - mean_t)^T``,
    ``target_ss = sum ||t - mean_t||^2``.
    """

    gram: np.ndarray  # (width, width)
    cross: np.ndarray  # (width, outputs)
    mean_h: np.ndarray  # (width,) float64
    mean_t: np.ndarray  # (outputs,) float64
    target_ss: np.ndarray  # (outputs,) float64, per output
    n: int
    constant: int = 0  # inputs left out of gram and cross: one value on every row (:mod:`.constant_inputs`)

    @property
    def fit_share(self) -> float:
        """The share of the layer's inputs the Gram holds: its mean diagonal times this is the whole Gram's
        (a constant input's diagonal entry is zero), the scale of the ridge and the damping."""
        width = self.gram.shape[0]
        return width / (width + self.constant) if self.constant else 1.0

    def error(self, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
        """Per output row, the sum of squared errors of ``t ~ w h + b`` over the rows (float64)."""
        w64 = w.astype(np.float64)
        # in the Gram's own precision: a float64 copy of a wide Gram would be the largest array here
        quad = np.einsum("oi,oi->o", (w.astype(self.gram.dtype) @ self.gram).astype(np.float64), w64)
        lin = np.einsum("oi,io->o", w64, self.cross.astype(np.float64))
        offset = (0.0 if b is None else b.astype(np.float64)) + w64 @ self.mean_h - self.mean_t
        return np.maximum(self.target_ss - 2 * lin + quad + self.n * offset**2, 0.0)


class Scratch:
    """Large arrays lent to one layer after another of a calibration run, by name.

    Why: on the VMs this was measured on, the first touch of freshly mapped memory costs ~2 s per
    150 MB (a 6144-wide float32 Gram), because the host backs it page by page; zeroing an array that is
    already mapped takes 0.03 s. A new array per layer paid that twice per MiniLM block.
    """

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def zeros(self, name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        """A zeroed array; the one lent last under ``name`` when its shape and dtype match (it must no
        longer be in use)."""
        a = self._arrays.pop(name, None)
        if a is not None and a.shape == shape and a.dtype == dtype:
            a.fill(0)
        else:
            del a  # before the new one: never both at once
            a = np.zeros(shape, dtype)
        self._arrays[name] = a
        return a


class GramAccumulator:
    """Adds chunks of rows ``h (n, width)``, ``t (n, outputs)``; :meth:`finish` gives the :class:`Moments`.

    ``dtype`` is the accumulation type of the two big matrices (float32 halves memory and time; the
    shift keeps it accurate), the means and sums of squares are float64. With ``scratch`` the Gram is
    the scratch's ``"gram"`` array (the previous layer's moments must be done with).
    """

    def __init__(self, width: int, outputs: int, dtype: type = np.float32, scratch: Scratch | None = None) -> None:
        self.width, self.outputs, self.dtype = width, outputs, dtype
        shape = (width, width)
        self.gram = np.zeros(shape, dtype) if scratch is None else scratch.zeros("gram", shape, dtype)
        self.cross = np.zeros((width, outputs), dtype)
        self.sum_h = np.zeros(width)
        self.sum_t = np.zeros(outputs)
        self.ss_t = np.zeros(outputs)
        self.shift_h: np.ndarray | None = None
        self.shift_t: np.ndarray | None = None
        self.n = 0

    def add(self, h: np.ndarray, t: np.ndarray) -> None:
        if h.shape[0] == 0:
            return
        if self.shift_h is None:
            self.shift_h = h.mean(axis=0, dtype=np.float64).astype(self.dtype)
            self.shift_t = t.mean(axis=0, dtype=np.float64).astype(self.dtype)
        hs = h.astype(self.dtype, copy=False) - self.shift_h
        ts = t.astype(self.dtype, copy=False) - self.shift_t
        from scipy.linalg import blas  # here, not at the top: expand without a sample needs no scipy

        # BLAS syrk into the Gram's lower triangle, in place: numpy's ``hs.T @ hs`` writes a new width^2
        # array and adds it, which took twice as long for chunks of ~1,300 MiniLM rows at width 6144
        syrk = blas.ssyrk if self.dtype == np.float32 else blas.dsyrk
        syrk(1.0, hs.T, beta=1.0, c=self.gram.T, lower=0, overwrite_c=1)
        self.cross += hs.T @ ts
        self.sum_h += hs.sum(axis=0, dtype=np.float64)
        self.sum_t += ts.sum(axis=0, dtype=np.float64)
        self.ss_t += np.einsum("no,no->o", ts, ts, dtype=np.float64)
        self.n += h.shape[0]

    def finish(self) -> Moments:
        """The centred moments; the accumulator's matrices are reused (do not add after this)."""
        if self.n == 0 or self.shift_h is None or self.shift_t is None:
            z = np.zeros
            return Moments(self.gram, self.cross, z(self.width), z(self.outputs), z(self.outputs), 0)
        from scipy.linalg import blas

        dh, dt = self.sum_h / self.n, self.sum_t / self.n  # mean of the shifted rows
        syr = blas.ssyr if self.dtype == np.float32 else blas.dsyr
        syr(-float(self.n), dh.astype(self.dtype), a=self.gram.T, lower=0, overwrite_a=1)
        set_upper_triangle(self.gram, mirror=True)
        self.cross -= (self.n * np.outer(dh, dt)).astype(self.dtype)
        ss = self.ss_t - self.n * dt**2
        return Moments(self.gram, self.cross, self.shift_h.astype(np.float64) + dh,
                       self.shift_t.astype(np.float64) + dt, np.maximum(ss, 0.0), self.n)


def set_upper_triangle(a: np.ndarray, mirror: bool, block: int = 512) -> None:
    """Overwrite what lies above the diagonal of the square ``a``, in place, a strip of rows at a time:
    with the lower triangle's mirror image (``mirror``, a Gram accumulated in one triangle), or with zeros
    (a triangular factor). The whole-array forms (``np.tril(a) + np.tril(a, -1).T``, ``np.tril(a)``) make
    temporaries of the Gram's size."""
    width = a.shape[0]
    for lo in range(0, width, block):
        hi = min(lo + block, width)
        diagonal = a[lo:hi, lo:hi]
        above = np.triu_indices(hi - lo, 1)
        diagonal[above] = diagonal.T[above] if mirror else 0
        a[lo:hi, hi:] = a[hi:, lo:hi].T if mirror else 0


@dataclass
class Rows:
    """The ``n`` rows themselves (``h (n, width)``, ``t (n, outputs)``, float64), for a sample too small
    for the Gram matrix to be worth its memory; same ``n`` and :meth:`error` as :class:`Moments`."""

    h: np.ndarray
    t: np.ndarray
    constant: int = 0  # as Moments.constant

    @property
    def n(self) -> int:
        return int(self.h.shape[0])

    def error(self, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
        """Per output row, the sum of squared errors of ``t ~ w h + b`` over the rows (float64)."""
        out = np.empty(w.shape[0])
        step = max(1, (1 << 22) // max(1, w.shape[1]))  # output rows at a time: no float64 copy of all of w
        for lo in range(0, w.shape[0], step):
            pred = self.h @ w[lo:lo + step].astype(np.float64).T
            if b is not None:
                pred += b[lo:lo + step].astype(np.float64)
            out[lo:lo + step] = ((self.t[:, lo:lo + step] - pred) ** 2).sum(axis=0)
        return out


def keeps_rows(n: int, width: int) -> bool:
    """Whether ``n`` rows of ``width`` inputs are solved as rows rather than through the Gram matrix:
    ``n (n + 1) / 2 <= width`` (the row-space solve is then cheaper than one CG iteration, and smaller)."""
    return n * (n + 1) // 2 <= width


class FitAccumulator:
    """Adds chunks of rows like :class:`GramAccumulator`; keeps them as :class:`Rows` while
    :func:`keeps_rows`, and folds them into a Gram accumulator beyond that."""

    def __init__(self, width: int, outputs: int, dtype: type = np.float32, scratch: Scratch | None = None) -> None:
        self.width, self.outputs, self.dtype, self.scratch = width, outputs, dtype, scratch
        self.h: list[np.ndarray] = []
        self.t: list[np.ndarray] = []
        self.n = 0
        self.gram: GramAccumulator | None = None

    def add(self, h: np.ndarray, t: np.ndarray) -> None:
        self.n += h.shape[0]
        if self.gram is None and not keeps_rows(self.n, self.width):
            self.gram = GramAccumulator(self.width, self.outputs, self.dtype, self.scratch)
            for kept_h, kept_t in zip(self.h, self.t):
                self.gram.add(kept_h, kept_t)
            self.h, self.t = [], []
        if self.gram is not None:
            self.gram.add(h, t)
        else:
            self.h.append(np.asarray(h, np.float64))
            self.t.append(np.asarray(t, np.float64))

    def finish(self) -> Moments | Rows:
        if self.gram is not None:
            return self.gram.finish()
        if not self.h:
            return Rows(np.zeros((0, self.width)), np.zeros((0, self.outputs)))
        return Rows(np.concatenate(self.h), np.concatenate(self.t))
