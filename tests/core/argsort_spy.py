"""A spy on a module's ``np.argsort``: how much a function sorts, without changing what it computes."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest


def record_argsort_sizes(monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> list[int]:
    """Give ``module`` a numpy whose ``argsort`` appends the size of every array it sorts to the returned
    list (one entry per call), and otherwise is numpy."""
    sizes: list[int] = []

    class Spy:
        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(np, name)

        @staticmethod
        def argsort(a, *args, **kwargs):  # noqa: ANN001, ANN205
            sizes.append(int(np.size(a)))
            return np.argsort(a, *args, **kwargs)

    monkeypatch.setattr(module, "np", Spy())
    return sizes
