"""The hidden region between two linears: an imperative walk over the consumers of a linear's output.

The region's length and fan-out are not fixed (an activation decomposes into 1 to 10 ops, GPT-2's
Conv1D puts reshapes around it, a gated block multiplies in the up projection), so it is walked
rather than matched: from the first linear's output, every consumer must be

- an elementwise node (:func:`neurorewrite.rewriter.activations.is_elementwise`): its output joins
  the region; operands from outside the region are collected (scalar constants are fine, a gated
  block's up projection is checked by the caller, anything else is a reason);
- a shape-only node (Reshape, Flatten, Squeeze, Unsqueeze) that keeps the hidden width last;
- a ``Shape`` node, whose values may only feed the region's own reshape targets;
- or a linear layer reading the tensor (an exit: the block's second linear).

Anything else, or a region tensor that is a graph output, ends the walk with a :class:`Reason`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from neurorewrite.rewriter.activations import data_operands, is_activation, is_elementwise, parameter_operands
from neurorewrite.rewriter.graph import GraphIndex, get_attr, node_label
from neurorewrite.rewriter.linear import Linear
from neurorewrite.rewriter.patterns import Reason
from neurorewrite.rewriter.shapes import ReshapeVerdict, Widened, profile, reshape_verdict, shape_reader_problem

SHAPE_ONLY = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}


@dataclass
class Region:
    """What the walk found between a linear's output and the next linear(s)."""

    start: str
    nodes: list[int] = field(default_factory=list)  # elementwise and shape-only nodes, in walk order
    tensors: list[str] = field(default_factory=list)  # tensors of the hidden width (start included)
    ranks: dict[str, int | None] = field(default_factory=dict)
    exits: list[tuple[str, Linear]] = field(default_factory=list)
    operands: list[tuple[int, str]] = field(default_factory=list)  # (node, tensor) non-scalar operands from outside
    shape_readers: list[int] = field(default_factory=list)
    reshapes: list[int] = field(default_factory=list)  # Reshape nodes, whose targets are checked
    shape_only: list[int] = field(default_factory=list)  # Flatten/Squeeze/Unsqueeze nodes
    reason: Reason | None = None
    looks_like_activation: bool = False

    @property
    def elementwise(self) -> list[int]:
        return [i for i in self.nodes if i not in self.reshapes and i not in self.shape_only]


def _is_scalar_constant(index: GraphIndex, name: str) -> bool:
    if index.constant_source(name) not in ("initializer", "constant"):
        return False
    shape = index.constant_shape(name)
    return shape is not None and all(d == 1 for d in shape)


def _axes(index: GraphIndex, node: onnx.NodeProto) -> list[int] | None:
    axes = get_attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = index.constant_value(node.input[1])
        axes = None if value is None else [int(v) for v in value.reshape(-1)]
    return None if axes is None else list(axes)


def _shape_only_rank(index: GraphIndex, node: onnx.NodeProto, rank: int | None, label: str) -> tuple[int | None, Reason | None]:
    """The output rank of a Flatten/Squeeze/Unsqueeze that keeps the last axis last, or why it may not."""
    op = node.op_type
    if op == "Flatten":
        axis = int(get_attr(node, "axis", 1))
        if axis == -1 or (rank is not None and axis == rank - 1):
            return 2, None
        return None, Reason("shape", f"Flatten node {label} (axis {axis}) may merge the hidden width with another axis")
    axes = _axes(index, node)
    if op == "Squeeze":
        # a valid graph never squeezes the width (it is not 1); only -1 says so outright
        if axes is not None and any(a == -1 or (rank is not None and a == rank - 1) for a in axes):
            return None, Reason("shape", f"Squeeze node {label} (axes {axes}) names the hidden width's axis")
        return (None if rank is None or axes is None else rank - len(axes)), None
    if not axes:
        return None, Reason("shape", f"Unsqueeze node {label} has no constant axes")
    out_rank = None if rank is None else rank + len(axes)
    if any(a == -1 or (out_rank is not None and a == out_rank - 1) or (out_rank is None and a > 0) for a in axes):
        return None, Reason("shape", f"Unsqueeze node {label} (axes {axes}) may put an axis after the hidden width")
    return out_rank, None


