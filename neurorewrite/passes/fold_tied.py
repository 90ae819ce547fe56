"""Folding tied children: a SparseLinear whose input columns repeat in runs of ``alpha`` reads the
children's sum instead.

FPE copies each parent's outgoing column to its ``alpha`` children (``fpe/block.copy_outputs``), and
the global prune keeps or drops the copies of one weight together (they have one magnitude). So, until
fine-tuning or calibration moves them apart, ``W2'[:, j*alpha + k]`` is the same column for every
child ``k`` and

    Y = W2' @ h'  ==  W2 @ s,   s[j] = sum_k h'[j*alpha + k],

with ``W2`` the pruned parent matrix: ``1/alpha`` of the stored nonzeros. The pass rewrites each such
node into ``Reshape -> ReduceSum -> SparseLinear(W2)`` with standard ops for the sum; a runtime then
reads ``alpha`` times fewer second-layer weights. The file on disk keeps the full expanded operator: the
fold is the first step of the runtime preparation (:mod:`neurorewrite.passes.prepare`).

Invariant: the outputs are those of the input model up to float summation order (tests: onnxruntime,
1e-5 relative). A node folds when at least half of its nonzeros are tied runs (below that the sum does not
pay for itself); the copies of a run that is not tied exactly are kept as they are, beside the fold.
Everything the fold writes is named after the node it replaces, so a profile or a viewer leads back to
the layer. The input is not modified.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from neurorewrite.ops import csr_from_entries, is_sparse_linear, narrowest_int, sparse_linear_node
from neurorewrite.rewriter.editor import RUNTIME_ONLY, GraphEditor
from neurorewrite.rewriter.graph import get_attr, node_label
from neurorewrite.rewriter.record import read_record
from neurorewrite.rewriter.sparse_nodes import read_sparse_linear


@dataclass
class FoldReport:
    """One row per SparseLinear node: folded (with its nonzeros before and after) or why not."""

    alpha: int | None
    folded: list[dict[str, object]] = field(default_factory=list)
    kept: list[dict[str, object]] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return bool(self.folded)


Csr = tuple[np.ndarray, np.ndarray, np.ndarray]


def split_tied(values: np.ndarray, indices: np.ndarray, indptr: np.ndarray, n_in: int, alpha: int) -> tuple[Csr, Csr]:
    """``(parents, rest)``: the runs of ``alpha`` equal copies at columns ``j*alpha .. j*alpha+alpha-1``
    as one entry per parent ``j`` (a CSR over ``in/alpha`` columns), and every other entry unchanged (a
    CSR over the original columns). ``rest`` is nearly empty after a global prune: only a parent whose
    copies straddle the threshold keeps some of them."""
    rows = np.repeat(np.arange(indptr.size - 1), np.diff(indptr.astype(np.int64)))
    parents = indices.astype(np.int64) // alpha
    key = rows * (int(parents.max(initial=0)) + 1) + parents  # CSR order: the copies of a run are adjacent
    start = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if key.size else np.zeros(0, np.int64)
    size = np.diff(np.r_[start, key.size])
    run_of = np.repeat(np.arange(start.size), size)
    unequal = np.bincount(run_of, weights=values != values[start[run_of]], minlength=start.size)
    tied = (size == alpha) & (unequal == 0)
    first = start[tied]
    rest = ~tied[run_of]
    n_rows = indptr.size - 1
    return (
        csr_from_entries(values[first], rows[first], parents[first], (n_rows, n_in // alpha)),
        csr_from_entries(values[rest], rows[rest], indices[rest].astype(np.int64), (n_rows, n_in)),
    )


def fold_tied_children(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FoldReport]:
    """Rewrite every SparseLinear whose entries are at least half tied child copies to sum the children first;
    see the module docstring. Returns the input object itself when nothing folds."""
    record = read_record(model)
    report = FoldReport(None if record is None else record.alpha)
    if report.alpha is None or report.alpha < 2 or not any(is_sparse_linear(n) for n in model.graph.node):
        return model, report
    alpha = report.alpha
    editor = GraphEditor.start(model)
    for i, node in enumerate(model.graph.node):
        if not is_sparse_linear(node):
            continue
        label = node_label(node, i)
        csr, _ = read_sparse_linear(editor.index, i)
        if csr.in_features % alpha:
            report.kept.append({"node": label, "reason": f"in_features is not a multiple of {alpha}"})
            continue
        parents, rest = split_tied(csr.values, csr.indices, csr.indptr, csr.in_features, alpha)
        if parents[0].size * alpha < csr.nonzeros / 2:  # too few tied runs for the sum to pay off
            report.kept.append({"node": label, "reason": f"columns are not tied in runs of {alpha}"})
            continue
        editor.replace_node(i, _folded_nodes(editor, node, label, parents, rest, csr.in_features // alpha, alpha))
        editor.drop_inits |= {
            name for name in node.input[1:4]
            if editor.index.constant_source(name) == "initializer" and editor.index.consumer_count(name) == 1
        }
        report.folded.append({
            "node": label, "nonzeros": csr.nonzeros, "parent_nonzeros": int(parents[0].size),
            "untied_nonzeros": int(rest[0].size),
        })
    if not report.folded:
        return model, report
    return editor.apply(model), report


def _folded_nodes(editor: GraphEditor, node: onnx.NodeProto, label: str, parents: Csr, rest: Csr,
                  n_parents: int, alpha: int) -> list[onnx.NodeProto]:
    """``SparseLinear(parents, bias)(ReduceSum(Reshape(x, [..., n_parents, alpha])))`` plus, when some
    copies are untied, ``SparseLinear(rest)`` on the columns of ``x`` they read."""
    x = node.input[0]
    (runs,) = editor.node("Reshape", [x, editor.leading_shape(x, label, [n_parents, alpha])], label)
    summed = editor.reduce_sum(runs, [-1], label)
    n_out = int(get_attr(node, "out_features", -1))
    bias = [node.input[4]] if len(node.input) > 4 and node.input[4] else []
    out = node.output[0]
    main = out if rest[0].size == 0 else editor.name(label + ".parents")
    _sparse_node(editor, [summed], parents, bias, main, label + "/parents", n_parents, n_out)
    if rest[0].size:
        # the few untied copies read a handful of children: gather those, not the whole hidden layer
        used, local = np.unique(rest[1].astype(np.int64), return_inverse=True)
        (picked,) = editor.node("Gather", [x, editor.const(label + ".untied_columns", used, RUNTIME_ONLY)], label, axis=-1)
        untied = editor.name(label + ".untied")
        csr = (rest[0], local.astype(narrowest_int(max(used.size - 1, 0))), rest[2])
        _sparse_node(editor, [picked], csr, [], untied, label + "/untied", int(used.size), n_out)
        editor.node("Add", [main, untied], label, outputs=[out])
    return editor.take()


def _sparse_node(editor: GraphEditor, data: list[str], csr: Csr, bias: list[str], out: str, base: str,
                 n_in: int, n_out: int) -> None:
    arrays = [editor.const(f"{base}.{role}", a, RUNTIME_ONLY) for role, a in zip(("values", "indices", "indptr"), csr)]
    editor.pending.append(sparse_linear_node([*data, *arrays, *bias], out, editor.name(base), n_in, n_out))
