"""Folding constant children: a hidden unit whose first-layer rows are all empty is a bias of the next layer.

The prune can leave an FPE child without a single input weight (after the tiered split a third to three
quarters of a calibrated model's children are such: ``docs/methods.md`` 1.7). Its pre-activation is its bias on every
row, so everything downstream of it up to the next linear layer is a constant. For a SparseLinear
``B`` reading ``h = f(A_1(x), ..., A_k(x))``, where ``f`` is element-wise per hidden column (a chain of
element-wise operators whose other operands are scalars or per-column vectors) and each ``A_i`` is a
SparseLinear whose output only ``f`` reads, column ``c`` of ``h`` is constant when row ``c`` is empty in
every ``A_i``: ``h[..., c] = f(b_1[c], ..., b_k[c])``. With ``C`` those columns and ``K`` the others,

    B(h) = B[:, K] @ h[..., K] + (b_B + B[:, C] @ f(b[C])),

so the pass drops rows ``C`` from every ``A_i`` (they store nothing), columns ``C`` from ``B`` (their
entries move into its bias), and slices ``f``'s per-column operands to ``K``. It also orders ``K`` by
the first layers' row lengths, longest first: after a calibration the lead children (about 3/4 of
their parent's inputs) come before the children with a handful of inputs, so a runtime can run the
dense rows and the sparse rows as two contiguous blocks (``compile`` does). Where fewer than
:data:`MIN_CONSTANT_SHARE` of the columns are constant the layer is left whole: removing a few children
breaks the runs of ``alpha`` siblings that the labeled-tile kernels read. The constant values are
computed by onnxruntime running ``f`` itself on the biases: whatever ``f`` is, the fold uses the
runtime's own arithmetic for it.

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
from neurorewrite.rewriter.activations import is_elementwise
from neurorewrite.rewriter.editor import GraphEditor
from neurorewrite.rewriter.graph import GraphIndex, get_attr, node_label
from neurorewrite.rewriter.sparse_nodes import read_sparse_linear

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
    """A hidden-width tensor a first layer computes: its output, or one part of it cut by a Split (a fused
    gate/up projection); hidden column ``c`` is row ``offset + c`` of first layer ``first``."""

    tensor: str
    first: int
    offset: int


@dataclass
class _Hidden:
    """What ``B`` reads: the leaves, the element-wise nodes between them and ``B`` in graph order, the
    Splits that cut first layers, and the per-column operands ((node, input slot) of each)."""

    leaves: list[_Leaf]
    chain: list[int]
    splits: list[int]
    columns: list[tuple[int, int]]

    @property
    def first(self) -> list[int]:
        return sorted({leaf.first for leaf in self.leaves})


def _operand_kind(index: GraphIndex, name: str, width: int) -> str | None:
    """'scalar' or 'column' for a constant operand that broadcasts along the hidden width, else None."""
    shape = index.constant_shape(name)
    if shape is None:
        return None
    if int(np.prod(shape, dtype=np.int64)) == 1:
        return "scalar"
    if shape and shape[-1] == width and all(d == 1 for d in shape[:-1]):
        return "column"
    return None


def split_sizes(index: GraphIndex, node: onnx.NodeProto) -> list[int] | None:
    """The sizes a Split along the last axis cuts, or None (another axis, or sizes not constant)."""
    axis = int(get_attr(node, "axis", 0))
    rank = index.ranks.get(node.input[0])
    if axis != -1 and (rank is None or axis != rank - 1):
        return None
    if len(node.input) > 1 and node.input[1]:
        sizes = index.constant_value(node.input[1])
        return None if sizes is None else [int(v) for v in np.asarray(sizes).reshape(-1)]
    listed = get_attr(node, "split", None)
    if listed:
        return [int(v) for v in listed]
    producer = index.graph.node[index.producer[node.input[0]]]
    total = int(get_attr(producer, "out_features", -1))
    parts = len(node.output)
    return [total // parts] * parts if total % parts == 0 else None


def _leaves_of(index: GraphIndex, name: str, width: int) -> list[_Leaf] | str:
    """The leaves behind ``name`` when a first layer computes it (directly or through a Split)."""
    producer = index.producer[name]
    node = index.graph.node[producer]
    if is_sparse_linear(node):
        if int(get_attr(node, "out_features", -1)) != width:
            return f"{node_label(node, producer)} has another width"
        return [_Leaf(name, producer, 0)]
    first = index.producer.get(node.input[0]) if node.input else None
    if first is None or not is_sparse_linear(index.graph.node[first]):
        return f"{node_label(node, producer)} (Split) does not cut a first layer"
    sizes = split_sizes(index, node)
    if sizes is None or any(size != width for size in sizes) or len(sizes) != len(node.output):
        return f"{node_label(node, producer)} does not cut the hidden width along the last axis"
    if int(get_attr(index.graph.node[first], "out_features", -1)) != width * len(sizes):
        return f"{node_label(node, producer)} does not cut all of its first layer"
    return [_Leaf(out, first, k * width) for k, out in enumerate(node.output)]


def find_hidden(index: GraphIndex, b: int, width: int) -> _Hidden | str:
    """The element-wise chain from first layers to node ``b``'s input, or why ``b``'s input is not one."""
    leaves: dict[str, _Leaf] = {}
    chain: set[int] = set()
    splits: set[int] = set()
    columns: list[tuple[int, int]] = []
    tensors: set[str] = set()
    pending = [index.graph.node[b].input[0]]
    while pending:
        name = pending.pop()
        if name in tensors:
            continue
        tensors.add(name)
        producer = index.producer.get(name)
        if producer is None:
            return f"{name} is not computed from a first layer"
        node = index.graph.node[producer]
        if is_sparse_linear(node) or (node.op_type == "Split" and node.domain in ("", "ai.onnx")):
            found = _leaves_of(index, name, width)
            if isinstance(found, str):
                return found
            leaves.update((leaf.tensor, leaf) for leaf in found)
            if not is_sparse_linear(node):
                splits.add(producer)
                tensors.update(node.output)
                tensors.add(node.input[0])
            continue
        if not is_elementwise(node) or len(node.output) != 1:
            return f"{node_label(node, producer)} ({node.op_type}) is not element-wise"
        chain.add(producer)
        for slot, operand in enumerate(node.input):
            if not operand:
                continue
            if index.constant_source(operand) in ("initializer", "constant"):
                kind = _operand_kind(index, operand, width)
                if kind is None:
                    return f"{node_label(node, producer)} reads {operand}, which does not broadcast per column"
                if kind == "column":
                    columns.append((producer, slot))
            else:
                pending.append(operand)
    readers = chain | splits | {b}
    for name in tensors:
        if name in index.graph_outputs or any(i not in readers for i in index.consumers.get(name, ())):
            return f"{name} is also read elsewhere"
    return _Hidden(sorted(leaves.values(), key=lambda leaf: (leaf.first, leaf.offset)), sorted(chain),
                   sorted(splits), columns)


def _evaluate(model: onnx.ModelProto, index: GraphIndex, hidden: _Hidden, b: int,
              leaf_values: dict[str, np.ndarray]) -> np.ndarray:
    """``f`` at the given leaf values (each ``(width,)``), for every hidden column, run by onnxruntime."""
    graph = index.graph
    first = next(iter(leaf_values.values()))
    elem, width = helper.np_dtype_to_tensor_dtype(first.dtype), first.size
    inputs = [helper.make_tensor_value_info(name, elem, [1, width]) for name in leaf_values]
    nodes = [graph.node[i] for i in hidden.chain]
    operands = {name for n in nodes for name in n.input
                if name and index.constant_source(name) in ("initializer", "constant")}
    inits = [onnx.numpy_helper.from_array(np.asarray(index.constant_value(name)), name) for name in sorted(operands)]
    out = graph.node[b].input[0]
    small = helper.make_model(
        helper.make_graph(nodes, "constant_children", inputs, [helper.make_tensor_value_info(out, elem, None)], inits),
        opset_imports=[o for o in model.opset_import if o.domain != DOMAIN], ir_version=model.ir_version,
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph's own arithmetic
    session = ort.InferenceSession(small.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {name: value.reshape(1, width) for name, value in leaf_values.items()}
    return np.asarray(session.run([out], feed)[0]).reshape(-1)


def fold_constant_children(model: onnx.ModelProto) -> tuple[onnx.ModelProto, ConstantFoldReport]:
    """Fold the constant hidden columns of every SparseLinear pair into the second layer's bias; see the
    module docstring. Returns the input object itself when nothing folds."""
    report = ConstantFoldReport()
    if not any(is_sparse_linear(n) for n in model.graph.node):
        return model, report
    editor = GraphEditor.start(model)
    index = editor.index
    for b, node in enumerate(model.graph.node):
        if not is_sparse_linear(node):
            continue
        width = int(get_attr(node, "in_features", -1))
        hidden = find_hidden(index, b, width)
        if isinstance(hidden, str):
            continue  # not a second layer: nothing to say about it
        label = node_label(node, b)
        firsts = {a: read_sparse_linear(index, a) for a in hidden.first}
        empty = np.ones(width, dtype=bool)
        leaf_values = {}
        for leaf in hidden.leaves:
            csr, bias = firsts[leaf.first]
            rows = slice(leaf.offset, leaf.offset + width)
            empty &= np.diff(csr.indptr)[rows] == 0
            leaf_values[leaf.tensor] = (np.zeros(width, csr.values.dtype) if bias is None
                                        else np.asarray(bias).reshape(-1)[rows])
        constant = np.flatnonzero(empty)
        if constant.size in (0, width) or constant.size < MIN_CONSTANT_SHARE * width:
            reason = ("no hidden column is constant" if constant.size == 0 else "every hidden column is constant"
                      if constant.size == width else f"only {constant.size} of {width} hidden columns are constant")
            report.kept.append({"node": label, "reason": reason})
            continue
        values = _evaluate(model, index, hidden, b, leaf_values)[constant]
        lengths = sum(np.diff(firsts[leaf.first][0].indptr)[leaf.offset:leaf.offset + width] for leaf in hidden.leaves)
        keep = np.flatnonzero(~empty)
        keep = keep[np.argsort(-lengths[keep], kind="stable")]  # longest rows first: see the module docstring
        for a, (csr, bias) in firsts.items():
            offsets = [leaf.offset for leaf in hidden.leaves if leaf.first == a]
            _narrow_first(editor, a, csr, bias, np.concatenate([offset + keep for offset in offsets]))
        for i in hidden.splits:
            _narrow_split(editor, i, keep.size, label)
        for i, slot in hidden.columns:
            operand = model.graph.node[i].input[slot]
            sliced = np.take(np.asarray(index.constant_value(operand)), keep, axis=-1)
            editor.rename_input(i, slot, editor.const(operand + ".kept", sliced))
        moved = _fold_second(editor, b, label, empty, keep, constant, values)
        editor.stale |= {leaf.tensor for leaf in hidden.leaves}
        editor.stale |= {model.graph.node[i].output[0] for i in hidden.first + hidden.chain}
        report.folded.append({
            "node": label, "first_layers": [node_label(model.graph.node[a], a) for a in hidden.first],
            "children": width, "constant": int(constant.size), "folded_nonzeros": moved,
        })
    if not report.folded:
        return model, report
    return editor.apply(model), report


def _replace_inputs(editor: GraphEditor, i: int, inputs: dict[int, np.ndarray], base: str, roles: tuple[str, ...],
                    **attrs: int | list[int]) -> None:
    """Node ``i`` reading new constants (named ``base.ROLE``) in the given input slots, with ``attrs`` set."""
    old = editor.index.graph.node[i]
    node = onnx.NodeProto()
    node.CopyFrom(old)
    names = list(node.input) + [""] * (max(inputs, default=0) + 1 - len(node.input))
    for slot, value in inputs.items():
        if names[slot]:
            editor.drop_constant(names[slot])
        names[slot] = editor.const(f"{base}.{roles[slot]}", value)
    del node.input[:]
    node.input.extend(names)
    for attr in node.attribute:
        if attr.name in attrs:
            value = attrs[attr.name]
            if isinstance(value, list):
                del attr.ints[:]
                attr.ints.extend(value)
            else:
                attr.i = value
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


def _narrow_split(editor: GraphEditor, i: int, width: int, label: str) -> None:
    """Split ``i`` cutting parts of ``width`` (its sizes input or attribute, when it has one)."""
    node = editor.index.graph.node[i]
    parts = [width] * len(node.output)
    if len(node.input) > 1 and node.input[1]:
        _replace_inputs(editor, i, {1: np.array(parts, np.int64)}, label + "/kept", ("input", "sizes"))
    else:
        _replace_inputs(editor, i, {}, label, (), split=parts)


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
