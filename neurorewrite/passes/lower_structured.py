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
their FPE weights. Place in the pipeline: expand (split shared, prune layer) -> **tie** -> calibrate
(:func:`calibrate_tied`, which keeps the ties) -> lower (grouped).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import onnx

from neurorewrite.errors import DataError
from neurorewrite.fpe import copy_outputs
from neurorewrite.passes.calibrate import refit_rows
from neurorewrite.passes.expand import ExpandReport, fpe_metadata
from neurorewrite.passes.lower import expanded_blocks
from neurorewrite.rewriter.blocks import MLPBlock, find_blocks
from neurorewrite.rewriter.edit import METADATA_KEY, NewWeights, read_metadata, replace_weights
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.linear import read_weights
from neurorewrite.runtime.ort import match_inputs, ort_session, run_with_outputs

STRUCTURED_SPLITS = ("shared", "feature")


def _chain_ends(model: onnx.ModelProto) -> list[MLPBlock]:
    record = read_metadata(model) or {}
    blocks = expanded_blocks(model, record)
    firsts = {b.first.node for b in blocks}
    return [b for b in blocks if b.second.node not in firsts]


def tie_outputs(original: onnx.ModelProto, expanded: onnx.ModelProto, report: ExpandReport) -> tuple[onnx.ModelProto, ExpandReport]:
    """Give every chain end's children their parent's outgoing column, tied; see the module docstring."""
    old_index = GraphIndex.build(original.graph)
    old_by_output = {b.second.output: b.second for b in find_blocks(original).blocks}
    updates = []
    for block in _chain_ends(expanded):
        w2, _ = read_weights(old_index, old_by_output[block.second.output])
        updates.append(NewWeights(block.second, copy_outputs(w2, report.alpha), None))
    meta = {**fpe_metadata(report), "structured": True, "tied": [u.linear.name for u in updates]}
    return replace_weights(expanded, updates, stale_tensors=(), metadata=meta), report


def calibrate_tied(
    original: onnx.ModelProto, expanded: onnx.ModelProto, report: ExpandReport, sample: Mapping[str, np.ndarray]
) -> tuple[onnx.ModelProto, ExpandReport]:
    """The calibration pass for tied blocks: refit W2 on the children's summed activations.

    Same least squares as :func:`neurorewrite.passes.calibrate.refit_rows` (support kept, so the
    count does not change), but one weight per parent, so the ties and the dense speed stay.
    """
    feeds = match_inputs(ort_session(original, providers=["CPUExecutionProvider"]), sample, "--calibrate")
    ends = _chain_ends(expanded)
    targets = run_with_outputs(original, feeds, [b.second.output for b in ends])
    model, notes, alpha = expanded, [], report.alpha
    for block in ends:
        lin = next(b for b in find_blocks(model).blocks if b.second.output == block.second.output).second
        values = run_with_outputs(model, feeds, [lin.data_input, lin.output])
        h = values[lin.data_input].reshape(-1, lin.in_features // alpha, alpha).sum(axis=-1)
        y = targets[lin.output].reshape(-1, lin.out_features)
        if h.shape[0] < 2:
            raise DataError("--calibrate: the sample needs at least 2 rows")
        w, b = read_weights(GraphIndex.build(model.graph), lin)
        new_w, new_b = refit_rows(h, y, w[:, ::alpha], b)
        model = replace_weights(model, [NewWeights(lin, copy_outputs(new_w, alpha), new_b)], stale_tensors=())
        y_new = h.astype(np.float64) @ new_w.T.astype(np.float64) + (0 if new_b is None else new_b)
        y_old = values[lin.output].reshape(-1, lin.out_features)
        notes.append({
            "block": block.name, "layer": lin.name, "rows": int(h.shape[0]),
            "rmse_before": float(np.sqrt(np.mean((y_old - y) ** 2))),
            "rmse_after": float(np.sqrt(np.mean((y_new - y) ** 2))),
        })
    report = replace(report, calibration=notes)
    return _update_record(model, {"calibrated": [n["layer"] for n in notes]}), report


def _update_record(model: onnx.ModelProto, extra: dict[str, object]) -> onnx.ModelProto:
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = json.dumps({**json.loads(prop.value), **extra}, sort_keys=True)
    return model
