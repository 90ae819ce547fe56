"""The FPE expansion pass.

Replaces each selected MLP block ``second(act(first(x)))`` with its FPE expansion: ``first`` gets
``alpha * H`` outputs whose rows hold disjoint shares of each parent row, ``second`` gets ``alpha * H``
inputs whose columns copy the parent columns, and both are pruned back to the block's original count
(the numpy core, :func:`neurorewrite.fpe.expand_block`; the method: ``docs/methods.md``). A gated
block ``second(act(gate(x)) * up(x))`` is expanded by :func:`neurorewrite.fpe.expand_gated_block`:
gate and up rows share one partition per parent and the prune runs over gate, up and down together;
when gate and up are one fused linear, its two halves are expanded as gate and up and the cut
(Split sizes, Slice bounds) is rewritten for the new width, as are reshape targets that hold it.

Before: ``find_blocks`` matched the block (constant weights; the hidden tensor feeds only the activation
and the second linear). After: every node outside the blocks, the graph inputs and outputs, the opset
imports and other domains are as they were; ``nonzeros(block) == nonzeros(original block)`` exactly for
every rewritten block (weights and biases counted); a weight or bias other nodes read too is rewritten
on a private copy (the others keep the original; the record's block notes say so); the FPE record
(:mod:`neurorewrite.rewriter.record`) goes to ``metadata_props``. The input model is never modified.
Place in the pipeline: **expand** -> (tie) -> (calibrate) -> lower.

Blocks in a chain (``L1 -> act -> L2 -> act -> L3``) share a linear: they are expanded in graph order,
and the later block splits the already widened weights, so both counts stay exact.

Blocks that read the same weights (ALBERT's layers share one FFN; the TorchScript exporter writes the
second use as ``Identity`` copies, the dynamo exporter as a second initializer with the same values)
are expanded once: the first such block is expanded and every other reads its expanded tensors, so
each block keeps its count and all of them keep computing one function. The model keeps its count
too, or, where the export stored the shared weights once per use, stores them once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx

from neurorewrite.errors import NoBlocksError
from neurorewrite.fpe import FPEConfig, PruneScales, block_seed, expand_block, expand_gated_block, join_fused, split_fused
from neurorewrite.fpe.block import Weights
from neurorewrite.rewriter.block_checks import block_notes
from neurorewrite.rewriter.blocks import MLPBlock, Skipped, find_blocks, select_blocks
from neurorewrite.rewriter.editor import GraphEditor, content_key
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.linear import Linear, read_weights
from neurorewrite.rewriter.record import BlockRecord, FPERecord, write_record
from neurorewrite.rewriter.widen import widen_shapes

Progress = Callable[[int, int, str], None]


@dataclass
class ExpandReport:
    """What the pass did: one row per rewritten block, and the blocks it left alone with why."""

    alpha: int
    split: str
    seed: int
    bias: str
    prune: str
    blocks: list[BlockRecord] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    calibration: list[dict[str, object]] = field(default_factory=list)
    format: str = "dense"
    calibration_summary: dict[str, object] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # shown on stderr by the CLI
    lead_share: float | None = None  # the tiered split's share of inputs for child 0 (None: balanced tiers)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @property
    def modified(self) -> bool:
        return bool(self.blocks)


def no_blocks_error(where: str, skipped: list[Skipped]) -> NoBlocksError:
    """The error for a model with nothing to rewrite, naming the first near misses and why they missed."""
    detail = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:5])
    hint = f" (near misses: {detail})" if detail else " (looked for Gemm/MatMul/Conv -> activation -> Gemm/MatMul/Conv)"
    return NoBlocksError(f"{where}: no MLP block to rewrite{hint}")


class _Current:
    """The weights of every linear as the blocks expanded so far left them."""

    def __init__(self, index: GraphIndex) -> None:
        self.index = index
        self.weights: dict[int, tuple[Linear, np.ndarray, np.ndarray | None]] = {}
        self.bias_changed: set[int] = set()
        self.followers: list[tuple[Linear, int]] = []  # a layer that reads another's new tensors, and that one's node

    def follow(self, block: MLPBlock, leader: MLPBlock) -> None:
        """``block`` reads the weights ``leader`` reads: it will read the tensors ``leader``'s expansion makes."""
        for lin, lead in zip(block.linears, leader.linears):
            self.followers.append((lin, lead.node))

    def get(self, lin: Linear) -> Weights:
        if lin.node in self.weights:
            _, w, b = self.weights[lin.node]
            return w, b
        return read_weights(self.index, lin)

    def set(self, lin: Linear, w: np.ndarray, b: np.ndarray | None, bias_changed: bool) -> None:
        self.weights[lin.node] = (lin, w, b)
        if bias_changed:
            self.bias_changed.add(lin.node)

    def hand_over(self, editor: GraphEditor) -> None:
        """Give each layer its new weights, one at a time (each array can be freed once it is converted).
        A bias FPE did not change is left in place (so a shared one stays shared)."""
        names: dict[int, list[str]] = {}
        for node in list(self.weights):
            lin, w, b = self.weights.pop(node)
            keep_bias = node not in self.bias_changed and lin.bias_scale == 1.0
            names[node] = editor.set_weights(lin, w, None if keep_bias else b)
        for lin, leader in self.followers:
            editor.share_weights(lin, names[leader])


