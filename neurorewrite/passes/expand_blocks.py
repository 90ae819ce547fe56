"""The FPE expansion pass.

Replaces each selected MLP block ``second(act(first(x)))`` with its FPE expansion: ``first`` gets
``alpha * H`` outputs whose rows hold disjoint shares of each parent row, ``second`` gets ``alpha * H``
inputs whose columns copy the parent columns, and both are pruned back to the block's original count
(the numpy core, :func:`neurorewrite.fpe.expand_block`; the method: ``docs/methods.md``).

Before: ``find_blocks`` matched the block (constant, unshared weights; the hidden tensor feeds only the
activation and the second linear). After: every node outside the blocks, the graph inputs and outputs,
the opset imports and other domains are as they were; ``nonzeros(block) == nonzeros(original block)``
exactly for every rewritten block (weights and biases counted); the FPE record
(:mod:`neurorewrite.rewriter.record`) goes to ``metadata_props``. The input model is never modified.
Place in the pipeline: **expand** -> (tie) -> (calibrate) -> lower.

Blocks in a chain (``L1 -> act -> L2 -> act -> L3``) share a linear: they are expanded in graph order,
and the later block splits the already widened weights, so both counts stay exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx

from neurorewrite.errors import NoBlocksError
from neurorewrite.fpe import FPEConfig, block_seed, expand_block
from neurorewrite.rewriter.blocks import MLPBlock, Skipped, find_blocks, select_blocks
from neurorewrite.rewriter.editor import NewWeights, replace_weights
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.linear import Linear, read_weights
from neurorewrite.rewriter.record import BlockRecord, FPERecord

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

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @property
    def modified(self) -> bool:
        return bool(self.blocks)


def no_blocks_error(where: str, skipped: list[Skipped]) -> NoBlocksError:
    """The error for a model with nothing to rewrite, naming the first near misses and why they missed."""
    detail = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:5])
    hint = f" (near misses: {detail})" if detail else " (looked for Gemm/MatMul -> activation -> Gemm/MatMul)"
    return NoBlocksError(f"{where}: no MLP block to rewrite{hint}")


def expand_model(
    model: onnx.ModelProto,
    cfg: FPEConfig,
    layers: list[str] | None = None,
    progress: Progress | None = None,
    where: str = "model",
) -> tuple[onnx.ModelProto, ExpandReport]:
    """Expand the MLP blocks of ``model`` (all, or those ``layers`` selects); see the module docstring."""
    search = find_blocks(model)
    blocks, skipped = select_blocks(search, layers)
    if not blocks:
        raise no_blocks_error(where, skipped)
    index = GraphIndex.build(model.graph)
    current: dict[int, tuple[Linear, np.ndarray, np.ndarray | None]] = {}
    report = ExpandReport(cfg.alpha, cfg.split, cfg.seed, cfg.bias, cfg.prune, skipped=skipped)
    stale: set[str] = set()
    for position, block in enumerate(blocks):
        if progress is not None:
            progress(position, len(blocks), block.name)
        w1, b1 = _current(index, current, block.first)
        w2, b2 = _current(index, current, block.second)
        exp = expand_block(w1, b1, w2, b2, replace(cfg, seed=block_seed(cfg.seed, position)))
        current[block.first.node] = (block.first, exp.w1, exp.b1)
        current[block.second.node] = (block.second, exp.w2, exp.b2)
        stale |= _widened_tensors(model, block)
        report.blocks.append(
            BlockRecord(
                name=block.name, first=block.first.name, second=block.second.name, activation=block.activation,
                in_features=block.in_features, width_before=w1.shape[0], width_after=exp.w1.shape[0],
                out_features=block.out_features, nnz_before=exp.nnz_before, nnz_after=exp.nnz_after,
                hidden_tensor=block.hidden, output_tensor=block.second.output,
            )
        )
    if progress is not None:
        progress(len(blocks), len(blocks), "writing")
    if blocks:  # the loop's last arrays would stay alive through the whole conversion below
        del exp, w1, w2, b1, b2
    # hand the expanded arrays over one at a time so each is freed once it is in the new model
    updates = (NewWeights(*current.pop(node)) for node in list(current))
    record = FPERecord(cfg, tuple(report.blocks))
    return replace_weights(model, updates, stale, record=record), report


def _current(
    index: GraphIndex, current: dict[int, tuple[Linear, np.ndarray, np.ndarray | None]], lin: Linear
) -> tuple[np.ndarray, np.ndarray | None]:
    if lin.node in current:
        _, w, b = current[lin.node]
        return w, b
    return read_weights(index, lin)


def _widened_tensors(model: onnx.ModelProto, block: MLPBlock) -> set[str]:
    """Tensors whose last dimension changes: the first linear's outputs and the activation region."""
    names = set(block.region_tensors)
    for i in block.first.nodes:
        names |= set(model.graph.node[i].output)
    return names
