"""Folding what fixed input shapes fix (passes/fold_static.py): the outputs for inputs of those shapes are
the same and the shape arithmetic is gone (Hugging Face exports: tests/families/test_families_tvm.py); a Shape whose value depends on input values (after a
NonZero) folds nothing; the input is not modified."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import neurorewrite
from neurorewrite.passes.fold_static import _shape_stand_ins, fold_static_values
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.runtime.ort import ort_session
from tests.conftest import run_model


def shape_model() -> onnx.ModelProto:
    """y = flat(x) + flat(x + ones(shape(x))), ``flat`` a Reshape to ``concat(shape(x)[:1], [-1])``: the
    target and the ones are fixed by x's shape alone."""
    consts = {"zero": np.array([0], np.int64), "one": np.array([1], np.int64), "rest": np.array([-1], np.int64)}
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Slice", ["s", "zero", "one"], ["b"]),
             helper.make_node("Concat", ["b", "rest"], ["target"], axis=0), helper.make_node("Reshape", ["x", "target"], ["flat"]),
             helper.make_node("ConstantOfShape", ["s"], ["ones"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("Add", ["x", "ones"], ["x1"]), helper.make_node("Reshape", ["x1", "target"], ["flat1"]),
             helper.make_node("Add", ["flat", "flat1"], ["y"])]
    graph = helper.make_graph(nodes, "shapes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 12])],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_shape_arithmetic_becomes_constants_and_the_outputs_stay() -> None:
    model = shape_model()
    before = model.SerializeToString()
    folded, report = fold_static_values(model, {"x": [2, 3, 4]})
    assert model.SerializeToString() == before  # the input is not modified
    assert (report.tensors, report.nodes) == (2, 4)  # target and ones; Shape, Slice, Concat, ConstantOfShape
    assert [n.op_type for n in folded.graph.node] == ["Reshape", "Add", "Reshape", "Add"]
    onnx.checker.check_model(folded, full_check=True)
    x = {"x": np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)}
    np.testing.assert_array_equal(run_model(folded, x)[0], run_model(model, x)[0])


def nonzero_model() -> onnx.ModelProto:
    """y = x * Size(NonZero(Relu(x))): the Size depends on how many entries of x are positive."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("NonZero", ["r"], ["nz"]),
             helper.make_node("Size", ["nz"], ["count"]), helper.make_node("Cast", ["count"], ["c"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x", "c"], ["y"])]
    graph = helper.make_graph(nodes, "nz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_value_that_depends_on_the_inputs_is_not_frozen() -> None:
    model = nonzero_model()
    same, report = fold_static_values(model, {"x": [2, 8]})
    assert same is model and not report.modified
    assert report.declined == "c depends on the input values, not only on their shapes"


def test_a_model_without_shape_arithmetic_is_returned_as_is() -> None:
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    same, report = fold_static_values(model, {"x": [2, 4]})
    assert same is model and report.declined == "no tensor is fixed by the input shapes alone"


def test_a_large_fixed_tensor_stays_computed_from_folded_inputs(monkeypatch) -> None:
    """Over MAX_FOLDED_BYTES (here 64 bytes: the 96-byte ones, not the 16-byte target) a node stays; the
    shape it reads becomes a constant."""
    import neurorewrite.passes.fold_static as fold_static

    monkeypatch.setattr(fold_static, "MAX_FOLDED_BYTES", 64)
    model = shape_model()
    folded, report = fold_static_values(model, {"x": [2, 3, 4]})
    assert [n.op_type for n in folded.graph.node] == ["Reshape", "ConstantOfShape", "Add", "Reshape", "Add"]
    assert (report.tensors, report.nodes) == (2, 3)  # the target and the shape; Shape, Slice, Concat dropped
    x = {"x": np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)}
    np.testing.assert_array_equal(run_model(folded, x)[0], run_model(model, x)[0])


def test_a_sparse_model_folds_without_carrying_its_sparse_weights_into_onnxruntime(capfd) -> None:
    """The runs that find the fixed values stand zeros in for each SparseLinear: its weights stay out of
    that session (onnxruntime warned about every unread one, dozens of lines per compile --shape)."""
    rng = np.random.default_rng(0)
    consts = {"zero": np.array([0], np.int64), "one": np.array([1], np.int64), "rest": np.array([-1], np.int64),
              "w1": rng.standard_normal((12, 8)).astype(np.float32), "b1": rng.standard_normal(8).astype(np.float32),
              "w2": rng.standard_normal((8, 3)).astype(np.float32), "b2": rng.standard_normal(3).astype(np.float32)}
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Slice", ["s", "zero", "one"], ["b"]),
             helper.make_node("Concat", ["b", "rest"], ["target"], axis=0), helper.make_node("Reshape", ["x", "target"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["h"]),
             helper.make_node("Relu", ["h"], ["a"]), helper.make_node("MatMul", ["a", "w2"], ["m2"]),
             helper.make_node("Add", ["m2", "b2"], ["y"])]
    graph = helper.make_graph(nodes, "sparse", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    sparse, _ = neurorewrite.expand(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), alpha=4,
                                    format="sparse")
    weights = {name for node in sparse.graph.node if node.domain == "ai.neurorewrite" for name in node.input[1:]}
    assert weights
    stand_in = _shape_stand_ins(sparse, GraphIndex.build(sparse.graph))
    assert not weights & {t.name for t in stand_in.graph.initializer}
    capfd.readouterr()
    folded, report = fold_static_values(sparse, {"x": [2, 3, 4]})
    assert report.tensors == 1 and "Removing initializer" not in capfd.readouterr().err
    x = {"x": rng.standard_normal((2, 3, 4)).astype(np.float32)}
    np.testing.assert_allclose(ort_session(folded).run(None, x)[0], ort_session(sparse).run(None, x)[0], rtol=1e-6)
