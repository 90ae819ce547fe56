"""Random DNF formulas and balanced samples for the FPE Boolean benchmark.

A formula over ``n`` variables is an OR of ``c`` clauses, each an AND of ``k`` literals (a variable or
its negation; the variables of one clause are distinct). By default clauses use disjoint variables,
as in the paper's collision analysis (two clauses are ``2k`` distinct literals); ``disjoint=False``
lets clauses share variables. Inputs are ``{-1, +1}`` vectors. Samples are balanced: half satisfy the
formula (a random clause is forced true, the rest of the input is random), half do not (random inputs
that satisfy no clause).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neurorewrite.errors import InvalidOptionError


@dataclass(frozen=True)
class DNF:
    n: int
    variables: np.ndarray  # (c, k) variable index of each literal
    signs: np.ndarray  # (c, k) +1 for x, -1 for not x

    def clauses_true(self, x: np.ndarray) -> np.ndarray:
        """(N, c) whether each clause holds for each input."""
        return np.all(x[:, self.variables] * self.signs > 0, axis=2)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.clauses_true(x).any(axis=1)

    def clause_groups(self) -> list[list[int]]:
        """A partition of the inputs for ``split="groups"`` in which every clause stays whole.

        The variables of each clause form one group; clauses that share a variable are merged into one
        group (otherwise the shared variable would sit with one clause only and the other clause could be
        cut between children). Every unused variable is a group of its own.
        """
        owner = np.arange(self.n)  # union-find over variables

        def root(v: int) -> int:
            while owner[v] != v:
                owner[v] = owner[owner[v]]
                v = int(owner[v])
            return v

        for clause in self.variables:
            for v in clause[1:]:
                owner[root(int(v))] = root(int(clause[0]))
        groups: dict[int, list[int]] = {}
        for v in range(self.n):
            groups.setdefault(root(v), []).append(v)
        return list(groups.values())


def random_dnf(n: int, clauses: int, k: int, rng: np.random.Generator, disjoint: bool = True) -> DNF:
    """A random formula; with ``disjoint`` no two clauses share a variable (needs ``n >= clauses * k``)."""
    if k > n:
        raise InvalidOptionError(f"--k {k} is larger than --n {n}: a clause needs k distinct variables")
    if disjoint:
        if clauses * k > n:
            raise InvalidOptionError(
                f"--n {n} is too small for {clauses} disjoint clauses of {k} literals: "
                f"use --n >= {clauses * k} or --shared-variables"
            )
        variables = rng.permutation(n)[: clauses * k].reshape(clauses, k)
    else:
        variables = np.stack([rng.choice(n, size=k, replace=False) for _ in range(clauses)])
    signs = rng.choice(np.array([-1, 1]), size=(clauses, k))
    return DNF(n, variables, signs)


def balanced_sample(formula: DNF, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``count`` inputs (float32, N x n) and labels (int64), half positive, shuffled."""
    positives = count // 2
    x_pos = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(positives, formula.n))
    chosen = rng.integers(len(formula.variables), size=positives)
    rows = np.arange(positives)[:, None]
    x_pos[rows, formula.variables[chosen]] = formula.signs[chosen]
    negatives: list[np.ndarray] = []
    need = count - positives
    while need > 0:
        x = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(4 * need + 64, formula.n))
        x = x[~formula(x)][:need]
        negatives.append(x)
        need -= len(x)
    x_all = np.concatenate([x_pos, *negatives])
    y_all = np.concatenate([np.ones(positives, np.int64), np.zeros(count - positives, np.int64)])
    order = rng.permutation(count)
    return x_all[order], y_all[order]
