"""Real models of real families, built from their transformers configs once per session (see hf.py)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from tests.families.hf import Families

    # under pytest-xdist the parent of a worker's base directory is this run's, shared by its workers
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return Families(root / "neurorewrite-families")
