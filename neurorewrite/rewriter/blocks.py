"""Block detection: which ``linear -> activation -> linear`` pieces of a graph are MLP blocks.

Matching is pattern / check: :func:`find_blocks` returns the blocks that can be rewritten and, for
linear layers followed by an activation that are not, a :class:`Skipped` with the reason.

The forms with a fixed shape are declared patterns (:mod:`.patterns`): the linear layers
(:mod:`.linear`), the activation decompositions (:mod:`.activations`), the fused gate/up cut
(:mod:`.gated`). The region between two linears is walked (:mod:`.region`): any connected region of
elementwise nodes whose other operands are scalar constants, with shape-only nodes that keep the
hidden width last (GPT-2's Conv1D reshapes), and, for a gated block, one ``Mul`` by the up
projection. Widening such a region is safe: every op acts per element and broadcasts its constants;
the shape constants that hold the width are listed (:class:`~neurorewrite.rewriter.gated.WidthEdit`)
and rewritten with it.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace

import onnx

from neurorewrite.errors import InvalidOptionError
from neurorewrite.rewriter.activations import activation_label
from neurorewrite.rewriter.block_checks import block_notes, graph_input_problem, refused_near_misses
from neurorewrite.rewriter.gated import FusedSplit, WidthEdit, find_up, fused_halves
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.linear import Linear, scan_linears
from neurorewrite.rewriter.patterns import Reason
from neurorewrite.rewriter.region import SHAPE_ONLY, Region, check_shapes, walk_region
from neurorewrite.rewriter.shapes import Widened
from neurorewrite.rewriter.stored import per_child_blocks


@dataclass(frozen=True)
class MLPBlock:
    """``h = act(first(x))`` (gated: ``act(gate(x)) * up(x)``), ``y = second(h)``: the unit FPE rewrites.

    ``first`` is the gate of a gated block; when gate and up are one fused linear, ``first`` is that
    linear and ``split`` says how its output is cut.
    """

    name: str
    first: Linear
    second: Linear
    activation: str
    activation_nodes: tuple[int, ...]  # the region's nodes: activation, gated product, shape-only nodes
    hidden: str  # the tensor the second linear reads (activation output)
    region_tensors: tuple[str, ...]  # tensors of width H between the linears (the fused output: 2H)
    up: Linear | None = None
    split: FusedSplit | None = None
    widen: tuple[WidthEdit, ...] = ()  # shape constants holding H, rewritten with the width
    notes: tuple[str, ...] = ()  # what the report should say about it (shared tensors, a bias held elsewhere)
    shape_nodes: bool = False  # the region holds shape-only nodes or Shape readers, not only elementwise ones

    @property
    def gated(self) -> bool:
        return self.up is not None or self.split is not None

    @property
    def form(self) -> str:
        return "gated (fused gate/up)" if self.split is not None else "gated" if self.up is not None else "mlp"

    @property
    def width(self) -> int:
        return self.first.out_features // (2 if self.split is not None else 1)

    @property
    def in_features(self) -> int:
        return self.first.in_features

    @property
    def out_features(self) -> int:
        return self.second.out_features

    @property
    def linears(self) -> tuple[Linear, ...]:
        return (self.first, self.second) if self.up is None else (self.first, self.up, self.second)

    @property
    def nodes(self) -> frozenset[int]:
        """Every graph node that computes the block from its input: linears, the fused cut, the region."""
        cut = self.split.nodes if self.split is not None else ()
        return frozenset((*(n for lin in self.linears for n in lin.nodes), *cut, *self.activation_nodes))



@dataclass(frozen=True)
class Skipped:
    """A linear layer followed by an activation that is not rewritten, and why (``code``: the kind of reason)."""

    name: str
    reason: str
    code: str = ""


@dataclass
class BlockSearch:
    blocks: list[MLPBlock] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


@dataclass
class _Context:
    index: GraphIndex
    by_input: dict[str, list[Linear]]
    by_output: dict[str, Linear]


def _label(ctx: _Context, region: Region, product: int | None) -> str:
    """The activation's name: the declared decomposition (or op) computing the gate part of the region."""
    index = ctx.index
    core = [i for i in region.elementwise if i != product]
    if not core:
        return "Identity"
    produced = {index.graph.node[i].output[0]: i for i in core}
    ends = [t for t, i in produced.items() if any(c not in core for c in index.consumers.get(t, ()))
            or any(lin.node in index.consumers.get(t, ()) for lin in ctx.by_input.get(t, []))]
    starts = [t for t in region.tensors if t not in produced and any(c in core for c in index.consumers.get(t, ()))]
    if len(ends) == 1:
        for start in starts:
            label = activation_label(index, start, ends[0], core)
            if not label.startswith("elementwise"):
                return label
    return activation_label(index, starts[0] if starts else region.start, ends[0] if ends else region.start, core)


