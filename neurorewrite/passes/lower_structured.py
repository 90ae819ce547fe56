"""The ``--structured`` FPE variant: shared input partition, children with tied outgoing weights.

Replaces the last linear of every expanded chain, ``W2'`` (pruned FPE copies), with the parent's
column copied to all ``alpha`` children and *tied* (one stored value per parent). With the ``shared``
split, W1' is ``alpha`` dense blocks, so the block computes ``y = W2 @ sum_k act(W1[:, S_k] x[S_k] +
b1/alpha) + b2``: the ``grouped`` format runs it as one batched MatMul, a ReduceSum over children and
W2 at its original size, i.e. the original FLOPs and bytes, in plain onnxruntime.

Counting (unique stored parameters, the same rule as ``fpe.py`` with tied columns counted once): the
expansion runs with ``prune="layer"``, which removes exactly the hidden-bias excess from W1' (and the
W2' excess, which this pass then replaces), so ``nnz(W1') + nnz(b1') + nnz(W2) + nnz(b2)`` equals the
original block's count exactly. Chain middles (a linear that is also the next block's first) keep
their FPE weights. Place in the pipeline: expand (split blocks, prune layer) -> **tie** -> calibrate
(``calibrate_model(..., tied=True)``, which keeps the ties) -> lower (grouped).
"""

from __future__ import annotations

import onnx

from neurorewrite.fpe import copy_outputs
from neurorewrite.passes.expand import ExpandReport, fpe_metadata
from neurorewrite.rewriter.blocks import blocks_by_output, chain_ends, find_blocks
from neurorewrite.rewriter.edit import NewWeights, replace_weights
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.linear import read_weights


def tie_outputs(original: onnx.ModelProto, expanded: onnx.ModelProto, report: ExpandReport) -> tuple[onnx.ModelProto, ExpandReport]:
    """Give every chain end's children their parent's outgoing column, tied; see the module docstring."""
    old_index = GraphIndex.build(original.graph)
    old_by_output = {b.second.output: b.second for b in find_blocks(original).blocks}
    updates = []
    for block in chain_ends(blocks_by_output(expanded, {b.output_tensor for b in report.blocks})):
        w2, _ = read_weights(old_index, old_by_output[block.second.output])
        updates.append(NewWeights(block.second, copy_outputs(w2, report.alpha), None))
    meta = {**fpe_metadata(report), "structured": True, "tied": [u.linear.name for u in updates]}
    return replace_weights(expanded, updates, stale_tensors=(), metadata=meta), report
