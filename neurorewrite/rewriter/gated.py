"""Gated blocks: the up projection a gated product multiplies in, and the fused gate/up split.

A gated block is ``h = act(Wg x + bg) * (Wu x + bu)``, ``y = Wd h + bd`` (Llama, Mistral, Qwen2, Gemma,
T5 v1.1). The walk from the gate's output meets one ``Mul`` whose other operand comes from outside
the region; :func:`find_up` checks it is the output of another linear over the same input with the
same width, used by that product alone.

Phi-3 computes gate and up as one linear of width ``2H`` and cuts it in halves, with
``Split{num_outputs=2}`` on the last axis (dynamo) or two ``Slice`` nodes whose bounds are computed
from ``Shape`` (TorchScript). Both are declared patterns (:data:`FUSED_SPLIT`, :data:`FUSED_SLICE`);
:func:`fused_halves` checks the cut is into two equal halves on the last axis and says which
constants hold ``H`` (they are rewritten to ``alpha * H`` when the block is widened).
"""

from __future__ import annotations

from dataclasses import dataclass

from neurorewrite.rewriter.graph import GraphIndex, get_attr, node_label
from neurorewrite.rewriter.linear import Linear
from neurorewrite.rewriter.patterns import Maybe, Op, Reason, Var, match
from neurorewrite.rewriter.region import Region
from neurorewrite.rewriter.shapes import Widened, profile, shape_closure

FUSED_SPLIT = Op("Split", Var("fused"), Maybe(Var("sizes")), name="cut", private=False)
FUSED_SLICE = Op("Slice", Var("fused"), Var("starts"), Var("ends"), Maybe(Var("axes")), Maybe(Var("steps")), name="cut",
                 private=False)
BIG = 1 << 31  # a Slice end at least this large means "to the end"


@dataclass(frozen=True)
class WidthEdit:
    """A constant that holds the hidden width and is rewritten when the block is widened.

    ``kind``: ``reshape-target`` (a Reshape target ending in ``H``: the last entry becomes ``alpha*H``),
    ``scale`` (a constant input holding multiples of ``H``: multiplied by ``alpha``), ``split-attr``
    (a Split's ``split`` attribute, before opset 13: multiplied by ``alpha``).
    """

    node: int
    slot: int
    kind: str


@dataclass(frozen=True)
class FusedSplit:
    """How a fused gate/up linear's output is cut: the nodes that cut it and the two halves."""

    nodes: tuple[int, ...]  # the Split or the two Slices, and the shape arithmetic feeding only them
    gate: str
    up: str
    gate_half: int  # 0: the gate is the first half of the fused output
    edits: tuple[WidthEdit, ...]


def find_up(index: GraphIndex, region: Region, gate: Linear, by_output: dict[str, Linear]) -> Linear | Reason:
    """The up projection a gated region multiplies in, or why the region's outside operand is not one."""
    (product, operand), *more = region.operands
    node = index.graph.node[product]
    label = node_label(node, product)
    prefix = f"{node.op_type} node {label} mixes in tensor {operand}, which is not a scalar constant"
    if more:
        others = ", ".join(t for _, t in more)
        return Reason("not-scalar", f"{prefix} (nor are {others})")
    if node.op_type != "Mul":
        return Reason("not-scalar", prefix)
    up = by_output.get(operand)
    if up is None or up.node == gate.node:
        return Reason("not-scalar", f"{prefix} nor the output of a linear layer (the up projection of a gated block)")
    if up.data_input != gate.data_input:
        return Reason("gated", f"{prefix}; it comes from {up.name}, which reads {up.data_input}, not the gate's input "
                      f"{gate.data_input}")
    if (up.out_features, up.feature_axis) != (gate.out_features, gate.feature_axis):
        return Reason("gated", f"{prefix}; it comes from {up.name} with {up.out_features} outputs, the gate "
                      f"{gate.name} has {gate.out_features}")
    if index.consumer_count(operand) != 1:
        return Reason("gated", f"the up projection {up.name}'s output {operand} is used outside the gated product too")
    return up


def _equal_halves_split(index: GraphIndex, lin: Linear, node_i: int, width: int) -> tuple[list[WidthEdit], Reason | None]:
    node = index.graph.node[node_i]
    label = node_label(node, node_i)
    m = match(index, FUSED_SPLIT, node.output[0])
    if not m or len([o for o in node.output]) != 2:
        return [], Reason("gated", f"Split node {label} does not cut {lin.output} in two")
    rank = index.ranks.get(lin.output) or index.ranks.get(lin.data_input)
    axis = int(get_attr(node, "axis", 0))
    if not (axis == -1 or (rank is not None and axis == rank - 1)):
        return [], Reason("gated", f"Split node {label} cuts axis {axis}, not (known to be) the last")
    sizes = m.get("sizes")
    if sizes:
        value = index.constant_value(sizes)
        if value is None or [int(v) for v in value.reshape(-1)] != [width, width]:
            return [], Reason("gated", f"Split node {label} does not cut {lin.output} into equal halves")
        return [WidthEdit(node_i, 1, "scale")], None
    attr = get_attr(node, "split", None)
    if attr is not None:
        if list(attr) != [width, width]:
            return [], Reason("gated", f"Split node {label} does not cut {lin.output} into equal halves")
        return [WidthEdit(node_i, -1, "split-attr")], None
    return [], None  # num_outputs=2 (or no sizes): equal halves at any width


