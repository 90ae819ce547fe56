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
    ranks: dict[str, int] = field(default_factory=dict)  # tensors whose rank the graph declares (inputs, value_info, outputs)

    @classmethod
    def build(cls, graph: onnx.GraphProto) -> GraphIndex:
        index = cls(graph)
        index.initializers = {t.name: t for t in graph.initializer}
        index.graph_inputs = {i.name for i in graph.input}
        index.graph_outputs = {o.name for o in graph.output}
        for value in list(graph.input) + list(graph.value_info) + list(graph.output):
            if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
                index.ranks[value.name] = len(value.type.tensor_type.shape.dim)
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
                    for used in names_used_in(sub):
                        index.consumers[used].append(i)
        return index

    def consumer_count(self, name: str) -> int:
        return len(self.consumers.get(name, ())) + (1 if name in self.graph_outputs else 0)

    def alias_root(self, name: str) -> str:
        """The tensor ``name`` is a copy of through ``Identity`` nodes (itself when it is not one).

        The TorchScript exporter writes a parameter equal to an earlier one as ``Identity(earlier)``
        (an untrained model's zero biases, for instance), so such a tensor is a constant too.
        """
        seen = {name}
        while name not in self.graph_inputs and name in self.producer:
            node = self.graph.node[self.producer[name]]
            if node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or not node.input or node.input[0] in seen:
                break
            name = node.input[0]
            seen.add(name)
        return name

    def constant_source(self, name: str) -> str | None:
        """'initializer', 'constant', 'graph input' (an overridable initializer) or None (computed).

        A tensor that is an ``Identity`` copy of a constant has its source's kind (see :meth:`alias_root`).
        """
        root = self.alias_root(name)
        if name in self.graph_inputs or root in self.graph_inputs:
            return "graph input"
        if root in self.initializers:
            return "initializer"
        if root in self.constant_nodes:
            return "constant"
        return None

    def constant_value(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant output, or None if the tensor is not constant."""
        source = self.constant_source(name)
        root = self.alias_root(name)
        if source == "initializer":
            return tensor_array(self.initializers[root])  # a read-only map for a spilled tensor
        if source == "constant":
            node = self.graph.node[self.constant_nodes[root]]
            return _constant_attr_value(node)
        return None

    def constant_shape(self, name: str) -> tuple[int, ...] | None:
        source = self.constant_source(name)
        if source == "initializer":
            return tuple(self.initializers[self.alias_root(name)].dims)
        value = self.constant_value(name) if source == "constant" else None
        return None if value is None else value.shape

    def constant_dtype(self, name: str) -> np.dtype | None:
        """The element type of a constant tensor (read from the initializer's header, no data copied)."""
        source = self.constant_source(name)
        if source == "initializer":
            return onnx.helper.tensor_dtype_to_np_dtype(self.initializers[self.alias_root(name)].data_type)
        value = self.constant_value(name) if source == "constant" else None
        return None if value is None else value.dtype

    def sharing(self, name: str) -> int:
        """How many node inputs (and graph outputs) other than one read the constant behind ``name``,
        through every ``Identity`` copy of it: 0 when only one user reads it."""
        nodes, outputs = self.readers(name)
        return max(len(nodes) + outputs - 1, 0)

    def readers(self, name: str) -> tuple[list[int], int]:
        """The nodes that read the constant behind ``name`` (once per input it fills), through every
        ``Identity`` copy of it (the copies themselves not), and how many graph outputs it is."""
        root = self.alias_root(name)
        nodes, outputs, frontier, seen = [], 0, [root], {root}
        while frontier:
            t = frontier.pop()
            outputs += t in self.graph_outputs
            for i in self.consumers.get(t, ()):
                node = self.graph.node[i]
                if node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.output[0] not in seen:
                    seen.add(node.output[0])
                    frontier.append(node.output[0])
                else:
                    nodes.append(i)
        return nodes, outputs


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


def names_used_in(graph: onnx.GraphProto) -> set[str]:
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    produced |= {t.name for t in graph.initializer}
    used = {i for n in graph.node for i in n.input if i}
    for n in graph.node:
        for attr in n.attribute:
            for sub in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                used |= names_used_in(sub)
    used |= {o.name for o in graph.output}
    return used - produced


def get_attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default