def _block_from(ctx: _Context, first: Linear, region: Region, up: Linear | None, split: FusedSplit | None) -> MLPBlock | Reason:
    """Check the exits and shapes of a walked region and build the block (or say why not)."""
    index = ctx.index
    if len(region.exits) > 1 or len({e[0] for e in region.exits}) > 1:
        return Reason("fan-out", "the hidden activation feeds several linear layers")
    hidden, second = region.exits[0]
    width = first.out_features // (2 if split is not None else 1)
    if second.in_features != width:
        return Reason("width", f"{first.name} has {width} outputs but {second.name} reads {second.in_features}")
    extra = {}
    if split is not None:
        rank = index.ranks.get(first.output) or index.ranks.get(first.data_input)
        extra = {first.output: Widened(rank, 2), split.up: Widened(rank)}
    elif up is not None:
        extra = {up.output: Widened(region.ranks.get(region.start))}
    verdicts, why = check_shapes(index, region, width, extra)
    if why is not None:
        return why
    for lin in (first, up, second):
        why = graph_input_problem(index, lin) if lin is not None else None
        if why is not None:
            return why
    product = region.operands[0][0] if region.operands else None
    label = _label(ctx, region, product)
    tensors = list(region.tensors)
    if up is not None:
        tensors.append(up.output)
    if split is not None:
        tensors = [first.output, *tensors, split.up]
    edits = [WidthEdit(i, 1, "reshape-target") for i, follows in verdicts if not follows]
    if split is not None:
        edits += list(split.edits)
    block = MLPBlock(
        name=first.name, first=first, second=second, activation=f"{label} (gated)" if up or split else label,
        activation_nodes=tuple(sorted(region.nodes)), hidden=hidden, region_tensors=tuple(tensors), up=up,
        split=split, widen=tuple(edits), shape_nodes=bool(region.reshapes or region.shape_only or region.shape_readers),
    )
    return replace(block, notes=tuple(block_notes(index, block)))


