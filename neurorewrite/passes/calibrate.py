"""The calibration pass: a label-free least-squares refit of expanded blocks' outgoing weights.

Replaces the outgoing weights ``W2'`` (and bias ``b2``) of each expanded block with the least-squares
fit, on the kept support only, of the original block's output from the expanded block's hidden
activations on sample inputs (both computed by onnxruntime). It keeps the sparsity pattern, so the
nonzero count does not change; pruned weights stay exactly zero. It runs after ``expand``.

A gated block's down projection is refit the same way (its input is the gated product). In a chain
(``L1 -> act -> L2 -> act -> L3``) the middle linear is itself split by the next block, so
only the last linear of each chain is refit, against the original chain's output. Blocks are refit in
graph order, each seeing the already calibrated earlier blocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import onnx

from neurorewrite.errors import DataError
from neurorewrite.executor import match_inputs, plain_session, run_with_outputs
from neurorewrite.fpe import copy_outputs
from neurorewrite.passes.expand_blocks import ExpandReport
from neurorewrite.rewriter.blocks import blocks_by_output, chain_ends
from neurorewrite.rewriter.editor import NewWeights, replace_weights
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.linear import features_last, read_weights
from neurorewrite.rewriter.record import read_record, write_record

RIDGE = 1e-4  # relative to the mean diagonal of the Gram matrix: keeps collinear children solvable


def refit_rows(hidden: np.ndarray, target: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Least squares per output row on that row's nonzero support, with a small ridge.

    ``hidden`` (N, H'), ``target`` (N, O), ``w`` (O, H'). The bias is refit where it is nonzero.
    A fitted weight that comes out exactly zero is nudged to the smallest normal float, so the
    nonzero count cannot drop.
    """
    n = hidden.shape[0]
    h64 = hidden.astype(np.float64)
    ones = np.ones((n, 1))
    aug = np.hstack([h64, ones])  # last column: the bias
    gram = aug.T @ aug
    rhs = aug.T @ target.astype(np.float64)
    ridge = RIDGE * float(np.mean(np.diag(gram)[:-1])) if gram.shape[0] > 1 else RIDGE
    new_w = np.zeros_like(w)
    new_b = None if b is None else b.copy()
    tiny = np.finfo(w.dtype).tiny
    for o in range(w.shape[0]):
        support = np.flatnonzero(w[o])
        use_bias = b is not None and b[o] != 0
        cols = np.append(support, aug.shape[1] - 1) if use_bias else support
        if cols.size == 0:
            continue
        g = gram[np.ix_(cols, cols)]
        reg = np.full(cols.size, ridge)
        if use_bias:
            reg[-1] = 0.0
        sol = np.linalg.solve(g + np.diag(reg), rhs[cols, o])
        fitted = sol[: support.size].astype(w.dtype)
        fitted[fitted == 0] = tiny
        new_w[o, support] = fitted
        if use_bias and new_b is not None:
            new_b[o] = sol[-1] if sol[-1] != 0 else tiny
    return new_w, new_b


def calibrate_model(
    original: onnx.ModelProto,
    expanded: onnx.ModelProto,
    report: ExpandReport,
    sample: Mapping[str, np.ndarray],
    tied: bool = False,
) -> tuple[onnx.ModelProto, ExpandReport]:
    """Refit the last linear of every expanded chain; see the module docstring.

    With ``tied`` (the ``--structured`` variant, where the ``alpha`` children of a parent share one
    outgoing column) the fit is on the children's summed activations, one weight per parent, so the
    ties survive.
    """
    feeds = match_inputs(plain_session(original), sample, "--calibrate")
    ends = chain_ends(blocks_by_output(expanded, {b.output_tensor for b in report.blocks}))
    alpha = report.alpha if tied else 1
    targets = run_with_outputs(original, feeds, [b.second.output for b in ends])
    model, notes = expanded, []
    for block in ends:
        # indices shift between models only if nodes were removed; look the block up by tensor name
        lin = blocks_by_output(model, {block.second.output})[0].second
        hidden = run_with_outputs(model, feeds, [lin.data_input, lin.output])
        h = features_last(hidden[lin.data_input], lin, lin.in_features).reshape(-1, lin.in_features // alpha, alpha).sum(axis=-1)
        y_exp = features_last(hidden[lin.output], lin, lin.out_features)
        y = features_last(targets[lin.output], lin, lin.out_features)
        if h.shape[0] < 2:
            raise DataError("--calibrate: the sample needs at least 2 rows")
        w, b = read_weights(GraphIndex.build(model.graph), lin)
        new_w, new_b = refit_rows(h, y, w[:, ::alpha], b)
        model = replace_weights(model, [NewWeights(lin, copy_outputs(new_w, alpha), new_b)])
        y_new = (h.astype(np.float64) @ new_w.T.astype(np.float64)) + (0 if new_b is None else new_b)
        notes.append({
            "block": block.name, "layer": lin.name, "rows": int(h.shape[0]),
            "rmse_before": float(np.sqrt(np.mean((y_exp - y) ** 2))),
            "rmse_after": float(np.sqrt(np.mean((y_new - y) ** 2))),
        })
    record = read_record(model)
    # add the calibrated layers to the record; with nothing refit ``model`` is still the input: leave it
    if notes and record is not None:
        write_record(model, record.evolve(calibrated=tuple(str(n["layer"]) for n in notes)))
    return model, replace(report, calibration=notes)