def _expand_one(current: _Current, block: MLPBlock, cfg: FPEConfig,
                scales: PruneScales | None = None, input_scale: np.ndarray | None = None) -> tuple[int, int, int, int]:
    """Expand one block into ``current``; returns (width before, after, nonzeros before, after)."""
    wd, bd = current.get(block.second)
    if not block.gated:
        w1, b1 = current.get(block.first)
        exp = expand_block(w1, b1, wd, bd, cfg, _fit_scales(scales, w1.shape[1]), _fit_columns(input_scale, w1.shape[1]))
        current.set(block.first, exp.w1, exp.b1, True)
        current.set(block.second, exp.w2, exp.b2, False)
        return w1.shape[0], exp.w1.shape[0], exp.nnz_before, exp.nnz_after
    if block.split is not None:
        (wg, bg), (wu, bu) = split_fused(*current.get(block.first), block.split.gate_half)
    elif block.up is not None:
        (wg, bg), (wu, bu) = current.get(block.first), current.get(block.up)
    else:
        raise ValueError(f"gated block {block.name} has neither an up projection nor a fused cut")
    g = expand_gated_block(wg, bg, wu, bu, wd, bd, cfg, _fit_scales(scales, wg.shape[1]), _fit_columns(input_scale, wg.shape[1]))
    if block.split is not None:
        current.set(block.first, *join_fused((g.wg, g.bg), (g.wu, g.bu), block.split.gate_half), True)
    else:
        current.set(block.first, g.wg, g.bg, True)
        current.set(block.up, g.wu, g.bu, True)  # type: ignore[arg-type]  (not None: see above)
    current.set(block.second, g.wd, g.bd, False)
    return wg.shape[0], g.wg.shape[0], g.nnz_before, g.nnz_after


