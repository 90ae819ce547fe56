"""What block detection says beyond a block's shape: weights it cannot rewrite, notes for the report
(shared tensors, a bias another node holds), and the near misses of layers it cannot read at all.

Nothing is silent: a linear-looking node refused by :mod:`.linear` (quantized weights, a computed
weight) that is followed by an activation is listed with its reason (:func:`refused_near_misses`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from neurorewrite.rewriter.activations import is_activation
from neurorewrite.rewriter.graph import GraphIndex, node_label
from neurorewrite.rewriter.linear import Linear, Refused
from neurorewrite.rewriter.patterns import MS_DOMAIN, Reason

if TYPE_CHECKING:
    from neurorewrite.rewriter.blocks import MLPBlock

# onnxruntime ops that add a block's output bias themselves: op -> input slot of the bias
BIAS_HOLDERS = {"SkipLayerNormalization": 4, "SkipSimplifiedLayerNormalization": 3}
# ops between a quantized linear and its activation (dequantizing, scaling, adding the float bias)
_PASS_THROUGH = {"Cast", "Mul", "Add", "Sub", "Div", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
                 "Reshape", "Identity", "QLinearAdd", "QLinearMul"}
_REACH = 6  # nodes followed from a refused layer when looking for an activation


def graph_input_problem(index: GraphIndex, lin: Linear) -> Reason | None:
    """A weight or bias the user can override at run time cannot be rewritten."""
    for what, name in (("weight", lin.weight), ("bias", lin.bias)):
        if name is not None and index.constant_source(name) == "graph input":
            return Reason("graph-input", f"{what} {name} of {lin.name} is a graph input; make it an initializer to "
                          "rewrite this block")
    return None


def _sharing_note(index: GraphIndex, lin: Linear, what: str, name: str, rewritten: bool, readers: int) -> str | None:
    others = index.sharing(name)
    if others < readers:
        return None
    root = index.alias_root(name)
    via = f" (an Identity of {root})" if root != name else ""
    head = f"{what} {name}{via} of {lin.name} is shared with {others} other node input(s)"
    if rewritten:
        return f"{head}: rewritten on a private copy, counted in this block; the other users keep the original"
    return f"{head}: FPE does not change it here, so all users keep reading it; counted in this block"


def block_notes(index: GraphIndex, block: MLPBlock, readers: int = 1) -> list[str]:
    """The notes a block's report row carries (see the module docstring). ``readers``: how many blocks
    read this block's weights and are expanded as one (a tensor only they read needs no note)."""
    notes = []
    for lin, bias_changes in ((block.first, True), (block.up, True), (block.second, False)):
        if lin is None:
            continue
        for what, name, rewritten in (("weight", lin.weight, True), ("bias", lin.bias, bias_changes)):
            note = _sharing_note(index, lin, what, name, rewritten, readers) if name is not None else None
            if note:
                notes.append(note)
    first = block.first
    if first.bias_node is not None:
        holder = index.graph.node[first.bias_node]
        notes.append(f"the bias {first.bias} of {first.name} is added by {holder.op_type} node "
                     f"{node_label(holder, first.bias_node)}: expanded with the layer")
    if block.second.bias is None:
        for c in index.consumers.get(block.second.output, []):
            node = index.graph.node[c]
            slot = BIAS_HOLDERS.get(node.op_type) if node.domain == MS_DOMAIN else None
            if slot is not None and len(node.input) > slot and node.input[slot]:
                notes.append(f"the output bias {node.input[slot]} of {block.second.name} is added by {node.op_type} node "
                             f"{node_label(node, c)}: kept as it is, not counted in this block")
    return notes


def _reaches_activation(index: GraphIndex, start: str) -> bool:
    frontier, seen = [(start, 0)], {start}
    while frontier:
        name, depth = frontier.pop()
        for c in index.consumers.get(name, []):
            node = index.graph.node[c]
            if is_activation(node):
                return True
            if depth < _REACH and node.op_type in _PASS_THROUGH:
                for out in node.output:
                    if out and out not in seen:
                        seen.add(out)
                        frontier.append((out, depth + 1))
    return False


def refused_near_misses(index: GraphIndex, refused: dict[int, Refused]) -> list[tuple[str, Reason]]:
    """The refused linear-looking nodes that an activation follows, with their reasons."""
    return [(r.name, r.reason) for r in refused.values() if _reaches_activation(index, r.output)]
