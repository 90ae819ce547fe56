"""CompiledModel's calls: staged inputs and copied outputs (tvm_run.py) never leak memory between calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

from neurorewrite.runtime import compile, load  # noqa: E402
from tests.runtime.tvm_models import masked, mlp, reference  # noqa: E402


def test_each_call_returns_its_own_arrays_for_any_input_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    w1, b1 = masked(rng, 40, 24, 0.3), rng.standard_normal(40).astype(np.float32)
    w2, b2 = masked(rng, 12, 40, 0.3), rng.standard_normal(12).astype(np.float32)
    compile(mlp(w1, b1, w2, b2, sparse=True), "llvm", output=tmp_path / "any.so", kernel_choice="estimate")
    model = load(tmp_path / "any.so")
    x1, x2 = (rng.standard_normal((3, 24)).astype(np.float32) for _ in range(2))
    y1 = model(x1)[0]
    kept = y1.copy()
    y2 = model(x2)[0]
    np.testing.assert_array_equal(y1, kept)  # the second call did not write into the first result
    np.testing.assert_allclose(y2, reference(x2, w1, b1, w2, b2), rtol=1e-4, atol=1e-4)
    x2[:] = 0  # the caller's array is not the library's: changing it changes no later call
    y1[:] = 0  # nor is a result: writing into it changes no later call
    np.testing.assert_allclose(model(x1)[0], kept, rtol=1e-6, atol=1e-6)
    # inputs off the 64-byte alignment the kernels may assume, strided, float64, then another batch size
    unaligned = np.empty(3 * 24 + 1, np.float32)[1:].reshape(3, 24)
    unaligned[:] = x1
    strided = np.asfortranarray(x1)
    for x in (unaligned, strided, x1.astype(np.float64)):
        np.testing.assert_allclose(model(x)[0], kept, rtol=1e-6, atol=1e-6)
    x5 = rng.standard_normal((5, 24)).astype(np.float32)
    np.testing.assert_allclose(model(x5)[0], reference(x5, w1, b1, w2, b2), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model(x1)[0], kept, rtol=1e-6, atol=1e-6)