def _try_first(ctx: _Context, lin: Linear) -> tuple[MLPBlock | Reason | None, bool]:
    """The block ``lin`` starts, the reason it does not, or None (nothing block-like); and whether an
    activation follows it."""
    index = ctx.index
    fused_bias = lin.bias if lin.bias_node is not None else None
    cut = fused_halves(index, lin)
    if isinstance(cut, Reason):
        return cut, _cut_feeds_activation(ctx, lin)
    if cut is not None:
        rank = index.ranks.get(lin.output) or index.ranks.get(lin.data_input)
        attempts: list[Reason] = []
        for gate_half, (gate, up) in enumerate(((cut.gate, cut.up), (cut.up, cut.gate))):
            region = walk_region(index, gate, rank, ctx.by_input, fused_bias, lin.feature_axis, lin.out_features // 2)
            if region.reason is None and region.exits and [t for _, t in region.operands] == [up] \
                    and index.graph.node[region.operands[0][0]].op_type == "Mul" and index.consumer_count(up) == 1:
                split = FusedSplit(cut.nodes, gate, up, gate_half, cut.edits)
                return _block_from(ctx, lin, region, None, split), True
            attempts.append(region.reason or Reason("gated", f"the halves of {lin.output} do not meet in one gated product"))
        return attempts[0], True
    rank = 2 if lin.op == "Gemm" else 2 + len(lin.kernel) if lin.kernel else index.ranks.get(lin.data_input)
    region = walk_region(index, lin.output, rank, ctx.by_input, fused_bias, lin.feature_axis, lin.out_features)
    looks = region.looks_like_activation
    if region.reason is not None:
        return region.reason, looks
    if not region.exits:
        return None, looks
    looks = True  # linear -> elementwise -> linear: block-like whatever the ops
    up = None
    if region.operands:
        found = find_up(index, region, lin, ctx.by_output)
        if isinstance(found, Reason):
            return found, looks
        up = found
    return _block_from(ctx, lin, region, up, None), looks


def _per_child(index: GraphIndex, linears: dict[int, Linear]) -> list[MLPBlock]:
    """The ``--structured`` lone tied blocks written one MatMul per child, read back (:mod:`.stored`)."""
    blocks = []
    for first, up, second, (start, end, core), nodes in per_child_blocks(index, linears):
        label = activation_label(index, start, end, core)
        blocks.append(MLPBlock(
            name=first.name, first=first, second=second, activation=f"{label} (gated)" if up is not None else label,
            activation_nodes=tuple(nodes), hidden="", region_tensors=(), up=up,
        ))
    return blocks


def _cut_feeds_activation(ctx: _Context, lin: Linear) -> bool:
    """Whether a piece of ``lin``'s output that a Split or Slice cuts off goes through an activation."""
    index = ctx.index
    for c in index.consumers.get(lin.output, []):
        node = index.graph.node[c]
        if node.op_type in ("Split", "Slice"):
            for out in node.output:
                if out and walk_region(index, out, None, ctx.by_input).looks_like_activation:
                    return True
    return False


def find_blocks(model: onnx.ModelProto) -> BlockSearch:
    """All MLP blocks of the main graph in graph order, and the near misses with their reasons."""
    index = GraphIndex.build(model.graph)
    scan = scan_linears(index)
    by_input: dict[str, list[Linear]] = {}
    for lin in scan.linears.values():
        by_input.setdefault(lin.data_input, []).append(lin)
    ctx = _Context(index, by_input, {lin.output: lin for lin in scan.linears.values()})
    search = BlockSearch()
    misses: list[tuple[Linear, Reason]] = []
    for lin in scan.linears.values():
        result, looks = _try_first(ctx, lin)
        if isinstance(result, MLPBlock):
            search.blocks.append(result)
        elif isinstance(result, Reason) and looks:
            misses.append((lin, result))
    search.blocks += _per_child(index, scan.linears)
    search.blocks.sort(key=lambda b: b.first.node)
    in_blocks = {part.node for b in search.blocks for lin in b.linears for part in (lin, *lin.parts)}
    search.skipped += [Skipped(lin.name, r.message, r.code) for lin, r in misses if lin.node not in in_blocks]
    search.skipped += [Skipped(name, r.message, r.code) for name, r in refused_near_misses(index, scan.refused)]
    return search


def shape_only_nodes(index: GraphIndex, block: MLPBlock) -> list[int]:
    """The block's Reshape/Flatten/Squeeze/Unsqueeze nodes: each keeps the hidden width last (the walk
    admits no others), so on rows ``(R, width)`` each is an identity."""
    return [i for i in block.activation_nodes
            if index.graph.node[i].op_type in SHAPE_ONLY and index.graph.node[i].domain in ("", "ai.onnx")]


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
            skipped.append(Skipped(block.name, "not selected by --layers", "not-selected"))
    return chosen, skipped