def walk_region(index: GraphIndex, start: str, start_rank: int | None, linears_by_input: dict[str, list[Linear]],
                fused_bias: str | None = None, feature_axis: int = -1, width_hint: int = 1) -> Region:
    """Follow the consumers of ``start`` until they reach linear layers; see the module docstring.

    ``fused_bias`` is the first linear's bias when an activation node adds it (an allowed operand);
    ``feature_axis`` 1 (a 1x1 Conv) admits no shape-only nodes. ``width_hint`` is the hidden width
    (reshape targets are evaluated at it to learn their rank).
    """
    graph = index.graph
    region = Region(start, tensors=[start], ranks={start: start_rank})
    frontier, seen = [start], set()
    while frontier:
        name = frontier.pop()
        if name in index.graph_outputs:
            region.reason = Reason("graph-output", f"hidden tensor {name} is also a graph output")
            return region
        for user in index.consumers.get(name, []):
            node = graph.node[user]
            label = node_label(node, user)
            second = next((lin for lin in linears_by_input.get(name, []) if lin.node == user), None)
            if second is not None:
                region.exits.append((name, second))
                continue
            if user in seen:
                continue
            rank = region.ranks.get(name)
            out_rank: int | None = rank
            if is_elementwise(node):
                region.looks_like_activation |= is_activation(node)
                if node.op_type == "Dropout" and len(node.output) > 1 and node.output[1] and index.consumer_count(node.output[1]):
                    region.reason = Reason("region", f"Dropout node {label} has its mask used")
                    return region
            elif node.op_type == "Shape" and node.domain in ("", "ai.onnx"):
                seen.add(user)
                region.shape_readers.append(user)
                continue
            elif node.op_type in SHAPE_ONLY and node.domain in ("", "ai.onnx") and node.input[0] == name:
                if feature_axis != -1:
                    region.reason = Reason("shape", f"{node.op_type} node {label} reshapes the channels of a 1x1-Conv block")
                    return region
                if node.op_type == "Reshape":
                    region.reshapes.append(user)
                    widened = {t: Widened(region.ranks.get(t)) for t in region.tensors}
                    pair = profile(index, node.input[1], widened, width_hint) if len(node.input) > 1 else None
                    out_rank = len(pair[0].items) if pair is not None and pair[0].items is not None else None
                else:
                    out_rank, why = _shape_only_rank(index, node, rank, label)
                    if why is not None:
                        region.reason = why
                        return region
                    region.shape_only.append(user)
            else:
                region.reason = Reason("consumed", f"hidden tensor {name} is consumed by {node.op_type} node {label} too")
                return region
            seen.add(user)
            region.nodes.append(user)
            out = next(o for o in node.output if o)
            region.tensors.append(out)
            region.ranks[out] = out_rank if out_rank is not None else index.ranks.get(out)
            frontier.append(out)
    inside = set(region.tensors)
    for i in region.nodes:
        node = graph.node[i]
        if i in region.reshapes or i in region.shape_only:
            continue
        for operand in data_operands(node):
            if operand not in inside and not _is_scalar_constant(index, operand):
                region.operands.append((i, operand))
        for operand in parameter_operands(node):
            if operand != fused_bias and not _is_scalar_constant(index, operand):
                region.reason = Reason("not-scalar", f"{node.op_type} node {node_label(node, i)} mixes in tensor "
                                       f"{operand}, which is not a scalar constant")
                return region
    return region


def check_shapes(index: GraphIndex, region: Region, width: int, extra: dict[str, Widened] | None = None,
                 allowed: set[tuple[int, int]] | None = None) -> tuple[list[tuple[int, bool]], Reason | None]:
    """Check the region's reshapes and Shape readers at hidden width ``width``.

    Returns the reshapes as ``(node, follows)`` (``follows`` False: the target holds the width as a
    constant, to rewrite when widening) and a reason when a shape node would break.
    """
    widened = {t: Widened(region.ranks.get(t)) for t in region.tensors}
    widened.update(extra or {})
    verdicts: list[tuple[int, bool]] = []
    ok_targets = set(allowed or ())
    for i in region.reshapes:
        data = index.graph.node[i].input[0]
        verdict = reshape_verdict(index, i, widened, width, region.ranks.get(data))
        if not isinstance(verdict, ReshapeVerdict):
            return verdicts, verdict
        verdicts.append((i, verdict.follows))
        ok_targets.add((i, 1))
    for i in region.shape_readers:
        why = shape_reader_problem(index, i, widened, width, ok_targets)
        if why is not None:
            return verdicts, why
    return verdicts, None
