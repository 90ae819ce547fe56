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

    return Families(tmp_path_factory.mktemp("families"))
