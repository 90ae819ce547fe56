"""Folding constant children: a hidden unit whose first-layer rows are all empty is a bias of the next layer.

The prune can leave an FPE child without a single input weight (after the tiered split a third to three
quarters of a calibrated model's children are such: ``docs/methods.md`` 1.7). Its pre-activation is its
bias on every row, so everything downstream of it up to the next linear layer is a constant. For a
block of SparseLinears, ``B`` reading ``h = f(A_1(x), ..., A_k(x))`` with ``f`` element-wise per hidden
column, column ``c`` of ``h`` is constant when row ``c`` is empty in every ``A_i``:
``h[..., c] = f(b_1[c], ..., b_k[c])``. With ``C`` those columns and ``K`` the others,

    B(h) = B[:, K] @ h[..., K] + (b_B + B[:, C] @ f(b[C])),

so the pass drops rows ``C`` from every ``A_i`` (they store nothing) and columns ``C`` from ``B`` (their
entries move into its bias), and cuts to ``K`` what else holds the hidden width: a bias an activation
node adds (BiasGelu, FastGelu), the sizes of a Split or the bounds of the Slices that cut a fused
gate/up output, a Reshape target. It also orders ``K`` by the first layers' row lengths, longest first:
after a calibration the lead children (about 3/4 of their parent's inputs) come before the children
with a handful of inputs, so a runtime can run the dense rows and the sparse rows as two contiguous
blocks (``compile`` does). Where fewer than :data:`MIN_CONSTANT_SHARE` of the columns are constant the
block is left whole: removing a few children breaks the runs of ``alpha`` siblings that the
labeled-tile kernels read. The constant values are computed by onnxruntime running ``f`` itself on the
biases: whatever ``f`` is, the fold uses the runtime's own arithmetic for it.

The blocks are the ones :func:`neurorewrite.rewriter.blocks.find_blocks` finds in the sparse model, by
the walk ``expand`` used on the original (so ``f`` is what ``expand`` rewrote: element-wise nodes with
scalar operands, GPT-2's reshapes, a gated product). In a chain ``L1 -> f -> L2 -> g -> L3`` the middle
layer is the second layer of one block and the first of the next: the second block is folded on the
model the first fold wrote.

Invariant: the outputs are those of the input model up to float summation order (tests: onnxruntime,
1e-5 relative); the ``A_i`` keep every stored entry; ``B`` keeps every entry of the columns it keeps.
Everything the fold writes is named after the node it changes. The input is not modified.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from neurorewrite.ops import DOMAIN, CsrMatrix, csr_from_entries, is_sparse_linear
from neurorewrite.rewriter.blocks import MLPBlock, find_blocks, shape_only_nodes
from neurorewrite.rewriter.editor import RUNTIME_ONLY, GraphEditor
from neurorewrite.rewriter.graph import GraphIndex, node_label
from neurorewrite.rewriter.linear import Linear
from neurorewrite.rewriter.sparse_nodes import read_sparse_linear
from neurorewrite.rewriter.widen import resize_shapes

MIN_CONSTANT_SHARE = 1 / 8  # fewer constant columns than this: the children's runs are worth more intact


@dataclass
class ConstantFoldReport:
    """One row per second layer whose input is an element-wise function of first layers: folded (how many
    hidden columns were constant, how many entries moved into the bias) or why not."""

    folded: list[dict[str, object]] = field(default_factory=list)
    kept: list[dict[str, object]] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return bool(self.folded)


@dataclass(frozen=True)
class _Leaf:
    """A hidden-width tensor a first layer computes: its output, or one half of a fused gate/up output;
    hidden column ``c`` is row ``offset + c`` of ``layer``."""

    tensor: str
    layer: Linear
    offset: int


def _leaves(block: MLPBlock) -> list[_Leaf]:
    """The tensors the block's element-wise function reads, each with the rows of the layer behind it."""
    if block.split is not None:
        gate_offset = block.split.gate_half * block.width
        return [_Leaf(block.split.gate, block.first, gate_offset),
                _Leaf(block.split.up, block.first, block.width - gate_offset)]
    return [_Leaf(lin.output, lin, 0) for lin in (block.first, block.up) if lin is not None]


