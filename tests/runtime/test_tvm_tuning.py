"""MetaSchedule tuning into a database that the next compile reuses (slow: tuning spawns workers)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

from neurorewrite.runtime import compile, load
from tests.runtime.tvm_models import masked, mlp, reference


@pytest.mark.slow
def test_tuned_compile_matches_and_warm_compile_reuses_the_database(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w1, b1, w2, b2 = masked(rng, 32, 16, 0.3), np.zeros(32, np.float32), masked(rng, 8, 32, 0.3), np.zeros(8, np.float32)
    model = mlp(w1, b1, w2, b2, sparse=True, input_shape=[9, 16])
    calls: list[tuple[int, int]] = []
    _, first = compile(model, "llvm", output=tmp_path / "m.so", tune=True, trials=16,
                       progress=lambda done, total, label: calls.append((done, total)))
    assert first.tuned_tasks >= 2 and calls and calls[-1] == (16, 16)
    records = [json.loads(line) for line in (tmp_path / "m.so.tuning" / "database_tuning_record.json").read_text().splitlines()]
    measured = {task for task, (_, run_secs, *_rest) in records if max(run_secs) < 1.0}  # failures record 1e10 s
    assert len(measured) == first.tuned_tasks  # every task got at least one candidate that built and ran
    _, warm = compile(model, "llvm", output=tmp_path / "m.so", tune=True, trials=16)
    assert warm.tuned_tasks == 0
    x = rng.standard_normal((9, 16)).astype(np.float32)
    np.testing.assert_allclose(load(tmp_path / "m.so")(x)[0], reference(x, w1, b1, w2, b2), rtol=1e-4, atol=1e-4)
