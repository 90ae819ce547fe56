"""The TVM import runs erf (an ONNX ``Erf``, and the exact ``Gelu``) with TOPI's polynomial erf instead of a
scalar libm call per element; the library still matches onnxruntime. The tanh-approximated Gelu keeps
the frontend's conversion. A ConstantOfShape of a constant shape imports as a constant."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("tvm")

from neurorewrite.runtime import compile, load, ort_session  # noqa: E402
from neurorewrite.runtime.tvm_import import import_model  # noqa: E402
from neurorewrite.runtime.tvm_target import parse_target  # noqa: E402


def activation_model(op: str, **attrs: object) -> onnx.ModelProto:
    """x (n, 16) -> MatMul -> ``op`` -> MatMul -> y (n, 4)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 24)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((24, 4)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node(op, ["h"], ["a"], **attrs),
             helper.make_node("MatMul", ["a", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "act", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)


@pytest.mark.parametrize(("op", "attrs", "fast"), [
    ("Erf", {}, True), ("Gelu", {}, True), ("Gelu", {"approximate": "tanh"}, False),
])
def test_erf_runs_as_a_polynomial_and_matches_onnxruntime(tmp_path: Path, op: str, attrs: dict, fast: bool) -> None:
    model = activation_model(op, **attrs)
    mod, _ = import_model(model, {"x": [5, 16]}, parse_target("llvm"), scheduled=True, measure=False)
    assert ("fast_erf" in mod.script()) == fast
    compile(model, "llvm", output=tmp_path / "a.so", shapes={"x": [5, 16]})
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32) * 2
    want = ort_session(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(load(tmp_path / "a.so")(x)[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed: CUDA sources cannot be built")
@pytest.mark.parametrize("op", ["Erf", "Gelu"])
def test_the_polynomial_erf_builds_for_cuda(tmp_path: Path, op: str) -> None:
    """The CUDA build schedules the polynomial as it does any element-wise function (no GPU needed)."""
    _, report = compile(activation_model(op), {"kind": "cuda", "arch": "sm_80"}, output=tmp_path / "g.so",
                        shapes={"x": [5, 16]})
    assert '"cuda"' in report.target and (tmp_path / "g.so").exists()


def test_a_scalar_constant_of_shape_imports(tmp_path: Path) -> None:
    """ConstantOfShape of an empty shape is a scalar (GPT-2's TorchScript export writes one for its attention
    mask); the frontend's conversion broadcasts the value to ``()`` and fails, the import makes it a constant."""
    model = activation_model("Relu")
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(np.zeros(0, np.int64), "no_dims"))
    graph.node.append(helper.make_node("ConstantOfShape", ["no_dims"], ["half"],
                                       value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])))
    graph.node.append(helper.make_node("Mul", ["y", "half"], ["z"]))
    graph.output[0].name = "z"
    compile(model, "llvm", output=tmp_path / "c.so")
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    want = ort_session(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(load(tmp_path / "c.so")(x)[0], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
