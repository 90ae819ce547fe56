"""SparseLinear models run in plain onnxruntime: both standard-op conversions match the numpy reference."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from neurorewrite.errors import DataError, InvalidOptionError, ModelLoadError
from neurorewrite.ops import DOMAIN, csr_arrays, sparse_linear_reference
from neurorewrite.runtime.ort import ort_session
from neurorewrite.passes.sparse_to_standard import has_sparse_ops, to_standard_ops


def sparse_model(w: np.ndarray, b: np.ndarray | None, rank3: bool = False, indptr_override=None) -> onnx.ModelProto:
    values, indices, indptr = csr_arrays(w)
    if indptr_override is not None:
        indptr = indptr_override
    inits = [numpy_helper.from_array(a, n) for a, n in ((values, "v"), (indices, "i"), (indptr, "p"))]
    inputs = ["x", "v", "i", "p"]
    if b is not None:
        inits.append(numpy_helper.from_array(b, "b"))
        inputs.append("b")
    node = helper.make_node("SparseLinear", inputs, ["y"], domain=DOMAIN, in_features=w.shape[1], out_features=w.shape[0], format="csr")
    lead = ["N", "T"] if rank3 else ["N"]
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, lead + [w.shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, lead + [w.shape[0]])], initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])


def _weights(out: int, inp: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, inp)).astype(np.float32)
    w[rng.random(w.shape) < 0.7] = 0
    w[3] = 0  # an empty row
    return w, rng.standard_normal(out).astype(np.float32)


@pytest.mark.parametrize("method", ["densify", "gather"])
@pytest.mark.parametrize("rank3", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_conversion_matches_reference(method: str, rank3: bool, with_bias: bool) -> None:
    w, b = _weights(20, 300)  # 300 inputs: int16 indices
    model = sparse_model(w, b if with_bias else None, rank3)
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(1).standard_normal((2, 3, 300) if rank3 else (4, 300)).astype(np.float32)
    values, indices, indptr = csr_arrays(w)
    want = sparse_linear_reference(x, values, indices, indptr, b if with_bias else None, in_features=300)
    np.testing.assert_allclose(want, x @ w.T + (b if with_bias else 0), rtol=1e-5, atol=1e-5)
    got = ort_session(model, providers=["CPUExecutionProvider"], sparse_method=method).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    standard = to_standard_ops(model, method)
    assert not has_sparse_ops(standard) and all(o.domain != DOMAIN for o in standard.opset_import)
    assert has_sparse_ops(model)  # the input model is untouched


def test_session_from_a_path(tmp_path) -> None:
    w, b = _weights(6, 10)
    path = tmp_path / "s.onnx"
    onnx.save(sparse_model(w, b), str(path))
    x = np.ones((2, 10), np.float32)
    got = ort_session(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ w.T + b, rtol=1e-5, atol=1e-5)


def test_bad_csr_is_a_load_error() -> None:
    w, b = _weights(6, 10)
    broken = np.array([0, 1, 2, 3, 4, 5, 999], np.int16)  # indptr does not end at nnz
    with pytest.raises(ModelLoadError, match="inconsistent CSR arrays"):
        ort_session(sparse_model(w, b, indptr_override=broken), providers=["CPUExecutionProvider"])


def test_unknown_method_and_input_width() -> None:
    w, b = _weights(6, 10)
    with pytest.raises(InvalidOptionError, match="sparse method"):
        to_standard_ops(sparse_model(w, b), "bsr")
    values, indices, indptr = csr_arrays(w)
    with pytest.raises(DataError, match="has 9 features, the layer expects 10"):
        sparse_linear_reference(np.ones((2, 9), np.float32), values, indices, indptr, b, in_features=10)
