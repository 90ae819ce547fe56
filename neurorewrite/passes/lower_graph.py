"""A small graph edit used by the lowering pass: swap linear layers for other nodes.

The edit is applied to a copy, so the input model is never modified. Node order is kept: the nodes
that replace a linear are emitted where its first node was, so the graph stays topologically sorted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from neurorewrite.rewriter.edit import model_shell, unique_name
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.linear import Linear


@dataclass
class GraphRewrite:
    """What to change: nodes emitted in place of node indices, nodes removed, initializers added/dropped."""

    index: GraphIndex
    taken: set[str]
    emit: dict[int, list[onnx.NodeProto]] = field(default_factory=dict)
    remove: set[int] = field(default_factory=set)
    new_inits: list[onnx.TensorProto] = field(default_factory=list)
    drop_inits: set[str] = field(default_factory=set)
    stale: set[str] = field(default_factory=set)
    opsets: dict[str, int] = field(default_factory=dict)
    pending: list[onnx.NodeProto] = field(default_factory=list)

    @classmethod
    def start(cls, model: onnx.ModelProto) -> GraphRewrite:
        graph = model.graph
        taken = {t.name for t in graph.initializer} | {i.name for i in graph.input}
        taken |= {o for n in graph.node for o in n.output} | {n.name for n in graph.node}
        return cls(GraphIndex.build(graph), taken)

    def name(self, base: str) -> str:
        """A tensor or node name not used in the graph yet."""
        return unique_name(base, self.taken)

    def const(self, base: str, value: np.ndarray) -> str:
        """A new initializer holding ``value``; returns its (unique) name."""
        name = self.name(base)
        self.new_inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], base: str, domain: str = "", n_out: int = 1, **attrs: object) -> list[str]:
        """Create a node (queued by :meth:`replace_linear`); returns its output names."""
        outs = [self.name(f"{base}.{op.lower()}" if n_out == 1 else f"{base}.{op.lower()}{i}") for i in range(n_out)]
        self.pending.append(helper.make_node(op, inputs, outs, name=self.name(f"{base}/{op}"), domain=domain, **attrs))
        return outs

    def replace_linear(self, lin: Linear, build: list[onnx.NodeProto]) -> None:
        """Emit ``build`` where ``lin`` was and drop its nodes and weight constants."""
        self.emit[lin.node] = build
        self.remove |= set(lin.nodes)
        for name in (lin.weight, lin.bias):
            if name is None:
                continue
            source = self.index.constant_source(name)
            if source == "initializer":
                self.drop_inits.add(name)
            elif source == "constant":
                self.remove.add(self.index.constant_nodes[name])

    def take(self) -> list[onnx.NodeProto]:
        """The nodes created since the last call, in creation order."""
        nodes, self.pending = self.pending, []
        return nodes

    def apply(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """The edited copy of ``model`` (the dropped weights are not copied)."""
        new = model_shell(model)
        graph = new.graph
        for i, node in enumerate(model.graph.node):
            graph.node.extend(self.emit.get(i, []))
            if i not in self.remove:
                graph.node.append(node)
        graph.initializer.extend(t for t in model.graph.initializer if t.name not in self.drop_inits)
        graph.initializer.extend(self.new_inits)
        graph.value_info.extend(v for v in model.graph.value_info if v.name not in self.stale)
        have = {o.domain for o in new.opset_import}
        for domain, version in self.opsets.items():
            if domain not in have:
                new.opset_import.add(domain=domain, version=version)
        return new


def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain opset version (which ReduceSum signature the graph may use)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def leading_shape(rw: GraphRewrite, x: str, base: str, tail: list[int]) -> str:
    """``shape(x)[:-1] + tail`` as a tensor (queued nodes), for reshapes that keep the input's rank."""
    shape = rw.node("Shape", [x], base)[0]
    lead = rw.node(
        "Slice", [shape, rw.const(base + ".zero", np.array([0], np.int64)), rw.const(base + ".last", np.array([-1], np.int64))], base
    )[0]
    return rw.node("Concat", [lead, rw.const(base + ".tail", np.array(tail, np.int64))], base, axis=0)[0]
