"""Option checks: one definition of "an integer >= N" and "a finite number", with the option named."""

from __future__ import annotations

import math

import numpy as np
import pytest

from neurorewrite.checks import finite_number, integer_at_least
from neurorewrite.errors import InvalidOptionError


@pytest.mark.parametrize("value", [True, 1.5, "3", None, -1, np.bool_(True)])
def test_integer_at_least_refuses(value) -> None:
    with pytest.raises(InvalidOptionError, match=r"--seed must be an integer >= 0, got"):
        integer_at_least("--seed", value, 0)


def test_integer_at_least_accepts() -> None:
    assert integer_at_least("--seed", 0, 0) == 0 and integer_at_least("--seed", np.int64(7), 0) == 7
    assert integer_at_least("--alpha", 2.0, 1, accept_whole_floats=True) == 2
    with pytest.raises(InvalidOptionError):
        integer_at_least("--alpha", 2.0, 1)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, True, "1e-3", None])
def test_finite_number_refuses(value) -> None:
    with pytest.raises(InvalidOptionError, match="--lr must be a finite number"):
        finite_number("--lr", value)


def test_finite_number_bounds() -> None:
    assert finite_number("--lr", 1e-3, strictly_positive=True) == 1e-3
    with pytest.raises(InvalidOptionError, match="--lr must be > 0"):
        finite_number("--lr", 0.0, strictly_positive=True)
    with pytest.raises(InvalidOptionError, match="--weight-decay must be >= 0"):
        finite_number("--weight-decay", -1, minimum=0)