def _slice_bounds(index: GraphIndex, lin: Linear, slices: list[int], width: int) -> tuple[list[int], list[WidthEdit], Reason | None]:
    """The two Slices in order (first half first) and the constants to scale, or why they are not halves."""
    rank = index.ranks.get(lin.output) or index.ranks.get(lin.data_input)
    widened = {lin.output: Widened(rank, 2)}
    halves: dict[int, int] = {}
    edits: list[WidthEdit] = []
    for i in slices:
        node = index.graph.node[i]
        label = node_label(node, i)
        m = match(index, FUSED_SLICE, node.output[0])
        why = Reason("gated", f"Slice node {label} does not cut the last axis of {lin.output} in halves")
        if not m:
            return [], [], why
        axes = index.constant_value(m["axes"]) if m.get("axes") else None
        steps = index.constant_value(m["steps"]) if m.get("steps") else None
        if axes is None or [int(a) for a in axes.reshape(-1)] not in ([-1], [] if rank is None else [rank - 1]):
            return [], [], why
        if steps is not None and [int(s) for s in steps.reshape(-1)] != [1]:
            return [], [], why
        found = []
        for slot, var in ((1, "starts"), (2, "ends")):
            pair = profile(index, m[var], widened, width)
            if pair is None or pair[0].items is None or len(pair[0].items) != 1 or pair[1].items is None:
                return [], [], why
            a, b = pair[0].items[0], pair[1].items[0]
            if a is None or b is None:
                return [], [], why
            if a == b and a >= BIG:
                found.append(2)
                continue
            k, rest = divmod(a, width)
            if rest or k not in (0, 1, 2):
                return [], [], why
            if b == a and k > 0:
                if index.constant_source(m[var]) not in ("initializer", "constant"):
                    return [], [], why
                edits.append(WidthEdit(i, slot, "scale"))
            elif b != 3 * a:
                return [], [], why
            found.append(k)
        if found not in ([0, 1], [1, 2]):
            return [], [], why
        halves[found[0]] = i
    if set(halves) != {0, 1}:
        return [], [], Reason("gated", f"the Slices of {lin.output} do not cut it into its two halves")
    return [halves[0], halves[1]], edits, None


def fused_halves(index: GraphIndex, lin: Linear) -> FusedSplit | Reason | None:
    """How ``lin``'s output is cut into gate and up halves (the gate half is decided by the caller:
    ``gate`` is the first half here), a reason, or None when nothing cuts it."""
    out = lin.output
    users = index.consumers.get(out, [])
    cutters = [i for i in users if index.graph.node[i].op_type in ("Split", "Slice")]
    if not cutters:
        return None
    if out in index.graph_outputs:
        return Reason("graph-output", f"the fused gate/up output {out} is also a graph output")
    width, odd = divmod(lin.out_features, 2)
    if odd:
        return Reason("gated", f"{lin.name} has an odd number of outputs ({lin.out_features}) to cut in halves")
    readers = [i for i in users if index.graph.node[i].op_type == "Shape"]
    others = [i for i in users if i not in cutters and i not in readers]
    if others:
        node = index.graph.node[others[0]]
        return Reason("consumed", f"the fused gate/up output {out} is consumed by {node.op_type} node "
                      f"{node_label(node, others[0])} too")
    nodes: list[int] = []
    if len(cutters) == 1 and index.graph.node[cutters[0]].op_type == "Split" and not readers:
        edits, why = _equal_halves_split(index, lin, cutters[0], width)
        if why is not None:
            return why
        split = index.graph.node[cutters[0]]
        halves = list(split.output)
        nodes = [cutters[0]]
    elif len(cutters) == 2 and all(index.graph.node[i].op_type == "Slice" for i in cutters):
        ordered, edits, why = _slice_bounds(index, lin, cutters, width)
        if why is not None:
            return why
        halves = [index.graph.node[i].output[0] for i in ordered]
        nodes = list(ordered)
        for r in readers:
            closure, exits = shape_closure(index, index.graph.node[r].output[0])
            if any(c not in ordered or slot not in (1, 2) for c, slot, _ in exits):
                return Reason("gated", f"Shape node {node_label(index.graph.node[r], r)} reads the fused gate/up width "
                              "for something other than the cut")
            nodes += [r, *closure]
    else:
        return Reason("gated", f"{out} is cut by {len(cutters)} Split/Slice nodes, not into two halves")
    return FusedSplit(tuple(nodes), halves[0], halves[1], 0, tuple(edits))
