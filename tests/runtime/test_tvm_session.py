"""TvmSession: the TVM libraries behind the onnxruntime-session interface the benchmark harness uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

from neurorewrite.errors import DataError
from neurorewrite.runtime.bench import bench_sessions
from neurorewrite.runtime.ort import ort_session
from neurorewrite.runtime.tvm_session import input_specs, static_shape, tvm_session
from tests.runtime.tvm_models import masked, mlp, reference


def test_one_library_per_batch_matches_the_reference_and_runs_in_the_harness(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w1, b1 = masked(rng, 40, 24, 0.3), rng.standard_normal(40).astype(np.float32)
    w2, b2 = masked(rng, 12, 40, 0.3), rng.standard_normal(12).astype(np.float32)
    path = tmp_path / "m.onnx"
    path.write_bytes(mlp(w1, b1, w2, b2, sparse=True).SerializeToString())
    session = tvm_session(path, (1, 9), threads=1, folder=tmp_path)
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("x", ["batch", 24])]
    for batch in (1, 9):  # the gather kernel (batch 1) and the row-layout kernel (batch >= 8)
        x = rng.standard_normal((batch, 24)).astype(np.float32)
        np.testing.assert_allclose(session.run(None, {"x": x})[0], reference(x, w1, b1, w2, b2), rtol=1e-4, atol=1e-4)
    with pytest.raises(DataError, match="batch 4"):
        session.run(None, {"x": np.zeros((4, 24), np.float32)})
    dense = ort_session(mlp(w1, b1, w2, b2, sparse=False), providers=["CPUExecutionProvider"], threads=1)
    result = bench_sessions({"dense": dense, "tvm": session}, (1, 9), repeats=2, warmup=1)
    assert result.median[("tvm", 9)] > 0


def test_one_symbolic_library_serves_every_batch(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    w1, b1 = masked(rng, 40, 24, 0.3), rng.standard_normal(40).astype(np.float32)
    w2, b2 = masked(rng, 12, 40, 0.3), rng.standard_normal(12).astype(np.float32)
    path = tmp_path / "m.onnx"
    path.write_bytes(mlp(w1, b1, w2, b2, sparse=True).SerializeToString())
    session = tvm_session(path, (1, 9), threads=1, folder=tmp_path, symbolic=True)
    assert sorted(p.name for p in tmp_path.glob("*.so")) == ["m.any.so"]
    for batch in (1, 4, 9, 33):
        x = rng.standard_normal((batch, 24)).astype(np.float32)
        np.testing.assert_allclose(session.run(None, {"x": x})[0], reference(x, w1, b1, w2, b2), rtol=1e-4, atol=1e-4)


def test_static_shape_fills_batch_then_sequence() -> None:
    model = mlp(*(np.ones(s, np.float32) for s in ((4, 3), (4,), (2, 4), (2,))), sparse=False, input_shape=["b", "s", 3])
    (spec,) = input_specs(model)
    assert static_shape(spec, 5) == [5, 16, 3]
