"""A read-only index over an ONNX graph: producers, consumers and constant values of tensors."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from neurorewrite.external_data import tensor_array


def node_label(node: onnx.NodeProto, index: int) -> str:
    """The node's name, or a stable made-up one for unnamed nodes."""
    return node.name or f"{node.op_type}_{index}"


@dataclass
class GraphIndex:
    """Who produces and who consumes every tensor of the main graph, and which tensors are constant."""

    graph: onnx.GraphProto
    producer: dict[str, int] = field(default_factory=dict)
    consumers: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    constant_nodes: dict[str, int] = field(default_factory=dict)
    graph_inputs: set[str] = field(default_factory=set)
    graph_outputs: set[str] = field(default_factory=set)

    @classmethod
    def build(cls, graph: onnx.GraphProto) -> GraphIndex:
        index = cls(graph)
        index.initializers = {t.name: t for t in graph.initializer}
        index.graph_inputs = {i.name for i in graph.input}
        index.graph_outputs = {o.name for o in graph.output}
        for i, node in enumerate(graph.node):
            for name in node.output:
                if name:
                    index.producer[name] = i
            for name in node.input:
                if name:
                    index.consumers[name].append(i)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
                index.constant_nodes[node.output[0]] = i
            # tensors used inside subgraphs (If/Loop bodies) count as consumed by the node
            for attr in node.attribute:
                for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                    for used in _names_used_in(sub):
                        index.consumers[used].append(i)
        return index

    def consumer_count(self, name: str) -> int:
        return len(self.consumers.get(name, ())) + (1 if name in self.graph_outputs else 0)

    def constant_source(self, name: str) -> str | None:
        """'initializer', 'constant', 'graph input' (an overridable initializer) or None (computed)."""
        if name in self.graph_inputs:
            return "graph input"
        if name in self.initializers:
            return "initializer"
        if name in self.constant_nodes:
            return "constant"
        return None

    def constant_value(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant output, or None if the tensor is not constant."""
        source = self.constant_source(name)
        if source == "initializer":
            return tensor_array(self.initializers[name])  # a read-only map for a spilled tensor
        if source == "constant":
            node = self.graph.node[self.constant_nodes[name]]
            return _constant_attr_value(node)
        return None

    def constant_shape(self, name: str) -> tuple[int, ...] | None:
        source = self.constant_source(name)
        if source == "initializer":
            return tuple(self.initializers[name].dims)
        value = self.constant_value(name) if source == "constant" else None
        return None if value is None else value.shape


def _constant_attr_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.asarray(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.asarray(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.asarray(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.asarray(list(attr.ints), dtype=np.int64)
    return None


def _names_used_in(graph: onnx.GraphProto) -> set[str]:
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    produced |= {t.name for t in graph.initializer}
    used = {i for n in graph.node for i in n.input if i}
    for n in graph.node:
        for attr in n.attribute:
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                used |= _names_used_in(sub)
    used |= {o.name for o in graph.output}
    return used - produced


def get_attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default
