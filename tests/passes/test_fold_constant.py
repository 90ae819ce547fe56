"""Folding constant children (passes/fold_constant.py): a hidden column whose first-layer rows are all empty
becomes part of the next layer's bias. The folded model computes the same outputs in onnxruntime on
calibrated models (where the prune leaves many children without an input) and on exports whose
activation is not zero at zero; the first layers keep every stored entry, the second keeps the entries
of the columns it keeps; gated blocks fold only columns empty in both gate and up (fused or not); and
nothing folds where the hidden tensor is read elsewhere or reaches the next layer through a
non-element-wise operator."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from neurorewrite.api import expand
from neurorewrite.ops import OP, csr_from_entries, sparse_linear_node
from neurorewrite.passes.fold_constant import fold_constant_children
from neurorewrite.passes.prepare import prepare_for_runtime
from neurorewrite.passes.sparse_to_standard import to_standard_ops
from neurorewrite.rewriter.blocks import find_blocks
from neurorewrite.rewriter.graph import GraphIndex, get_attr
from neurorewrite.rewriter.sparse_nodes import read_sparse_linear
from tests.builders import mlp_model
from tests.conftest import run_model, sample_for
from tests.passes.test_calibrate_lead import correlated
from tests.passes.test_expand_inputs import D as GD
from tests.passes.test_expand_inputs import gated_model, gated_weights
from tests.rewriter.test_block_reasons import conv1d_mlp, gated

ALPHA = 4


def outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime on the standard-op form of ``model`` (the conversion itself folds nothing)."""
    return run_model(to_standard_ops(model), feeds)


