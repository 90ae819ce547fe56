"""The lifter runs an activation written as a chain of elementwise nodes as one torch op, with the same
outputs as onnxruntime, and only when nothing else reads a tensor inside the chain."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from neurorewrite.models.onnx_module import OnnxGraph
from neurorewrite.runtime.ort import ort_session


def _const(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, np.float32), name)


def activation_nodes(kind: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """``h -> act -> a`` as exporters write it; the inner tensors are ``t0, t1, ...``."""
    if kind == "gelu":  # torch.onnx, opset < 20: x * (erf(x / sqrt2) + 1) * 0.5
        return [helper.make_node("Div", ["h", "sqrt2"], ["t0"]), helper.make_node("Erf", ["t0"], ["t1"]),
                helper.make_node("Add", ["t1", "one"], ["t2"]), helper.make_node("Mul", ["h", "t2"], ["t3"]),
                helper.make_node("Mul", ["t3", "half"], ["a"])], \
            [_const("sqrt2", math.sqrt(2.0)), _const("one", 1.0), _const("half", 0.5)]
    if kind == "gelu_mul_order":  # 0.5 * x first, erf(x * 1/sqrt2) + 1 last, operands swapped
        return [helper.make_node("Mul", ["inv_sqrt2", "h"], ["t0"]), helper.make_node("Erf", ["t0"], ["t1"]),
                helper.make_node("Add", ["one", "t1"], ["t2"]), helper.make_node("Mul", ["h", "half"], ["t3"]),
                helper.make_node("Mul", ["t3", "t2"], ["a"])], \
            [_const("inv_sqrt2", 1 / math.sqrt(2.0)), _const("one", 1.0), _const("half", 0.5)]
    if kind == "gelu_tanh":  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        return [helper.make_node("Pow", ["h", "three"], ["t0"]), helper.make_node("Mul", ["t0", "c"], ["t1"]),
                helper.make_node("Add", ["h", "t1"], ["t2"]), helper.make_node("Mul", ["t2", "k"], ["t3"]),
                helper.make_node("Tanh", ["t3"], ["t4"]), helper.make_node("Add", ["t4", "one"], ["t5"]),
                helper.make_node("Mul", ["h", "t5"], ["t6"]), helper.make_node("Mul", ["t6", "half"], ["a"])], \
            [_const("three", 3.0), _const("c", 0.044715), _const("k", math.sqrt(2 / math.pi)), _const("one", 1.0),
             _const("half", 0.5)]
    assert kind == "silu"
    return [helper.make_node("Sigmoid", ["h"], ["t0"]), helper.make_node("Mul", ["h", "t0"], ["a"])], []


def mlp_with(kind: str, extra_outputs: tuple[str, ...] = (), extra_nodes: tuple[onnx.NodeProto, ...] = ()) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, consts = activation_nodes(kind)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), *nodes, helper.make_node("MatMul", ["a", "w2"], ["y"]),
         *extra_nodes],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 6])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, 3 if n == "y" else 16]) for n in ("y", *extra_outputs)],
        [numpy_helper.from_array(rng.standard_normal((6, 16)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.standard_normal((16, 3)).astype(np.float32), "w2"), *consts])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def outputs_match_onnxruntime(model: onnx.ModelProto, graph: OnnxGraph) -> dict[str, torch.Tensor]:
    x = np.random.default_rng(1).standard_normal((32, 6)).astype(np.float32) * 3
    with torch.no_grad():
        ours = graph.run({"x": torch.from_numpy(x)})
    names = [o.name for o in model.graph.output]
    for name, ref in zip(names, ort_session(model).run(names, {"x": x})):
        np.testing.assert_allclose(ours[name].numpy(), ref, rtol=1e-5, atol=1e-5)
    return ours


@pytest.mark.parametrize(("kind", "fn"), [("gelu", "gelu"), ("gelu_mul_order", "gelu"), ("gelu_tanh", "gelu_tanh"),
                                          ("silu", "silu")])
def test_a_decomposed_activation_runs_as_one_step(kind, fn) -> None:
    model = mlp_with(kind)
    graph = OnnxGraph(model)
    assert [(s.kind, s.attrs.get("fn")) for s in graph.steps] == [("linear", None), ("activation", fn), ("linear", None)]
    outputs_match_onnxruntime(model, graph)


def test_gradients_flow_through_the_fused_step() -> None:
    graph = OnnxGraph(mlp_with("gelu"))
    graph(torch.ones(4, 6)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in graph.parameters() if p.requires_grad)


@pytest.mark.parametrize("reader", ["graph output", "another node", "asked for"])
def test_a_chain_whose_inner_tensor_is_read_elsewhere_runs_node_by_node(reader) -> None:
    """The Erf's output ``t1`` is a graph output, feeds another node, or is asked of the lifter: the chain
    stays five steps and ``t1`` is computed."""
    extra = (helper.make_node("Neg", ["t1"], ["z"]),) if reader == "another node" else ()
    outputs = {"graph output": ("t1",), "another node": ("z",), "asked for": ()}[reader]
    model = mlp_with("gelu", outputs, extra)
    graph = OnnxGraph(model, outputs=["y", "t1"] if reader == "asked for" else None)
    assert not any(s.kind == "activation" for s in graph.steps)
    assert [s.kind for s in graph.steps].count("Mul") == 2
    ours = outputs_match_onnxruntime(model, graph)
    assert "t1" in ours or "z" in ours