def fold_constant_children(model: onnx.ModelProto) -> tuple[onnx.ModelProto, ConstantFoldReport]:
    """Fold the constant hidden columns of every block of SparseLinears into the second layer's bias; see
    the module docstring. Returns the input object itself when nothing folds."""
    report = ConstantFoldReport()
    if not any(is_sparse_linear(n) for n in model.graph.node):
        return model, report
    decided: set[str] = set()  # blocks by their output tensor, which every fold keeps
    while True:
        editor, touched, waiting = None, set(), False
        for block in find_blocks(model).blocks:
            if block.second.output in decided or any(lin.op != "SparseLinear" for lin in block.linears):
                continue
            layers = {lin.node for lin in block.linears}
            if layers & touched:  # the middle layer of a chain: its other block folds on the rewritten model
                waiting = True
                continue
            decided.add(block.second.output)
            editor = editor or GraphEditor.start(model)
            if _fold_block(editor, model, block, report):
                touched |= layers
        if editor is not None and touched:
            model = editor.apply(model)
        if not waiting:
            return model, report


def _fold_block(editor: GraphEditor, model: onnx.ModelProto, block: MLPBlock, report: ConstantFoldReport) -> bool:
    """Queue the fold of one block on ``editor``, or report why it is kept; True when it folds."""
    index, width = editor.index, block.width
    label = node_label(model.graph.node[block.second.node], block.second.node)
    leaves = _leaves(block)
    firsts = {leaf.layer.node: (leaf.layer, *read_sparse_linear(index, leaf.layer.node)) for leaf in leaves}
    empty = np.ones(width, dtype=bool)
    lengths = np.zeros(width, dtype=np.int64)
    leaf_values = {}
    for leaf in leaves:
        _, csr, bias = firsts[leaf.layer.node]
        rows = slice(leaf.offset, leaf.offset + width)
        row_lengths = np.diff(csr.indptr)[rows]
        empty &= row_lengths == 0
        lengths += row_lengths
        # a bias an activation node adds is that node's operand, so f adds it itself
        leaf_values[leaf.tensor] = (np.zeros(width, csr.values.dtype) if bias is None
                                    else np.asarray(bias).reshape(-1)[rows])
    constant = np.flatnonzero(empty)
    if constant.size in (0, width) or constant.size < MIN_CONSTANT_SHARE * width:
        reason = ("no hidden column is constant" if constant.size == 0 else "every hidden column is constant"
                  if constant.size == width else f"only {constant.size} of {width} hidden columns are constant")
        report.kept.append({"node": label, "reason": reason})
        return False
    values = _evaluate(model, index, block, leaf_values)[constant]
    keep = np.flatnonzero(~empty)
    keep = keep[np.argsort(-lengths[keep], kind="stable")]  # longest rows first: see the module docstring
    for a, (lin, csr, bias) in firsts.items():
        offsets = sorted(leaf.offset for leaf in leaves if leaf.layer.node == a)
        rows = np.concatenate([offset + keep for offset in offsets])
        _narrow_first(editor, a, csr, bias, rows)
        if lin.bias_node is not None:
            _narrow_held_bias(editor, lin, rows)
    resize_shapes(editor, block, int(keep.size), "kept")
    moved = _fold_second(editor, block.second.node, label, empty, keep, constant, values)
    editor.stale |= {*block.region_tensors, block.hidden, *(leaf.tensor for leaf in leaves)}
    editor.stale |= {model.graph.node[a].output[0] for a in firsts}
    report.folded.append({
        "node": label, "first_layers": [node_label(model.graph.node[a], a) for a in sorted(firsts)],
        "children": width, "constant": int(constant.size), "folded_nonzeros": moved,
    })
    return True


