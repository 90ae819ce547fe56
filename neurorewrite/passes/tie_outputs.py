"""The tie step of the ``--structured`` FPE variant: children share their parent's outgoing column.

Replaces the last linear of every expanded chain, ``W2'`` (pruned FPE copies), with the parent's
ORIGINAL column copied to all ``alpha`` children and *tied* (one stored value per parent). With a
one-partition split (``blocks``, ``shared``, ``feature``), W1' is ``alpha`` dense blocks, so the block
computes ``y = W2 @ sum_k act(W1[:, S_k] x[S_k] + b1/alpha) + b2``: the ``grouped`` format runs it
with the original FLOPs and bytes in plain onnxruntime.

Counting (unique stored parameters, tied columns counted once): the expansion runs with
``prune="layer"``, which removes exactly the hidden-bias excess from W1' (and the W2' excess, which
this pass then replaces), so ``nnz(W1') + nnz(b1') + nnz(W2) + nnz(b2)`` equals the original block's
count exactly. Chain middles (a linear that is also the next block's first) keep their FPE weights.
The record gets ``structured`` and the tied layers. The input model is not modified.
Place in the pipeline: expand (one-partition split, prune layer) -> **tie** -> calibrate (tied) ->
lower (grouped).
"""

from __future__ import annotations

import onnx

from neurorewrite.fpe import copy_outputs
from neurorewrite.passes.expand_blocks import ExpandReport
from neurorewrite.rewriter.blocks import blocks_by_output, chain_ends, find_blocks
from neurorewrite.rewriter.editor import NewWeights, replace_weights
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.linear import read_weights
from neurorewrite.rewriter.record import read_record


def tie_outputs(original: onnx.ModelProto, expanded: onnx.ModelProto, report: ExpandReport) -> tuple[onnx.ModelProto, ExpandReport]:
    """Give every chain end's children their parent's outgoing column, tied; see the module docstring."""
    record = read_record(expanded)
    if record is None:
        raise ValueError("the tie step runs after expand, on a model with an FPE record")
    old_index = GraphIndex.build(original.graph)
    old_by_output = {b.second.output: b.second for b in find_blocks(original).blocks}
    updates = []
    for block in chain_ends(blocks_by_output(expanded, record.output_tensors)):
        w2, _ = read_weights(old_index, old_by_output[block.second.output])
        updates.append(NewWeights(block.second, copy_outputs(w2, record.alpha), None))
    tied = record.evolve(structured=True, tied=tuple(u.linear.name for u in updates))
    return replace_weights(expanded, updates, record=tied), report
