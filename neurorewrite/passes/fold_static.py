"""Folding what fixed input shapes fix: every tensor computed from constants and tensor shapes alone
becomes a constant.

With every graph input's shape fixed (``compile --shape``), the shape arithmetic of an export (``Shape
-> Gather -> Concat`` into Reshape targets, the causal and padding masks built with Range,
ConstantOfShape and Expand over the sequence length) computes the same values for every input. TVM's
ONNX frontend fails on several of those constructs while they are computed (a Slice of a Shape, an
Expand whose target holds -1: Hugging Face exports of GPT-2, BERT and Llama); as constants it reads
them.

A tensor is *fixed* when it is a constant, the output of ``Shape`` or ``Size``, or the output of a
deterministic node without subgraphs whose inputs are all fixed. The pass runs the model in
onnxruntime on inputs of the fixed shapes, each SparseLinear replaced by zeros of its output's shape (a
fixed value reads other tensors only through their shapes, so the sparse layers need not be densified
or multiplied). It takes the value of every fixed tensor that another node reads (or that is a graph
output), stores it as an initializer and drops the nodes that computed fixed tensors; a node whose
output exceeds :data:`MAX_FOLDED_BYTES` stays (its inputs are folded), so a large expanded mask does
not bloat the library. It runs the model twice, on different input values, and folds nothing when any
of those values differ between the runs: a shape that depends on input values (NonZero, a Reshape to a
computed size) makes a Shape output vary, and must not be frozen.

Invariant: for inputs of the fixed shapes the outputs are the input model's (tests: onnxruntime on
the model before and after). The input is not modified.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from neurorewrite.ops import DOMAIN, is_sparse_linear
from neurorewrite.rewriter.editor import model_shell
from neurorewrite.rewriter.graph import GraphIndex, names_used_in

SHAPE_READERS = ("Shape", "Size")
MAX_FOLDED_BYTES = 1 << 22  # a fixed tensor larger than this stays computed (from folded inputs)
NOT_DETERMINISTIC = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli", "Dropout")


@dataclass
class StaticFoldReport:
    """How many tensors became constants, and how many nodes that computed them were dropped; or why not."""

    tensors: int = 0
    nodes: int = 0
    declined: str | None = None

    @property
    def modified(self) -> bool:
        return self.tensors > 0


def _fixed_nodes(graph: onnx.GraphProto, index: GraphIndex) -> list[int]:
    """The nodes whose outputs are fixed (see the module docstring), Constant nodes excluded, in graph order."""
    fixed_tensors: set[str] = set()
    found = []
    for i, node in enumerate(graph.node):
        standard = node.domain in ("", "ai.onnx")
        if standard and node.op_type == "Constant":
            fixed_tensors.update(node.output)
            continue
        if not standard or node.op_type in NOT_DETERMINISTIC or any(a.type in (onnx.AttributeProto.GRAPH,
                                                                               onnx.AttributeProto.GRAPHS)
                                                                    for a in node.attribute):
            continue
        reads = [name for name in node.input if name]
        if node.op_type in SHAPE_READERS or all(
                name in fixed_tensors or index.constant_source(name) in ("initializer", "constant") for name in reads):
            fixed_tensors.update(o for o in node.output if o)
            found.append(i)
    return found


def _feeds(graph: onnx.GraphProto, shapes: Mapping[str, Sequence[int]], seed: int) -> dict[str, np.ndarray]:
    """Inputs of the fixed shapes: ones (seed 0) or zeros (seed 1) for integers and booleans, normal floats."""
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in graph.initializer}
    feeds = {}
    for value in graph.input:
        if value.name in initializers:
            continue
        dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        shape = tuple(int(d) for d in shapes[value.name])
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[value.name] = np.full(shape, 1 - seed, dtype=dtype)
    return feeds


def fold_static_values(model: onnx.ModelProto,
                       shapes: Mapping[str, Sequence[int]]) -> tuple[onnx.ModelProto, StaticFoldReport]:
    """Fold the tensors that ``shapes`` (every graph input's, all fixed) determine into constants; see the
    module docstring. Returns the input object itself when nothing folds."""
    graph = model.graph
    index = GraphIndex.build(graph)
    fixed = _fixed_nodes(graph, index)
    produced = sorted({o for i in fixed for o in graph.node[i].output if o})
    if not produced:
        return model, StaticFoldReport(declined="no tensor is fixed by the input shapes alone")
    runnable = _shape_stand_ins(model, index)
    del runnable.graph.output[:]
    runnable.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in produced)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(runnable.SerializeToString(), options, providers=["CPUExecutionProvider"])
    first, second = ({name: np.asarray(v) for name, v in zip(produced, session.run(produced, _feeds(graph, shapes, seed)))}
                     for seed in (0, 1))
    removed = _removable(graph, fixed, first)
    outputs = {o.name for o in graph.output}
    read_after = {name for i, node in enumerate(graph.node) if i not in removed for name in node.input}
    frontier = sorted({o for i in removed for o in graph.node[i].output if o in read_after or o in outputs})
    if not frontier:
        return model, StaticFoldReport(declined="no tensor is fixed by the input shapes alone")
    for name in frontier:
        if first[name].shape != second[name].shape or not np.array_equal(first[name], second[name], equal_nan=True):
            return model, StaticFoldReport(declined=f"{name} depends on the input values, not only on their shapes")
    new = onnx.ModelProto()
    new.CopyFrom(model)
    kept = [node for i, node in enumerate(new.graph.node) if i not in removed]
    del new.graph.node[:]
    new.graph.node.extend(kept)
    new.graph.initializer.extend(numpy_helper.from_array(first[name], name) for name in frontier)
    _drop_unread_constants(new.graph)
    return new, StaticFoldReport(tensors=len(frontier), nodes=len(removed))


def _shape_stand_ins(model: onnx.ModelProto, index: GraphIndex) -> onnx.ModelProto:
    """A copy of ``model`` for onnxruntime in which every SparseLinear writes zeros of its output's shape
    (``ConstantOfShape(concat(shape(x)[:-1], [out_features]))``), in its weights' type. The sparse
    layers' weights are not copied: nothing reads them there (onnxruntime would warn about each)."""
    new = model_shell(model)
    stand_ins: list[onnx.TensorProto] = []
    nodes = []
    for k, node in enumerate(model.graph.node):
        if not is_sparse_linear(node):
            nodes.append(node)
            continue
        out = next(a.i for a in node.attribute if a.name == "out_features")
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(index.constant_dtype(node.input[1])))
        base = f"stand_in{k}"
        stand_ins += [numpy_helper.from_array(np.array([0], np.int64), f"{base}.start"),
                      numpy_helper.from_array(np.array([-1], np.int64), f"{base}.end"),
                      numpy_helper.from_array(np.array([out], np.int64), f"{base}.out")]
        nodes += [helper.make_node("Shape", [node.input[0]], [f"{base}.shape"]),
                  helper.make_node("Slice", [f"{base}.shape", f"{base}.start", f"{base}.end"], [f"{base}.lead"]),
                  helper.make_node("Concat", [f"{base}.lead", f"{base}.out"], [f"{base}.target"], axis=0),
                  helper.make_node("ConstantOfShape", [f"{base}.target"], [node.output[0]],
                                   value=helper.make_tensor("zero", elem, [1], [0]))]
    new.graph.node.extend(nodes)
    read = names_used_in(new.graph) | {name for node in nodes for name in node.input}
    new.graph.initializer.extend(t for t in model.graph.initializer if t.name in read)
    new.graph.initializer.extend(stand_ins)
    unread = {t.name for t in model.graph.initializer} - read
    inputs = [i for i in new.graph.input if i.name not in unread]  # an IR 3 model lists its initializers as inputs
    del new.graph.input[:]
    new.graph.input.extend(inputs)
    kept = [o for o in new.opset_import if o.domain != DOMAIN]
    del new.opset_import[:]
    new.opset_import.extend(kept)
    return new


def _removable(graph: onnx.GraphProto, fixed: list[int], values: Mapping[str, np.ndarray]) -> set[int]:
    """The fixed nodes to drop: all but those with an output over :data:`MAX_FOLDED_BYTES`. A mask expanded to
    batch x heads x sequence x sequence would bloat the library: such a node stays, computed at run time
    from its inputs, which are folded (a dropped node's output that a kept node reads becomes a constant)."""
    return {i for i in fixed if all(values[o].nbytes <= MAX_FOLDED_BYTES for o in graph.node[i].output if o)}


def _drop_unread_constants(graph: onnx.GraphProto) -> None:
    """Constant nodes only the dropped nodes read: nothing reads them now."""
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [node for node in graph.node
            if not (node.op_type == "Constant" and node.domain in ("", "ai.onnx") and not set(node.output) & read)]
    if len(kept) != len(graph.node):
        del graph.node[:]
        graph.node.extend(kept)