def expand_model(
    model: onnx.ModelProto,
    cfg: FPEConfig,
    layers: list[str] | None = None,
    progress: Progress | None = None,
    where: str = "model",
    scales: Mapping[str, PruneScales] | None = None,
    input_scales: Mapping[str, np.ndarray] | None = None,
) -> tuple[onnx.ModelProto, ExpandReport]:
    """Expand the MLP blocks of ``model`` (all, or those ``layers`` selects); see the module docstring.

    ``scales`` (per block name) makes the prune activation-aware (:mod:`neurorewrite.passes.activation_stats`);
    ``input_scales`` (per block name, its inputs' rms on a sample) weigh the ``tiered`` split's ranking.
    """
    search = find_blocks(model)
    chosen, skipped = select_blocks(search, layers)
    blocks = [b for b in chosen if not any(lin.read_only for lin in b.linears)]
    skipped += [Skipped(b.name, f"block {b.name} is stored as {_stored_as(b)}, which is read, not rewritten; expand "
                        "the dense model instead", "stored-format") for b in chosen if b not in blocks]
    if not blocks:
        raise no_blocks_error(where, skipped)
    editor = GraphEditor.start(model)
    current = _Current(editor.index)
    report = ExpandReport(cfg.alpha, cfg.split, cfg.seed, cfg.bias, cfg.prune, skipped=skipped,
                          lead_share=cfg.lead_share)
    leaders = shared_weight_leaders(editor.index, blocks)
    counts: dict[int, tuple[int, int, int, int]] = {}
    for position, block in enumerate(blocks):
        if progress is not None:
            progress(position, len(blocks), block.name)
        leader = leaders.get(position, position)
        if leader == position:
            # the k-th block expanded gets block k's seed: fpe_expand lists a block run several times once
            ordinal = sum(leaders.get(p, p) == p for p in range(position))
            counts[position] = _expand_one(
                current, block, replace(cfg, seed=block_seed(cfg.seed, ordinal)),
                scales.get(block.name) if scales else None, input_scales.get(block.name) if input_scales else None)
        else:
            current.follow(block, blocks[leader])
            counts[position] = counts[leader]
        before, after, nnz_before, nnz_after = counts[position]
        notes = block.notes
        group = [blocks[p].name for p in range(len(blocks)) if leaders.get(p, p) == leader]
        if len(group) > 1:
            others = ", ".join(name for name in group if name != block.name)
            notes = (*block_notes(editor.index, block, len(group)),
                     f"reads the same weights as block(s) {others}: expanded once, and all of them read the expanded tensors")
        widen_shapes(editor, block, cfg.alpha)
        editor.stale |= _widened_tensors(model, block)
        report.blocks.append(
            BlockRecord(
                name=block.name, first=block.first.name, second=block.second.name, activation=block.activation,
                in_features=block.in_features, width_before=before, width_after=after,
                out_features=block.out_features, nnz_before=nnz_before, nnz_after=nnz_after,
                hidden_tensor=block.hidden, output_tensor=block.second.output,
                up=None if block.up is None else block.up.name, form=block.form, notes=notes,
            )
        )
    if progress is not None:
        progress(len(blocks), len(blocks), "writing")
    current.hand_over(editor)
    new = editor.apply(model)
    write_record(new, FPERecord(cfg, tuple(report.blocks)))
    return new, report


def _weights_key(index: GraphIndex, lin: Linear) -> tuple:
    """What a layer computes from its input, up to the graph: the values of the constants it reads (the
    dynamo exporter stores a shared layer's transposed weight once per use) and how it reads them."""
    values = [None if name is None else index.constant_value(name) for name in (lin.weight, lin.bias)]
    digests = tuple(None if v is None else content_key(np.asarray(v)) for v in values)
    return (*digests, lin.op, lin.weight_out_in, lin.scale, lin.bias_scale, lin.kernel, lin.feature_axis,
            lin.in_features, lin.out_features, lin.bias_node is not None)


def shared_weight_leaders(index: GraphIndex, blocks: list[MLPBlock]) -> dict[int, int]:
    """Position of each block that reads the same weights, the same way, as an earlier block -> the
    position of the first such block (the one that is expanded). A block in a chain (a linear it shares
    with another block) is left out: the chain's expansion order already accounts for it."""
    uses = Counter(lin.node for block in blocks for lin in block.linears)
    first: dict[tuple, int] = {}
    leaders: dict[int, int] = {}
    for position, block in enumerate(blocks):
        if any(uses[lin.node] > 1 for lin in block.linears):
            continue
        cut = None if block.split is None else block.split.gate_half
        key = (block.form, cut, tuple(_weights_key(index, lin) for lin in block.linears))
        leaders_position = first.setdefault(key, position)
        if leaders_position != position:
            leaders[position] = leaders_position
    return leaders


def _stored_as(block: MLPBlock) -> str:
    return ", ".join(sorted({lin.op for lin in block.linears if lin.read_only}))


def _fit_scales(scales: PruneScales | None, inputs: int) -> PruneScales | None:
    if scales is None or scales.in_columns is None:
        return scales
    return replace(scales, in_columns=_fit_columns(scales.in_columns, inputs))


def _fit_columns(columns: np.ndarray | None, inputs: int) -> np.ndarray | None:
    """In a chain, a later block's inputs are the children of an earlier one: each child takes its
    parent's input statistic."""
    if columns is None or len(columns) == inputs:
        return columns
    return np.repeat(columns, inputs // len(columns))



def _widened_tensors(model: onnx.ModelProto, block: MLPBlock) -> set[str]:
    """Tensors whose width changes: the region's (with a fused gate/up, its output and the cut's outputs
    too: :class:`~neurorewrite.rewriter.blocks.MLPBlock` lists them) and every output of the first (and
    up) linear's nodes (a MatMul's output before its bias Add)."""
    names = set(block.region_tensors)
    for lin in (block.first, block.up):
        for i in () if lin is None else lin.nodes:
            names |= set(model.graph.node[i].output)
    return names
