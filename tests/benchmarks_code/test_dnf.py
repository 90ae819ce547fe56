"""The Boolean benchmark's DNF generator: formulas, balanced samples, and clause groups as a partition."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.dnf import balanced_sample, random_dnf
from neurorewrite.errors import InvalidOptionError
from neurorewrite.fpe import check_groups


@pytest.mark.parametrize("disjoint", [True, False])
def test_clause_groups_partition_the_inputs_and_keep_clauses_whole(disjoint):
    for seed in range(20):
        formula = random_dnf(32, 8, 3, np.random.default_rng(seed), disjoint=disjoint)
        groups = formula.clause_groups()
        check_groups(groups, 32, 2)  # raises unless a partition with >= alpha groups
        where = {v: g for g, members in enumerate(groups) for v in members}
        for clause in formula.variables:
            assert len({where[int(v)] for v in clause}) == 1


def test_samples_are_balanced_and_labelled_by_the_formula():
    rng = np.random.default_rng(0)
    formula = random_dnf(24, 4, 3, rng)
    x, y = balanced_sample(formula, 400, rng)
    assert x.shape == (400, 24) and set(np.unique(x)) <= {-1.0, 1.0}
    assert y.sum() == 200
    np.testing.assert_array_equal(y.astype(bool), formula(x))


def test_disjoint_clauses_need_enough_variables():
    with pytest.raises(InvalidOptionError, match="too small"):
        random_dnf(10, 8, 3, np.random.default_rng(0))
