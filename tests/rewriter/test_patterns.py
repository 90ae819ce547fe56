"""The declared patterns: matching backwards from a tensor, bindings, alternatives, reasons."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from neurorewrite.rewriter.activations import GELU_ERF, GELU_TANH, SILU, activation_label
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.linear import MATMUL_ADD
from neurorewrite.rewriter.patterns import Const, Maybe, Op, Var, any_of, match


def graph(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], outputs: list[str]) -> GraphIndex:
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return GraphIndex.build(g)


def scalar(v: float) -> np.ndarray:
    return np.array(v, np.float32)


def test_matmul_add_binds_in_either_operand_order() -> None:
    w, b = np.ones((4, 3), np.float32), np.ones(3, np.float32)
    for order in (["mm", "b"], ["b", "mm"]):
        index = graph([helper.make_node("MatMul", ["x", "w"], ["mm"], name="lin"), helper.make_node("Add", order, ["y"], name="add")],
                      {"w": w, "b": b}, ["y"])
        m = match(index, MATMUL_ADD, "y")
        assert m and (m["x"], m["w"], m["b"]) == ("x", "w", "b") and m.named == {"add": 1, "linear": 0}


def test_a_failed_match_says_why() -> None:
    index = graph([helper.make_node("Relu", ["x"], ["y"], name="r")], {}, ["y"])
    m = match(index, MATMUL_ADD, "y")
    assert not m and m.reason is not None and "comes from Relu node r, not Add" in m.reason.message


def test_inner_nodes_must_feed_only_the_pattern() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="lin"), helper.make_node("Add", ["mm", "b"], ["y"], name="add")]
    index = graph(nodes, {"w": np.ones((4, 3), np.float32), "b": np.ones(3, np.float32)}, ["y", "mm"])
    m = match(index, MATMUL_ADD, "y")
    assert not m and "used outside the pattern" in m.reason.message


def test_a_variable_binds_one_tensor() -> None:
    same = Op("Mul", Var("a"), Var("a"))
    index = graph([helper.make_node("Mul", ["x", "x"], ["sq"]), helper.make_node("Mul", ["x", "sq"], ["y"])], {}, ["sq", "y"])
    assert match(index, same, "sq")
    assert not match(index, same, "y")


def test_const_checks_value_and_maybe_accepts_absence() -> None:
    index = graph([helper.make_node("Mul", ["x", "h"], ["y"]), helper.make_node("Clip", ["x", "", "hi"], ["z"])],
                  {"h": scalar(0.5), "hi": scalar(6.0)}, ["y", "z"])
    assert match(index, Op("Mul", Var("x"), Const(value=0.5)), "y")
    assert not match(index, Op("Mul", Var("x"), Const(value=0.25)), "y")
    assert match(index, Op("Clip", Var("x"), Maybe(Const()), Maybe(Const(value=6.0))), "z")
    assert not match(index, Op("Clip", Var("x"), Const(), Const()), "z")


def test_any_of_tries_each_alternative_from_a_clean_state() -> None:
    index = graph([helper.make_node("Pow", ["x", "three"], ["y"])], {"three": scalar(3.0)}, ["y"])
    cube = any_of(Op("Mul", Var("x"), Var("x")), Op("Pow", Var("x"), Const(value=3.0)))
    m = match(index, cube, "y")
    assert m and m.nodes == [0]


def _gelu_tanh_gemma_ts() -> GraphIndex:
    """Gemma's TorchScript GELU-tanh: x^3 as two Muls, constants first."""
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["x2"]), helper.make_node("Mul", ["x", "x2"], ["x3"]),
        helper.make_node("Mul", ["c", "x3"], ["cx3"]), helper.make_node("Add", ["x", "cx3"], ["inner"]),
        helper.make_node("Mul", ["k", "inner"], ["scaled"]), helper.make_node("Tanh", ["scaled"], ["t"]),
        helper.make_node("Add", ["one", "t"], ["t1"]), helper.make_node("Mul", ["x", "t1"], ["xt"]),
        helper.make_node("Mul", ["half", "xt"], ["y"]),
    ]
    inits = {"c": scalar(0.044715), "k": scalar(0.7978846), "one": scalar(1.0), "half": scalar(0.5)}
    return graph(nodes, inits, ["y"])


def test_declared_activation_decompositions() -> None:
    index = _gelu_tanh_gemma_ts()
    m = match(index, GELU_TANH, "y")
    assert m and m["x"] == "x" and len(m.nodes) == 9
    assert not match(index, GELU_ERF, "y") and not match(index, SILU, "y")
    assert activation_label(index, "x", "y", list(range(9))) == "Gelu(tanh)"
    silu = graph([helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["s", "x"], ["y"])], {}, ["y"])
    assert activation_label(silu, "x", "y", [0, 1]) == "SiLU"
    odd = graph([helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Add", ["s", "x"], ["y"])], {}, ["y"])
    assert activation_label(odd, "x", "y", [0, 1]) == "elementwise(Add,Sigmoid)"
