"""Checks of option values: the one place that says what "an integer >= N" or "a finite number" means.

Each returns the value in its canonical type or raises :class:`InvalidOptionError` naming the option
(``name`` as the user wrote it: ``--alpha``, ``MEmeL option top_t``, ...) and the allowed range.
Booleans are refused where numbers are expected (``True`` is an ``int`` in Python, never a count).
"""

from __future__ import annotations

import math

import numpy as np

from neurorewrite.errors import InvalidOptionError


def integer_at_least(name: str, value: object, minimum: int, accept_whole_floats: bool = False) -> int:
    """``value`` as an int, if it is an integer >= ``minimum`` (with ``accept_whole_floats``, 2.0 counts as 2)."""
    if isinstance(value, (float, np.floating)) and accept_whole_floats and float(value).is_integer():
        value = int(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise InvalidOptionError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def finite_number(name: str, value: object, minimum: float | None = None, strictly_positive: bool = False,
                  hint: str = "") -> float:
    """``value`` as a float, if it is a finite number (>= ``minimum``; > 0 with ``strictly_positive``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(value)):
        raise InvalidOptionError(f"{name} must be a finite number{hint}, got {value!r}")
    if minimum is not None and float(value) < minimum:
        raise InvalidOptionError(f"{name} must be >= {minimum}{hint}, got {value}")
    if strictly_positive and float(value) <= 0:
        raise InvalidOptionError(f"{name} must be > 0{hint}, got {value}")
    return float(value)
