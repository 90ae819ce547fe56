"""Folding tied children: the same outputs in onnxruntime, alpha times fewer second-layer weights."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import onnx
import pytest

from neurorewrite.api import expand
from neurorewrite.passes.fold_tied import fold_tied_children, split_tied
from neurorewrite.ops import DOMAIN, OP, csr_arrays
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.passes.sparse_to_standard import to_standard_ops
from tests.conftest import sample_for


def _plain_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime on the standard-op form, without the fold ``ort_session`` applies."""
    import onnxruntime as ort

    proto = to_standard_ops(model) if any(n.domain == DOMAIN for n in model.graph.node) else model
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _dense(values: np.ndarray, indices: np.ndarray, indptr: np.ndarray, n_in: int) -> np.ndarray:
    w = np.zeros((indptr.size - 1, n_in), dtype=np.float64)
    np.add.at(w, (np.repeat(np.arange(indptr.size - 1), np.diff(indptr.astype(np.int64))), indices.astype(np.int64)), values)
    return w


@pytest.mark.parametrize("name", ["torchscript_gemm", "transformer", "gelu_silu_chain"])
def test_fold_keeps_outputs(exports, name: str) -> None:
    model, _ = expand(exports[name], alpha=4, split="random", seed=3, format="sparse")
    digest = hashlib.sha256(model.SerializeToString()).hexdigest()
    folded, report = fold_tied_children(model)
    assert hashlib.sha256(model.SerializeToString()).hexdigest() == digest  # the input is not modified
    onnx.checker.check_model(folded, full_check=True)
    # the last linear of each chain folds; a first linear (rows are children) never does
    assert len(report.folded) == 1 and report.kept
    row = report.folded[0]
    assert row["parent_nonzeros"] * 4 + row["untied_nonzeros"] == row["nonzeros"]
    assert row["untied_nonzeros"] < row["nonzeros"] / 100
    feeds = sample_for(exports[name], batch=6)
    for got, want in zip(_plain_ort(folded, feeds), _plain_ort(model, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    # the folded model stores (alpha-1) x parent_nonzeros fewer values; none of the replaced arrays is left
    used = {i for n in folded.graph.node for i in n.input}
    assert all(t.name in used for t in folded.graph.initializer)
    assert _stored_values(model) - _stored_values(folded) == 3 * row["parent_nonzeros"]


def _stored_values(model: onnx.ModelProto) -> int:
    index = GraphIndex.build(model.graph)
    return sum(index.constant_value(n.input[1]).size for n in model.graph.node if n.op_type == OP)


def test_split_tied_partitions_the_entries() -> None:
    rng = np.random.default_rng(0)
    parents = rng.standard_normal((5, 6)) * (rng.random((5, 6)) < 0.6)
    w = np.repeat(parents, 3, axis=1)  # (5, 18): every parent column copied to 3 children
    w[1, 4] = 0.0  # a parent whose copies straddle a prune threshold
    w[2, 9] += 0.5  # copies moved apart, as fine-tuning does
    w[3, 15:18] = [0.0, 7.0, 7.0]
    values, indices, indptr = csr_arrays(w)
    (pv, pi, pp), (rv, ri, rp) = split_tied(values, indices, indptr, 18, 3)
    np.testing.assert_array_equal(_dense(pv, pi, pp, 6), np.where(_tied_mask(w, 3), parents, 0.0))
    rest = _dense(rv, ri, rp, 18)
    np.testing.assert_array_equal(np.repeat(_dense(pv, pi, pp, 6), 3, axis=1) + rest, w)
    assert pv.size * 3 + rv.size == values.size
    assert pi.dtype == np.int8 and ri.dtype == np.int8


def _tied_mask(w: np.ndarray, alpha: int) -> np.ndarray:
    runs = w.reshape(w.shape[0], -1, alpha)
    return (runs != 0).all(axis=2) & (runs == runs[:, :, :1]).all(axis=2)


def test_untied_weights_are_left_alone(exports) -> None:
    model, _ = expand(exports["torchscript_gemm"], alpha=2, split="random", format="sparse")
    index = GraphIndex.build(model.graph)
    second = [n for n in model.graph.node if n.op_type == OP][-1]
    values = index.constant_value(second.input[1]).copy()
    values[1::2] *= 1.5  # every second child moved away from its sibling
    moved = onnx.ModelProto()
    moved.CopyFrom(model)
    target = next(t for t in moved.graph.initializer if t.name == second.input[1])
    target.CopyFrom(onnx.numpy_helper.from_array(values, target.name))
    folded, report = fold_tied_children(moved)
    assert folded is moved and not report.folded
    assert {row["reason"] for row in report.kept} == {"columns are not tied in runs of 2"}


def test_models_without_a_record_or_sparse_op_pass_through(exports) -> None:
    plain = onnx.load(str(exports["torchscript_gemm"]))
    assert fold_tied_children(plain)[0] is plain
    dense, _ = expand(exports["torchscript_gemm"], alpha=2)
    folded, report = fold_tied_children(dense)
    assert folded is dense and report.alpha == 2 and not report.folded
    assert Counter(n.op_type for n in folded.graph.node) == Counter(n.op_type for n in dense.graph.node)


def test_split_tied_of_a_matrix_without_entries() -> None:
    """A layer whose every weight was pruned: both parts empty, integer-typed, with a zero row pointer."""
    values, indices, indptr = csr_arrays(np.zeros((4, 6), np.float32))
    for part, n_in in zip(split_tied(values, indices, indptr, 6, 3), (2, 6)):
        v, i, p = part
        assert v.size == 0 and i.size == 0
        np.testing.assert_array_equal(p, np.zeros(5))
        assert i.dtype.kind == "i" and p.dtype.kind == "i" and v.dtype == np.float32, n_in


def _with_tied_share(share: float) -> tuple[onnx.ModelProto, int]:
    """A one-node sparse model (alpha 2, 8 rows x 20 inputs, 40 nonzeros) where ``share`` of the
    nonzeros are tied pairs of child copies and the rest single, untied copies."""
    from onnx import helper

    from neurorewrite.ops import sparse_linear_node
    from neurorewrite.fpe import FPEConfig
    from neurorewrite.rewriter.record import FPERecord, write_record

    w = np.zeros((8, 20), np.float32)
    tied_pairs = int(round(40 * share / 2))
    flat = w.reshape(-1, 2)  # (80, 2): a row's 10 parents with their 2 children
    flat[:tied_pairs] = np.arange(1, tied_pairs + 1)[:, None]  # equal copies
    singles = 40 - 2 * tied_pairs
    flat[tied_pairs:tied_pairs + singles, 0] = 0.5  # one copy of the pair left
    values, indices, indptr = csr_arrays(w)
    inits = [onnx.numpy_helper.from_array(a, n) for a, n in zip((values, indices, indptr), ("v", "i", "p"))]
    node = sparse_linear_node(["x", "v", "i", "p"], "y", "layer", 20, 8)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 20])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    write_record(model, FPERecord(FPEConfig(alpha=2)))
    return model, np.count_nonzero(w)


