"""Block detection: which ``linear -> activation -> linear`` chains of a graph are MLP blocks.

Matching is pattern / check: :func:`find_blocks` returns the blocks that can be rewritten and, for
chains that look like blocks but cannot be rewritten safely, a :class:`Skipped` with the reason.

The activation is any connected region of elementwise nodes between the two linears whose other
operands are scalar constants. That covers single ops (Relu, Gelu, ...), the decompositions exporters
write (GELU via Erf or Tanh, SiLU as ``x * Sigmoid(x)``), and the identity (no node at all). Widening
such a region is safe: every op acts per element and broadcasts its constants.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import onnx

from neurorewrite.errors import InvalidOptionError
from neurorewrite.rewriter.graph import GraphIndex, get_attr, node_label
from neurorewrite.rewriter.linear import Linear, find_linears

UNARY = {
    "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Gelu",
    "Erf", "HardSigmoid", "HardSwish", "Mish", "ThresholdedRelu", "Abs", "Neg", "Exp", "Log", "Sqrt",
    "Reciprocal", "Identity", "Clip", "Dropout",
}
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}


@dataclass(frozen=True)
class MLPBlock:
    """``h = act(first(x))``, ``y = second(h)``: the unit FPE rewrites."""

    name: str
    first: Linear
    second: Linear
    activation: str
    activation_nodes: tuple[int, ...]
    hidden: str  # the tensor the second linear reads (activation output)
    region_tensors: tuple[str, ...]  # tensors of width H between the two linears

    @property
    def width(self) -> int:
        return self.first.out_features

    @property
    def in_features(self) -> int:
        return self.first.in_features

    @property
    def out_features(self) -> int:
        return self.second.out_features


@dataclass(frozen=True)
class Skipped:
    """A chain that looks like an MLP block but is not rewritten, and why."""

    name: str
    reason: str


@dataclass
class BlockSearch:
    blocks: list[MLPBlock] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def _is_scalar_constant(index: GraphIndex, name: str) -> bool:
    if index.constant_source(name) not in ("initializer", "constant"):
        return False
    shape = index.constant_shape(name)
    return shape is not None and all(d == 1 for d in shape)


def _activation_label(nodes: list[onnx.NodeProto]) -> str:
    ops = Counter(n.op_type for n in nodes)
    if not nodes:
        return "Identity"
    if len(nodes) == 1:
        node = nodes[0]
        approx = get_attr(node, "approximate", b"none")
        return "Gelu(tanh)" if node.op_type == "Gelu" and approx in (b"tanh", "tanh") else node.op_type
    if set(ops) == {"Sigmoid", "Mul"} and ops["Sigmoid"] == 1:
        return "SiLU"
    if "Erf" in ops and set(ops) <= {"Div", "Mul", "Erf", "Add"}:
        return "Gelu(erf)"
    if "Tanh" in ops and set(ops) <= {"Mul", "Add", "Tanh", "Pow"}:
        return "Gelu(tanh)"
    return "elementwise(" + ",".join(sorted(ops)) + ")"


def _walk_region(
    index: GraphIndex, start: str, linears_by_input: dict[str, list[Linear]]
) -> tuple[list[int], list[str], Linear | None, str | None, bool]:
    """Follow elementwise consumers of ``start`` until they reach a linear layer.

    Returns (region nodes, region tensors, the second linear, a reason it is not a block, whether
    the region looked like an activation at all).
    """
    graph = index.graph
    tensors, nodes, frontier = [start], [], [start]
    exits: list[tuple[str, Linear]] = []
    seen_nodes: set[int] = set()
    looked_like = False
    while frontier:
        name = frontier.pop()
        if name in index.graph_outputs:
            return nodes, tensors, None, f"hidden tensor {name} is also a graph output", looked_like
        for user in index.consumers.get(name, []):
            node = graph.node[user]
            second = next((lin for lin in linears_by_input.get(name, []) if lin.node == user), None)
            if second is not None:
                exits.append((name, second))
                continue
            if node.domain not in ("", "ai.onnx") or node.op_type not in UNARY | BINARY:
                label = node_label(node, user)
                return nodes, tensors, None, f"hidden tensor {name} is consumed by {node.op_type} node {label} too", looked_like
            looked_like = looked_like or node.op_type in UNARY
            if user in seen_nodes:
                continue
            seen_nodes.add(user)
            nodes.append(user)
            real_outputs = [o for o in node.output if o]
            if node.op_type == "Dropout" and len(real_outputs) > 1 and index.consumer_count(real_outputs[1]):
                return nodes, tensors, None, f"Dropout node {node_label(node, user)} has its mask used", looked_like
            out = real_outputs[0]
            tensors.append(out)
            frontier.append(out)
    if not exits:
        return nodes, tensors, None, None, looked_like
    region = set(tensors)
    for i in nodes:
        node = graph.node[i]
        for operand in node.input[1:] if node.op_type in UNARY else node.input:
            if operand and operand not in region and not _is_scalar_constant(index, operand):
                label = node_label(node, i)
                return nodes, tensors, None, f"{node.op_type} node {label} mixes in tensor {operand}, which is not a scalar constant", True
    if len(exits) > 1 or len({e[0] for e in exits}) > 1:
        return nodes, tensors, None, "the hidden activation feeds several linear layers", True
    return nodes, tensors, exits[0][1], None, True


def _check_weights(index: GraphIndex, lin: Linear) -> str | None:
    for what, name in (("weight", lin.weight), ("bias", lin.bias)):
        if name is None:
            continue
        if index.constant_source(name) == "graph input":
            return f"{what} {name} of {lin.name} is a graph input; make it an initializer to rewrite this block"
        if len(index.consumers.get(name, [])) > 1 or name in index.graph_outputs:
            return f"{what} {name} of {lin.name} is shared with other nodes"
    return None


def find_blocks(model: onnx.ModelProto) -> BlockSearch:
    """All MLP blocks of the main graph in graph order, and the near-misses with their reasons."""
    index = GraphIndex.build(model.graph)
    linears = find_linears(index)
    by_input: dict[str, list[Linear]] = {}
    for lin in linears.values():
        by_input.setdefault(lin.data_input, []).append(lin)
    search = BlockSearch()
    for lin in linears.values():
        nodes, tensors, second, reason, looked_like = _walk_region(index, lin.output, by_input)
        if second is None:
            if reason is not None and looked_like:
                search.skipped.append(Skipped(lin.name, reason))
            continue
        if second.in_features != lin.out_features:
            search.skipped.append(Skipped(lin.name, f"{lin.name} has {lin.out_features} outputs but {second.name} reads {second.in_features}"))
            continue
        reason = _check_weights(index, lin) or _check_weights(index, second)
        if reason is not None:
            search.skipped.append(Skipped(lin.name, reason))
            continue
        act_nodes = [model.graph.node[i] for i in nodes]
        search.blocks.append(
            MLPBlock(
                name=lin.name, first=lin, second=second, activation=_activation_label(act_nodes),
                activation_nodes=tuple(sorted(nodes)), hidden=second.data_input, region_tensors=tuple(tensors),
            )
        )
    return search


def blocks_by_output(model: onnx.ModelProto, output_tensors: Collection[str]) -> list[MLPBlock]:
    """The MLP blocks of ``model`` whose second linear writes one of ``output_tensors``, in graph order.

    Passes after ``expand`` find the blocks it rewrote this way: its record names them by output tensor,
    which stays the same while node indices may shift.
    """
    return [b for b in find_blocks(model).blocks if b.second.output in output_tensors]


def chain_ends(blocks: Sequence[MLPBlock]) -> list[MLPBlock]:
    """The blocks whose second linear ends a chain (``L1 -> act -> L2 -> act -> L3``), i.e. is not also
    the first linear of another of ``blocks``; in the order given."""
    firsts = {b.first.node for b in blocks}
    return [b for b in blocks if b.second.node not in firsts]


def select_blocks(search: BlockSearch, patterns: list[str] | None) -> tuple[list[MLPBlock], list[Skipped]]:
    """Keep the blocks whose name (the node name of the linear that produces the hidden layer) equals or
    fully matches one of ``patterns``."""
    if not patterns:
        return list(search.blocks), list(search.skipped)
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise InvalidOptionError(f"--layers pattern {p!r} is not a valid regex: {e}") from e
    chosen, skipped = [], list(search.skipped)
    for block in search.blocks:
        if any(block.name == p.pattern or p.fullmatch(block.name) for p in compiled):
            chosen.append(block)
        else:
            skipped.append(Skipped(block.name, "not selected by --layers"))
    return chosen, skipped
