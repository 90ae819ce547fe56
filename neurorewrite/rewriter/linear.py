"""Recognise the "linear" layers of a graph: Gemm, MatMul + Add, and MatMul with a 2-D constant weight.

A :class:`Linear` records where its weight and bias live and how they are laid out, so that passes can
read the effective ``W`` (always ``(out, in)``) and ``b`` (``(out,)``) and write new ones back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from neurorewrite.rewriter.graph import GraphIndex, get_attr, node_label


@dataclass(frozen=True)
class Linear:
    """One linear layer ``y = x W^T + b`` found in the graph."""

    node: int  # index of the Gemm / MatMul node
    name: str
    op: str  # "Gemm", "MatMul+Add" or "MatMul"
    data_input: str
    weight: str
    weight_out_in: bool  # stored weight is (out, in) (Gemm transB=1); else (in, out)
    bias: str | None
    add_node: int | None  # the Add node that carries a MatMul's bias
    output: str  # the tensor after the bias
    in_features: int
    out_features: int
    scale: float = 1.0  # Gemm alpha
    bias_scale: float = 1.0  # Gemm beta

    @property
    def nodes(self) -> tuple[int, ...]:
        return (self.node,) if self.add_node is None else (self.node, self.add_node)


def _graph_input_shape(graph: onnx.GraphProto, name: str) -> tuple[int, ...] | None:
    for value in graph.input:
        if value.name == name and value.type.HasField("tensor_type"):
            dims = value.type.tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims):
                return tuple(d.dim_value for d in dims)
    return None


def _weight_shape(index: GraphIndex, name: str) -> tuple[int, ...] | None:
    if index.constant_source(name) == "graph input":
        shape = index.constant_shape(name) if name in index.initializers else None
        return shape or _graph_input_shape(index.graph, name)
    return index.constant_shape(name)


def _bias_fits(shape: tuple[int, ...] | None, out: int) -> bool:
    """A bias adds one value per output feature: shape (out,), (1, out), (1, 1, out), or a scalar."""
    if shape is None:
        return False
    if all(d == 1 for d in shape):
        return True
    return shape[-1] == out and all(d == 1 for d in shape[:-1])


def _gemm(index: GraphIndex, i: int, node: onnx.NodeProto) -> Linear | None:
    if len(node.input) < 2 or index.constant_source(node.input[0]) in ("initializer", "constant"):
        return None
    shape = _weight_shape(index, node.input[1])
    if shape is None or len(shape) != 2:
        return None
    trans_b = bool(get_attr(node, "transB", 0))
    out, inp = (shape[0], shape[1]) if trans_b else (shape[1], shape[0])
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and not _bias_fits(_weight_shape(index, bias), out):
        return None
    return Linear(
        node=i, name=node_label(node, i), op="Gemm", data_input=node.input[0], weight=node.input[1],
        weight_out_in=trans_b, bias=bias, add_node=None, output=node.output[0], in_features=inp,
        out_features=out, scale=float(get_attr(node, "alpha", 1.0)), bias_scale=float(get_attr(node, "beta", 1.0)),
    )


def _matmul(index: GraphIndex, i: int, node: onnx.NodeProto) -> Linear | None:
    if len(node.input) != 2 or index.constant_source(node.input[0]) in ("initializer", "constant"):
        return None
    shape = _weight_shape(index, node.input[1])
    if shape is None or len(shape) != 2:
        return None
    inp, out = shape
    bias = add = None
    output = node.output[0]
    users = index.consumers.get(output, [])
    if len(users) == 1 and output not in index.graph_outputs:
        add_node = index.graph.node[users[0]]
        if add_node.op_type == "Add" and add_node.domain in ("", "ai.onnx"):
            other = add_node.input[1] if add_node.input[0] == output else add_node.input[0]
            source = index.constant_source(other)
            if source in ("initializer", "constant") and _bias_fits(index.constant_shape(other), out):
                bias, add, output = other, users[0], add_node.output[0]
    return Linear(
        node=i, name=node_label(node, i), op="MatMul+Add" if bias else "MatMul", data_input=node.input[0],
        weight=node.input[1], weight_out_in=False, bias=bias, add_node=add, output=output, in_features=inp,
        out_features=out,
    )


def find_linears(index: GraphIndex) -> dict[int, Linear]:
    """Every linear layer of the main graph, keyed by the index of its Gemm/MatMul node."""
    found: dict[int, Linear] = {}
    for i, node in enumerate(index.graph.node):
        if node.domain not in ("", "ai.onnx"):
            continue
        lin = _gemm(index, i, node) if node.op_type == "Gemm" else _matmul(index, i, node) if node.op_type == "MatMul" else None
        if lin is not None:
            found[i] = lin
    return found


def read_weights(index: GraphIndex, lin: Linear) -> tuple[np.ndarray, np.ndarray | None]:
    """The effective ``W`` of shape (out, in) and ``b`` of shape (out,), Gemm alpha/beta folded in."""
    w = index.constant_value(lin.weight)
    if w is None:
        raise ValueError(f"weight {lin.weight} of {lin.name} is not a constant")
    w = w.T if not lin.weight_out_in else w
    if lin.scale != 1.0:
        w = w * np.asarray(lin.scale, dtype=w.dtype)
    b = None
    if lin.bias is not None:
        raw = index.constant_value(lin.bias)
        if raw is None:
            raise ValueError(f"bias {lin.bias} of {lin.name} is not a constant")
        b = np.broadcast_to(raw.reshape(-1) if raw.size == lin.out_features else raw.reshape(()), (lin.out_features,))
        b = b * np.asarray(lin.bias_scale, dtype=b.dtype) if lin.bias_scale != 1.0 else b.copy()
    return np.ascontiguousarray(w), b