def _evaluate(model: onnx.ModelProto, index: GraphIndex, block: MLPBlock, leaf_values: dict[str, np.ndarray]) -> np.ndarray:
    """``f`` at the given leaf values (each ``(width,)``), for every hidden column, run by onnxruntime."""
    graph = index.graph
    first = next(iter(leaf_values.values()))
    elem, width = helper.np_dtype_to_tensor_dtype(first.dtype), first.size
    inputs = [helper.make_tensor_value_info(name, elem, [1, width]) for name in leaf_values]
    same = set(shape_only_nodes(index, block))  # values unchanged: on a [1, width] row each is an Identity
    nodes = [helper.make_node("Identity", [graph.node[i].input[0]], [graph.node[i].output[0]]) if i in same
             else graph.node[i] for i in block.activation_nodes]
    operands = {name for n in nodes for name in n.input
                if name and index.constant_source(name) in ("initializer", "constant")}
    inits = [onnx.numpy_helper.from_array(np.asarray(index.constant_value(name)), name) for name in sorted(operands)]
    small = helper.make_model(
        helper.make_graph(nodes, "constant_children", inputs, [helper.make_tensor_value_info(block.hidden, elem, None)],
                          inits),
        opset_imports=[o for o in model.opset_import if o.domain != DOMAIN], ir_version=model.ir_version,
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph's own arithmetic
    session = ort.InferenceSession(small.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {name: value.reshape(1, width) for name, value in leaf_values.items()}
    return np.asarray(session.run([block.hidden], feed)[0]).reshape(-1)


def _replace_inputs(editor: GraphEditor, i: int, inputs: dict[int, np.ndarray], base: str, roles: tuple[str, ...],
                    **attrs: int) -> None:
    """Node ``i`` reading new constants (named ``base.ROLE``) in the given input slots, with ``attrs`` set."""
    old = editor.index.graph.node[i]
    node = onnx.NodeProto()
    node.CopyFrom(old)
    names = list(node.input) + [""] * (max(inputs, default=0) + 1 - len(node.input))
    for slot, value in inputs.items():
        if names[slot]:
            editor.drop_constant(names[slot])
        names[slot] = editor.const(f"{base}.{roles[slot]}", value, RUNTIME_ONLY)
    del node.input[:]
    node.input.extend(names)
    for attr in node.attribute:
        if attr.name in attrs:
            attr.i = attrs[attr.name]
    editor.replace_node(i, [node])


SPARSE_ROLES = ("x", "values", "indices", "indptr", "bias")


def _narrow_first(editor: GraphEditor, a: int, csr: CsrMatrix, bias: np.ndarray | None, rows: np.ndarray) -> None:
    """First layer ``a`` holding ``rows`` in that order (the others are empty): the same entries, moved
    with their rows."""
    lengths = np.diff(csr.indptr)[rows]
    indptr = np.zeros(rows.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    # entry k of new row i is old entry csr.indptr[rows[i]] + k
    take = np.repeat(csr.indptr[rows] - indptr[:-1], lengths) + np.arange(int(indptr[-1]))
    node = editor.index.graph.node[a]
    index_types = [editor.index.constant_dtype(node.input[slot]) for slot in (2, 3)]
    inputs = {1: csr.values[take], 2: csr.indices[take].astype(index_types[0]), 3: indptr.astype(index_types[1])}
    if bias is not None:
        inputs[4] = np.asarray(bias).reshape(-1)[rows]
    label = node_label(editor.index.graph.node[a], a)
    _replace_inputs(editor, a, inputs, label + "/kept", SPARSE_ROLES, out_features=int(rows.size))


def _narrow_held_bias(editor: GraphEditor, lin: Linear, rows: np.ndarray) -> None:
    """The bias an activation node adds for ``lin``, cut to ``rows`` (a scalar one stays)."""
    value = np.asarray(editor.index.constant_value(lin.bias))
    if value.size == 1:
        return
    holder = editor.index.graph.node[lin.bias_node]
    slot = list(holder.input).index(lin.bias)
    editor.rename_input(lin.bias_node, slot, editor.const(lin.bias + ".kept", np.take(value, rows, axis=-1), RUNTIME_ONLY))


def _fold_second(editor: GraphEditor, b: int, label: str, empty: np.ndarray, keep: np.ndarray,
                 constant: np.ndarray, values: np.ndarray) -> int:
    """Second layer ``b`` without the constant columns, their contribution added to its bias; returns how
    many stored entries moved into the bias."""
    csr, bias = read_sparse_linear(editor.index, b)
    rows = csr.rows
    cols = csr.indices
    moved = empty[cols]
    hidden = np.zeros(empty.size)
    hidden[constant] = values
    shift = np.bincount(rows[moved], weights=csr.values[moved].astype(np.float64) * hidden[cols[moved]],
                        minlength=csr.out_features)
    new_bias = shift if bias is None else np.asarray(bias, np.float64).reshape(-1) + shift
    position = np.empty(empty.size, dtype=np.int64)
    position[keep] = np.arange(keep.size)  # a kept column's place among the kept ones
    kept = ~moved
    # CSR wants the columns of a row ascending; the kept columns' new order is not the old one
    order = np.lexsort((position[cols[kept]], rows[kept]))
    arrays = csr_from_entries(csr.values[kept][order], rows[kept][order], position[cols[kept]][order],
                              (csr.out_features, keep.size))
    inputs = dict(zip((1, 2, 3), arrays))
    inputs[4] = new_bias.astype(csr.values.dtype)
    _replace_inputs(editor, b, inputs, label + "/kept", SPARSE_ROLES, in_features=int(keep.size))
    return int(moved.sum())
