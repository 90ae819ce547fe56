"""Small ONNX models for the TVM tests: dense MLPs and their SparseLinear form (built with onnx.helper)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from neurorewrite.kernels.ell import index_dtype

# The static kernel estimates rank by the target's SIMD width and register count, so a test that asserts
# which kernel they pick names its CPU instead of taking the host's: with the host's, an AVX-512 machine
# (32 registers: larger column-blocked tiles) ranks near-ties the other way. Haswell's AVX2 runs on every
# x86 machine these tests run on; `needs_avx2` skips the others.
ESTIMATE_TARGET = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}


def needs_avx2() -> None:
    """Skip the calling test on a host that cannot run an AVX2 (Haswell) library."""
    import pytest

    from neurorewrite.kernels.gather_gemv import gather_lanes
    from neurorewrite.runtime.tvm_target import parse_target

    if not gather_lanes(parse_target("llvm")):
        pytest.skip("this host has no AVX2: it cannot run the Haswell library the estimate test builds")


def masked(rng: np.random.Generator, out_f: int, in_f: int, density: float) -> np.ndarray:
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    w[rng.random(w.shape) >= density] = 0.0
    return w


def _sparse_node(name: str, x: str, y: str, w: np.ndarray, b: np.ndarray | None, inits: list) -> onnx.NodeProto:
    mask = w != 0
    indptr = np.concatenate([[0], np.cumsum(mask.sum(axis=1))]).astype(np.int32)
    cols = np.nonzero(mask)[1].astype(index_dtype(w.shape[1]))
    names = [f"{name}.values", f"{name}.indices", f"{name}.indptr"]
    inits += [numpy_helper.from_array(a, n) for a, n in zip((w[mask], cols, indptr), names)]
    if b is not None:
        inits.append(numpy_helper.from_array(b, f"{name}.bias"))
        names.append(f"{name}.bias")
    return helper.make_node("SparseLinear", [x, *names], [y], name=name, domain="ai.neurorewrite",
                            in_features=w.shape[1], out_features=w.shape[0], format="csr")


def mlp(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray, sparse: bool,
        input_shape: list | None = None) -> onnx.ModelProto:
    """``y = W2 relu(W1 x + b1) + b2`` with (out, in) weights, as MatMul/Add or as two SparseLinear nodes."""
    d, o = w1.shape[1], w2.shape[0]
    inits: list = []
    if sparse:
        nodes = [_sparse_node("fc1", "x", "h", w1, b1, inits), helper.make_node("Relu", ["h"], ["r"]),
                 _sparse_node("fc2", "r", "y", w2, b2, inits)]
    else:
        inits = [numpy_helper.from_array(a, n) for a, n in
                 ((w1.T.copy(), "w1"), (b1, "b1"), (w2.T.copy(), "w2"), (b2, "b2"))]
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["h"]),
                 helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["m2"]),
                 helper.make_node("Add", ["m2", "b2"], ["y"])]
    shape = input_shape or ["batch", d]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*shape[:-1], o])], inits,
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("ai.neurorewrite", 1)] if sparse else [])
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


def reference(x: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> np.ndarray:
    return np.maximum(x @ w1.T + b1, 0) @ w2.T + b2
