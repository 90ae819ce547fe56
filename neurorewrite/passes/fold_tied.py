"""Folding tied children: a SparseLinear whose input columns repeat in runs of ``alpha`` reads the
children's sum instead.

FPE copies each parent's outgoing column to its ``alpha`` children (``fpe/expand.copy_outputs``), and
the global prune keeps or drops the copies of one weight together (they have one magnitude). So, until
fine-tuning or calibration moves them apart, ``W2'[:, j*alpha + k]`` is the same column for every
child ``k`` and

    Y = W2' @ h'  ==  W2 @ s,   s[j] = sum_k h'[j*alpha + k],

with ``W2`` the pruned parent matrix: ``1/alpha`` of the stored nonzeros. The pass rewrites each such
node into ``Reshape -> ReduceSum -> SparseLinear(W2)`` with standard ops for the sum; a runtime then
reads ``alpha`` times fewer second-layer weights. The file on disk keeps the full expanded operator: the
fold is applied where the model is loaded (``runtime.ort_session``, ``runtime.compile``).

Invariant: the outputs are those of the input model up to float summation order (tests: onnxruntime,
1e-5 relative); a node whose columns are not tied exactly is left as it is. The input is not modified.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from neurorewrite.passes.lower_graph import GraphRewrite, default_opset, leading_shape
from neurorewrite.passes.lower_sparse import DOMAIN, OP, csr_from_entries, narrowest_int
from neurorewrite.rewriter.edit import read_metadata
from neurorewrite.rewriter.graph import get_attr, node_label


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
    """Rewrite every SparseLinear whose entries are mostly tied child copies to sum the children first;
    see the module docstring. Returns the input object itself when nothing folds."""
    record = read_metadata(model) or {}
    alpha = record.get("alpha")
    report = FoldReport(int(alpha) if isinstance(alpha, int) else None)
    if report.alpha is None or report.alpha < 2 or not any(n.domain == DOMAIN and n.op_type == OP for n in model.graph.node):
        return model, report
    alpha = report.alpha
    rw = GraphRewrite.start(model)
    opset = default_opset(model)
    for i, node in enumerate(model.graph.node):
        if node.domain != DOMAIN or node.op_type != OP or get_attr(node, "format", b"csr") not in (b"csr", "csr"):
            continue
        label = node_label(node, i)
        arrays = [rw.index.constant_value(name) for name in node.input[1:4]]
        n_in = int(get_attr(node, "in_features", -1))
        if any(a is None for a in arrays) or n_in % alpha:
            report.kept.append({"node": label, "reason": f"constant CSR arrays over a multiple of {alpha} inputs needed"})
            continue
        parents, rest = split_tied(*arrays, n_in, alpha)  # type: ignore[misc]
        nnz = int(arrays[0].size)  # type: ignore[union-attr]
        if parents[0].size * alpha < nnz / 2:  # too few tied runs for the sum to pay off
            report.kept.append({"node": label, "reason": f"columns are not tied in runs of {alpha}"})
            continue
        rw.emit[i] = _folded_nodes(rw, node, label, parents, rest, n_in // alpha, alpha, opset)
        rw.remove.add(i)
        rw.drop_inits |= {
            name for name in node.input[1:4]
            if rw.index.constant_source(name) == "initializer" and rw.index.consumer_count(name) == 1
        }
        report.folded.append({
            "node": label, "nonzeros": nnz, "parent_nonzeros": int(parents[0].size), "untied_nonzeros": int(rest[0].size),
        })
    if not report.folded:
        return model, report
    return rw.apply(model), report


def _folded_nodes(rw: GraphRewrite, node: onnx.NodeProto, label: str, parents: Csr, rest: Csr,
                  n_parents: int, alpha: int, opset: int) -> list[onnx.NodeProto]:
    """``SparseLinear(parents, bias)(ReduceSum(Reshape(x, [..., n_parents, alpha])))`` plus, when some
    copies are untied, ``SparseLinear(rest)`` on the columns of ``x`` they read."""
    x = node.input[0]
    (runs,) = rw.node("Reshape", [x, leading_shape(rw, x, label, [n_parents, alpha])], label)
    if opset >= 13:
        (summed,) = rw.node("ReduceSum", [runs, rw.const(label + ".axis", np.array([-1], np.int64))], label, keepdims=0)
    else:
        (summed,) = rw.node("ReduceSum", [runs], label, axes=[-1], keepdims=0)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    bias = [node.input[4]] if len(node.input) > 4 and node.input[4] else []
    out = node.output[0]
    main = out if rest[0].size == 0 else rw.name(label + ".parents")
    nodes = [*rw.take(), _sparse_node(rw, [summed], parents, bias, main, label + "/parents", {**attrs, "in_features": n_parents})]
    if rest[0].size:
        # the few untied copies read a handful of children: gather those, not the whole hidden layer
        used, local = np.unique(rest[1].astype(np.int64), return_inverse=True)
        (picked,) = rw.node("Gather", [x, rw.const(label + ".untied_columns", used)], label, axis=-1)
        untied = rw.name(label + ".untied")
        csr = (rest[0], local.astype(narrowest_int(max(used.size - 1, 0))), rest[2])
        nodes += [*rw.take(), _sparse_node(rw, [picked], csr, [], untied, label + "/untied", {**attrs, "in_features": int(used.size)})]
        nodes.append(helper.make_node("Add", [main, untied], [out], name=rw.name(label + "/Add")))
    return nodes


def _sparse_node(rw: GraphRewrite, data: list[str], csr: Csr, bias: list[str], out: str, base: str,
                 attrs: dict[str, object]) -> onnx.NodeProto:
    arrays = [rw.const(f"{base}.{role}", a) for role, a in zip(("values", "indices", "indptr"), csr)]
    return helper.make_node(OP, [*data, *arrays, *bias], [out], name=rw.name(base), domain=DOMAIN, **attrs)