def assert_same_function(before: onnx.ModelProto, after: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    for got, want in zip(outputs(after, feeds), outputs(before, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def sparse_nodes(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, object, np.ndarray | None]]:
    index = GraphIndex.build(model.graph)
    return [(n, *read_sparse_linear(index, i)) for i, n in enumerate(model.graph.node) if n.op_type == OP]


def with_empty_rows(model: onnx.ModelProto, node_name: str, rows: np.ndarray) -> onnx.ModelProto:
    """A copy of ``model`` whose SparseLinear ``node_name`` stores nothing in ``rows`` (as a prune leaves a child)."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    index = GraphIndex.build(new.graph)
    i = next(i for i, n in enumerate(new.graph.node) if n.name == node_name)
    csr, _ = read_sparse_linear(index, i)
    keep = ~np.isin(csr.rows, rows)
    arrays = csr_from_entries(csr.values[keep], csr.rows[keep], csr.indices[keep], (csr.out_features, csr.in_features))
    for name, array in zip(new.graph.node[i].input[1:4], arrays):
        target = next(t for t in new.graph.initializer if t.name == name)
        target.CopyFrom(numpy_helper.from_array(array, name))
    return new


def with_bias(model: onnx.ModelProto, node_name: str, bias: np.ndarray) -> onnx.ModelProto:
    """A copy of ``model`` whose bias-less SparseLinear ``node_name`` adds ``bias``."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    node = next(n for n in new.graph.node if n.name == node_name)
    assert len(node.input) == 4
    node.input.append(node_name + ".bias")
    new.graph.initializer.append(numpy_helper.from_array(bias, node_name + ".bias"))
    return new


def first_and_second(model: onnx.ModelProto) -> tuple[str, str]:
    names = [n.name for n in model.graph.node if n.op_type == OP]
    return names[0], names[-1]


@pytest.mark.parametrize(
    "name", ["gelu_erf", "gelu_tanh", "sigmoid", "softplus", "elu", "sklearn_mlp", "transformer", "gelu_silu_chain"])
def test_exports_keep_their_function_with_planted_empty_children(exports, name: str) -> None:
    """Children emptied at random in each block's first layer: activations whose value at the bias is not
    zero (sigmoid, softplus, GELU of a nonzero bias) move a nonzero shift into the next layer's bias."""
    model, _ = expand(exports[name], alpha=ALPHA, split="random", seed=1, format="sparse")
    rng = np.random.default_rng(0)
    for node, csr, _ in sparse_nodes(model):  # a second layer's empty rows only make outputs equal to its bias
        model = with_empty_rows(model, node.name, rng.choice(csr.out_features, csr.out_features // 3, replace=False))
    folded, report = fold_constant_children(model)
    assert len(report.folded) == len(sparse_nodes(model)) - 1, report.kept  # each a chain: every block folds
    onnx.checker.check_model(folded, full_check=True)
    assert_same_function(model, folded, sample_for(exports[name], batch=3))
    for row in report.folded:
        assert 0 < row["constant"] < row["children"]


def test_a_calibrated_model_folds_its_inputless_children_into_the_bias() -> None:
    """The tiered split and the prune leave many children of a calibrated block without an input; after the
    fold the first layer has only the others' rows, every stored entry kept, and the function is the same."""
    model = mlp_model(d=6, h=8, o=3, seed=3)
    x, probe = correlated(300, d=6, seed=2), correlated(40, d=6, seed=5)
    calibrated, report = expand(model, alpha=ALPHA, calibrate={"x": x}, format="sparse")
    assert report.calibration[0]["constant_inputs"] > 0
    folded, fold = fold_constant_children(calibrated)
    (row,) = fold.folded
    assert row["constant"] == report.calibration[0]["constant_inputs"]
    (n1, c1, b1), (n2, c2, b2) = sparse_nodes(calibrated)
    (f1, d1, e1), (f2, d2, e2) = sparse_nodes(folded)
    lengths = np.diff(c1.indptr)
    kept = np.flatnonzero(lengths > 0)
    kept = kept[np.argsort(-lengths[kept], kind="stable")]  # the longest rows first
    assert d1.out_features == d2.in_features == kept.size == row["children"] - row["constant"]
    np.testing.assert_array_equal(np.diff(d1.indptr), np.sort(lengths[lengths > 0])[::-1])
    np.testing.assert_array_equal(d1.to_dense(), c1.to_dense()[kept])  # the first layer keeps every stored entry
    np.testing.assert_array_equal(e1, b1[kept])
    dense2 = c2.to_dense()
    np.testing.assert_array_equal(d2.to_dense(), dense2[:, kept])  # the second keeps its kept columns' entries
    assert c2.nonzeros - d2.nonzeros == row["folded_nonzeros"] == np.count_nonzero(np.delete(dense2, kept, axis=1))
    shift = np.delete(dense2, kept, axis=1) @ np.maximum(np.delete(b1, kept), 0)
    np.testing.assert_allclose(e2, b2 + shift, rtol=1e-6, atol=1e-6)
    assert_same_function(calibrated, folded, {"x": probe})


def test_layers_without_bias_fold_the_activation_of_zero_into_a_new_bias() -> None:
    """sigmoid(0) = 0.5: the second layer, which had no bias, gets one holding the constant columns' sum."""
    model, _ = expand(mlp_model(d=6, h=8, o=3, act="Sigmoid", seed=3, matmul=True, bias=False), alpha=ALPHA,
                      split="random", format="sparse")
    first, second = first_and_second(model)
    planted = with_empty_rows(model, first, np.array([0, 5, 6, 7, 20, 31]))
    (_, csr, _), (node, _, bias) = sparse_nodes(planted)
    assert bias is None and len(node.input) == 4
    folded, report = fold_constant_children(planted)
    assert report.folded[0]["constant"] == int((np.diff(csr.indptr) == 0).sum()) >= 6
    (_, _, new_bias) = sparse_nodes(folded)[1]
    assert new_bias is not None and np.abs(new_bias).max() > 0
    assert_same_function(planted, folded, {"x": correlated(20, d=6, seed=1)})


@pytest.mark.parametrize("fused", [False, True])
def test_a_gated_block_folds_only_columns_empty_in_gate_and_up(fused: bool) -> None:
    model, _ = expand(gated_model(gated_weights(), fused=fused), alpha=ALPHA, split="random", format="sparse")
    names = [n.name for n in model.graph.node if n.op_type == OP]
    width = int(get_attr(next(n for n in model.graph.node if n.name == names[-1]), "in_features", -1))
    both, gate_only = np.array([1, 2, 9, 17]), np.array([4, 12])
    if fused:  # one first layer: gate rows, then up rows
        planted = with_empty_rows(model, names[0], np.concatenate([both, gate_only, width + both]))
    else:
        planted = with_empty_rows(with_empty_rows(model, names[0], np.concatenate([both, gate_only])), names[1], both)
    firsts = [csr for node, csr, _ in sparse_nodes(planted) if node.name != names[-1]]
    empty = [np.diff(csr.indptr) == 0 for csr in firsts]
    gate, up = (empty[0][:width], empty[0][width:]) if fused else empty
    assert gate[both].all() and up[both].all() and gate[gate_only].all()
    folded, report = fold_constant_children(planted)
    (row,) = report.folded
    assert row["constant"] == int((gate & up).sum()) < int(gate.sum())  # an empty gate row alone: silu(b_g) * up(x)
    assert_same_function(planted, folded, {"x": correlated(20, d=GD, seed=1)})
    sizes = [n for n in folded.graph.node if n.op_type == "Split"]
    if fused:
        index = GraphIndex.build(folded.graph)
        np.testing.assert_array_equal(index.constant_value(sizes[0].input[1]), [width - row["constant"]] * 2)


def up_first(model: onnx.ModelProto) -> onnx.ModelProto:
    """The Slice-cut gated model with the gate cut from the second half of the fused output."""
    swapped = onnx.ModelProto()
    swapped.CopyFrom(model)
    cuts = {n.name: n for n in swapped.graph.node}
    gate, up = cuts["cut_gate"], cuts["cut_up"]
    gate_bounds, up_bounds = list(gate.input[1:3]), list(up.input[1:3])
    gate.input[1:3], up.input[1:3] = up_bounds, gate_bounds
    return swapped


@pytest.mark.parametrize("form", ["slices", "slices, up first", "reshapes"])
def test_blocks_whose_width_is_held_by_cuts_or_reshapes_fold(form: str) -> None:
    """A fused gate/up output cut by two Slices (the gate half first or second), and GPT-2's Conv1D with
    Reshape targets holding the width: the bounds and targets are rewritten to the kept width, and the
    function is the same."""
    original = conv1d_mlp(np.array([2, 5, 8]), np.array([-1, 8])) if form == "reshapes" else gated(
        split=np.array([8, 8]), slices=True)
    if form == "slices, up first":
        original = up_first(original)
    model, _ = expand(original, alpha=ALPHA, split="random", format="sparse")
    first, _ = first_and_second(model)
    if form != "reshapes":  # a bias for each half: the constant is silu(b_gate) * b_up, not the other way round
        model = with_bias(model, first, np.random.default_rng(1).standard_normal(64).astype(np.float32))
    planted = with_empty_rows(model, first, np.array([0, 3, 4, 9, 30]) if form == "reshapes" else
                              np.array([0, 3, 4, 9, 30, 32, 35, 36, 41, 62]))  # gate and up rows of children 0, 3, ...
    rows = np.diff(sparse_nodes(planted)[0][1].indptr) == 0
    constant = rows if form == "reshapes" else rows[:32] & rows[32:]
    folded, report = fold_constant_children(planted)
    (row,) = report.folded
    kept = row["children"] - row["constant"]
    assert row["constant"] == int(constant.sum()) >= 5 and constant[[0, 3, 4, 9, 30]].all()
    x = np.random.default_rng(2).standard_normal((2, 5, 6) if form == "reshapes" else (4, 6)).astype(np.float32)
    assert_same_function(planted, folded, {"x": x})
    index = GraphIndex.build(folded.graph)
    if form != "reshapes":
        bounds = [int(index.constant_value(n.input[k])[0]) for n in folded.graph.node if n.op_type == "Slice" for k in (1, 2)]
        assert sorted(b for b in bounds if b < 2**31) == [0, kept, kept, 2 * kept]
    else:
        (wide,) = find_blocks(folded).blocks
        assert wide.width == kept and len(wide.widen) == 2  # both Reshape targets end in the kept width


def hand_built(held_bias: bool, per_column_add: bool = False) -> onnx.ModelProto:
    """x -> SparseLinear (no bias) -> f -> Mul(2) -> SparseLinear -> y, with rows 1 and 3 of the first layer
    empty. ``f``: a BiasGelu adding a per-column bias (as onnxruntime's optimizer fuses it; ``expand`` keeps
    that bias there), or Add(c) -> Relu with ``c`` a scalar or, with ``per_column_add``, a vector."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((6, 4)).astype(np.float32)
    w1[[1, 3]] = 0
    w2 = rng.standard_normal((3, 6)).astype(np.float32)
    c = rng.standard_normal(6).astype(np.float32) if held_bias or per_column_add else np.array(0.7, np.float32)
    inits = {"c": c, "two": np.array(2.0, np.float32), "b2": rng.standard_normal(3).astype(np.float32)}
    for tag, w in (("w1", w1), ("w2", w2)):
        rows, cols = np.nonzero(w)
        for role, a in zip(("values", "indices", "indptr"), csr_from_entries(w[rows, cols], rows, cols, w.shape)):
            inits[f"{tag}.{role}"] = a
    if held_bias:
        f = [helper.make_node("BiasGelu", ["h0", "c"], ["h2"], name="act", domain="com.microsoft")]
    else:
        f = [helper.make_node("Add", ["h0", "c"], ["h1"], name="shift"), helper.make_node("Relu", ["h1"], ["h2"], name="act")]
    nodes = [
        sparse_linear_node(["x", "w1.values", "w1.indices", "w1.indptr"], "h0", "first", 4, 6),
        *f,
        helper.make_node("Mul", ["h2", "two"], ["h3"], name="scale"),
        sparse_linear_node(["h3", "w2.values", "w2.indices", "w2.indptr", "b2"], "y", "second", 6, 3),
    ]
    graph = helper.make_graph(nodes, "hand", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.neurorewrite", 1), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


@pytest.mark.parametrize("held_bias", [True, False])
def test_a_bias_the_activation_adds_is_cut_to_the_kept_columns(held_bias: bool) -> None:
    """A bias-less first layer whose bias a BiasGelu adds: the constant columns' value is gelu(that bias),
    and the BiasGelu keeps the kept columns' bias; a scalar operand stays as it is."""
    model = hand_built(held_bias)
    before = model.SerializeToString()
    folded, report = fold_constant_children(model)
    assert model.SerializeToString() == before  # the input is not modified
    assert report.folded[0]["constant"] == 2
    index = GraphIndex.build(folded.graph)
    holder = next(n for n in folded.graph.node if n.name == ("act" if held_bias else "shift"))
    assert index.constant_value(holder.input[1]).shape == ((4,) if held_bias else ())
    assert_same_function(model, folded, {"x": correlated(10, d=4, seed=3)})


def test_nothing_folds_where_the_hidden_tensor_is_read_elsewhere_or_reshaped() -> None:
    model = hand_built(False)
    read = onnx.ModelProto()
    read.CopyFrom(model)
    read.graph.output.append(helper.make_tensor_value_info("h2", onnx.TensorProto.FLOAT, None))
    same, report = fold_constant_children(read)
    assert same is read and not report.folded and not report.kept
    reshaped = onnx.ModelProto()
    reshaped.CopyFrom(model)
    node = next(n for n in reshaped.graph.node if n.name == "act")
    node.op_type = "Softmax"  # mixes the columns: none of them is constant any more
    same, report = fold_constant_children(reshaped)
    assert same is reshaped and not report.folded
    # a vector added apart from any layer's bias: not a block expand rewrites, so not one the fold reads
    apart = hand_built(False, per_column_add=True)
    same, report = fold_constant_children(apart)
    assert same is apart and not report.folded and not report.kept


def test_a_few_constant_children_leave_the_layer_whole() -> None:
    """Under 1/8 of the columns constant: the runs of alpha siblings stay intact for the labeled-tile kernels."""
    model, _ = expand(mlp_model(d=32, h=8, o=3, seed=3), alpha=ALPHA, split="random", format="sparse")
    first, second = first_and_second(model)
    few = with_empty_rows(model, first, np.array([3, 17, 30]))
    same, report = fold_constant_children(few)
    assert same is few and report.kept == [{"node": second, "reason": "only 3 of 32 hidden columns are constant"}]
    enough = with_empty_rows(model, first, np.array([3, 17, 30, 31]))
    assert fold_constant_children(enough)[1].folded[0]["constant"] == 4


def test_a_layer_without_constant_children_is_reported_and_kept() -> None:
    model, _ = expand(mlp_model(d=32, h=8, o=3, seed=3), alpha=ALPHA, split="random", format="sparse")
    same, report = fold_constant_children(model)
    assert same is model and report.kept == [{"node": first_and_second(model)[1], "reason": "no hidden column is constant"}]
    first, second = first_and_second(model)
    empty = with_empty_rows(model, first, np.arange(32))
    same, report = fold_constant_children(empty)
    assert same is empty and report.kept == [{"node": second, "reason": "every hidden column is constant"}]


def test_the_runtime_preparation_folds_them_and_reports_it() -> None:
    model = mlp_model(d=6, h=8, o=3, seed=3)
    calibrated, _ = expand(model, alpha=ALPHA, calibrate={"x": correlated(300, d=6, seed=2)}, format="sparse")
    for runtime in ("onnxruntime", "tvm"):
        prepared, report = prepare_for_runtime(calibrated, runtime)
        assert "fold constant children" in report.steps
        assert report.constant and report.constant[0]["constant"] > 0
    assert_same_function(calibrated, prepared, {"x": correlated(30, d=6, seed=4)})