@pytest.mark.parametrize("share, folds", [(0.4, False), (0.5, True), (0.6, True)])
def test_a_node_folds_when_at_least_half_its_entries_are_tied(share: float, folds: bool) -> None:
    model, nonzeros = _with_tied_share(share)
    assert nonzeros == 40
    folded, report = fold_tied_children(model)
    assert bool(report.folded) == folds, report
    if not folds:
        assert folded is model and report.kept[0]["reason"] == "columns are not tied in runs of 2"


def test_what_the_fold_writes_is_named_after_the_node_it_replaces(exports) -> None:
    """Nodes and initializers the fold adds carry the replaced node's name, so a profile or a viewer
    leads back to the layer; the untied path (a Gather and a second SparseLinear) included."""
    model, _ = _with_tied_share(0.6)
    folded, report = fold_tied_children(model)
    (row,) = report.folded
    label = row["node"]
    assert row["untied_nonzeros"] > 0
    old_inits = {t.name for t in model.graph.initializer}
    new_nodes = [n for n in folded.graph.node]
    assert {n.op_type for n in new_nodes} >= {"Reshape", "ReduceSum", OP, "Gather", "Add"}
    for n in new_nodes:
        assert n.name.startswith((label + "/", label + ".")), n.name
    for t in folded.graph.initializer:
        assert t.name in old_inits or t.name.startswith((label + "/", label + ".")), t.name
    assert len({n.name for n in new_nodes}) == len(new_nodes)


def test_split_tied_tells_runs_apart_across_an_empty_row() -> None:
    """Row 0 ends with parent 1's run, row 1 is empty, row 2 starts with parent 0's run: two runs, both tied."""
    w = np.zeros((3, 4), np.float32)
    w[0, 2:4] = 3.0
    w[2, 0:2] = 5.0
    (pv, pi, pp), (rv, _, _) = split_tied(*csr_arrays(w), 4, 2)
    np.testing.assert_array_equal(_dense(pv, pi, pp, 2), [[0, 3], [0, 0], [5, 0]])
    assert rv.size == 0
