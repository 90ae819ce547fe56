"""The inputs of a refit layer that take one value on every row: children the prune left without an input.

Under the global magnitude prune most children other than a parent's lead keep no input weight (MiniLM
at alpha 4: 1,600-2,100 of the 6,144 children of a block have one). Such a child's activation is
``act(b)`` whatever the input, so in the refit of the next layer (:mod:`neurorewrite.fpe.refit`) its
column is a constant: a zero row and column of the centred Gram matrix, whose weight only shifts the
output by ``weight * value``. The Gram, the support choice (:mod:`neurorewrite.fpe.support`) and the
solve therefore run on the other, *active*, columns only (their cost grows with the square and the cube
of the width), and :class:`ConstantInputs` maps between the layer's width and the active part.

Invariant: the refit on the active columns gives the function the full-width refit gives (in exact
arithmetic), and every row keeps exactly its nonzero count:

- a row with a bias takes the constant columns' shift into its fitted bias (``offset``); the full-width
  ridge keeps the weights of constant columns at their current value, and so does :meth:`widen`;
- a row without a bias cannot take the shift, so :func:`constant_inputs` declines where a constant
  value is nonzero and some row has no bias;
- a row whose count exceeds the active width keeps its surplus on constant columns it already had (their
  values kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ConstantInputs:
    """Of ``width`` inputs, the ``columns`` (sorted) that take ``values`` on every row."""

    columns: np.ndarray
    values: np.ndarray  # float64, one per column
    width: int

    @property
    def active(self) -> np.ndarray:
        """The other columns, sorted: those the refit fits."""
        keep = np.ones(self.width, bool)
        keep[self.columns] = False
        return np.flatnonzero(keep)

    def offset(self, w: np.ndarray) -> np.ndarray:
        """Per row of the full-width ``w``, what the constant columns add to its output (float64)."""
        return w[:, self.columns].astype(np.float64) @ self.values

    def matches(self, rows: np.ndarray) -> bool:
        """Whether every one of ``rows (n, width)`` holds the constant values, to a relative ``1e-6`` (an
        activation's vector and scalar code paths may differ in the last bit)."""
        found = np.take(rows, self.columns, axis=1)  # take: 4x the speed of fancy indexing
        values = self.values.astype(found.dtype)
        return bool((np.abs(found - values) <= (1e-6 * (1.0 + np.abs(self.values))).astype(found.dtype)).all())

    def groups(self, size: int) -> np.ndarray:
        """The groups of ``size`` adjacent full-width columns (a parent's children) as indices into the
        active columns, ``-1`` for a constant one; groups with no active column are left out (the
        preconditioner's ``groups`` array, :func:`neurorewrite.fpe.refit.group_columns`)."""
        position = np.full(self.width, -1)
        position[self.active] = np.arange(self.width - len(self.columns))
        grouped = position[np.arange(self.width).reshape(-1, size)]
        return grouped[(grouped >= 0).any(axis=1)]

    def widen(self, w_active: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Full-width rows: ``w_active`` on the active columns and, on the constant ones, each row's surplus
        of ``w``'s nonzero count over ``w_active``'s, taken from the constant columns where ``w`` is
        nonzero, with its values. ``w_active`` holds at least ``w``'s active nonzeros or all active columns
        (a support chosen again keeps ``min(count, active width)``), so those columns are enough."""
        out = np.zeros_like(w)
        out[:, self.active] = w_active
        constant = w[:, self.columns]
        surplus = np.count_nonzero(w, axis=1) - np.count_nonzero(w_active, axis=1)
        for o in np.flatnonzero(surplus > 0):
            kept = np.flatnonzero(constant[o])[: surplus[o]]
            if len(kept) < surplus[o]:
                raise ValueError(f"row {o} needs {surplus[o]} constant columns and had {len(kept)}")
            out[o, self.columns[kept]] = constant[o, kept]
        return out


def constant_inputs(empty: np.ndarray, values: np.ndarray, every_row_has_bias: bool) -> ConstantInputs | None:
    """The constant inputs: the ``empty`` ones (no weight feeds them), of ``values`` (one row of the inputs);
    None where there are none, or where a row without a bias could not take their shift (a nonzero value)."""
    columns = np.flatnonzero(empty)
    constant = values[columns].astype(np.float64)
    if columns.size == 0 or (not every_row_has_bias and constant.any()):
        return None
    return ConstantInputs(columns, constant, len(empty))
