"""The ELL packing and the TensorIR sparse-linear kernel against numpy, both layouts, llvm."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

import tvm

from neurorewrite.errors import ModelLoadError
from neurorewrite.kernels.ell import ell_from_csr, ell_from_dense, index_dtype
from neurorewrite.kernels.sparse_linear import EllShape, ell_linear_func, schedule_default
from neurorewrite.runtime.tvm_target import parse_target


def _weight(rng: np.random.Generator, out_f: int, in_f: int, density: float) -> np.ndarray:
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    w[rng.random(w.shape) >= density] = 0.0
    return w


def test_ell_round_trips_a_dense_pattern_including_empty_rows() -> None:
    w = _weight(np.random.default_rng(1), 13, 40, 0.2)
    w[3] = 0.0
    ell = ell_from_dense(w)
    assert ell.width == int((w != 0).sum(axis=1).max())
    assert ell.indices.dtype == np.int16
    np.testing.assert_array_equal(ell.to_dense(), w)
    np.testing.assert_array_equal(ell.transposed().values.T, ell.values)


def test_ell_rejects_a_broken_row_pointer() -> None:
    with pytest.raises(ModelLoadError, match="inconsistent CSR arrays.*indptr"):
        ell_from_csr(np.ones(3), np.array([0, 1, 2]), np.array([0, 2, 1, 3]), 4)
    with pytest.raises(ModelLoadError, match="inconsistent CSR arrays.*outside"):
        ell_from_csr(np.ones(2), np.array([0, 9]), np.array([0, 1, 2]), 4)
    assert index_dtype(40000) == "int32"


@pytest.mark.parametrize("n", [1, 3, 16])
def test_kernel_matches_numpy(n: int) -> None:
    rng = np.random.default_rng(n)
    w = _weight(rng, 48, 20, 0.3)
    ell = ell_from_dense(w)
    shape = EllShape(n, 20, 48, ell.width, str(ell.indices.dtype))
    if shape.layout == "cols":
        ell = ell.transposed()
    target = parse_target("llvm")
    func = schedule_default(ell_linear_func(shape), target).with_attr("global_symbol", "ell_linear")
    lib = tvm.compile(tvm.IRModule({"ell_linear": func}), target=target)
    xt = rng.standard_normal((20, n)).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros((48, n), np.float32))
    lib["ell_linear"](*(tvm.runtime.tensor(a) for a in (xt, ell.values, ell.indices)), out)
    np.testing.assert_allclose(out.numpy(), w @ xt, rtol=1e-4, atol=1e-5)
    assert shape.layout == ("rows" if n >= 8 else "cols")


@pytest.mark.parametrize("layout", ["rows", "cols"])
def test_symbolic_batch_kernel_in_both_layouts(layout: str) -> None:
    rng = np.random.default_rng(4)
    w = _weight(rng, 48, 20, 0.3)
    ell = ell_from_dense(w)
    shape = EllShape(None, 20, 48, ell.width, str(ell.indices.dtype), layout)
    if layout == "cols":
        ell = ell.transposed()
    target = parse_target("llvm")
    func = schedule_default(ell_linear_func(shape), target).with_attr("global_symbol", "ell_linear")
    lib = tvm.compile(tvm.IRModule({"ell_linear": func}), target=target)
    for n in (1, 5, 19):
        xt = rng.standard_normal((20, n)).astype(np.float32)
        out = tvm.runtime.tensor(np.zeros((48, n), np.float32))
        lib["ell_linear"](*(tvm.runtime.tensor(a) for a in (xt, ell.values, ell.indices)), out)
        np.testing.assert_allclose(out.numpy(), w @ xt, rtol=1e-4, atol=1e-5)
