"""The fold's untied path and its care for shared initializers (passes/fold_tied.py).

After fine-tuning or a threshold that straddles a parent's copies, some runs of ``alpha`` child columns
are no longer equal: the fold must keep those entries as they are (a Gather of the children they read and
a second SparseLinear, added to the parents' product) and still compute the unfolded function. And an
initializer the folded node shares with another consumer must survive the fold."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from neurorewrite.api import expand
from neurorewrite.ops import OP, csr_arrays, densify
from neurorewrite.passes.fold_tied import fold_tied_children
from neurorewrite.passes.sparse_to_standard import to_standard_ops
from neurorewrite.rewriter.graph import GraphIndex, get_attr
from tests.conftest import sample_for

ALPHA = 4


def plain_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """onnxruntime on the standard-op form (the conversion does not fold)."""
    import onnxruntime as ort

    session = ort.InferenceSession(to_standard_ops(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def second_layer(model: onnx.ModelProto) -> tuple[onnx.NodeProto, np.ndarray]:
    index = GraphIndex.build(model.graph)
    node = [n for n in model.graph.node if n.op_type == OP][-1]
    arrays = [index.constant_value(name) for name in node.input[1:4]]
    return node, densify(*arrays, int(get_attr(node, "in_features", None)), int(get_attr(node, "out_features", None)))


def with_second_layer(model: onnx.ModelProto, w: np.ndarray) -> onnx.ModelProto:
    """A copy of ``model`` whose last SparseLinear holds the CSR arrays of ``w``."""
    new = onnx.ModelProto()
    new.CopyFrom(model)
    node, _ = second_layer(new)
    for name, array in zip(node.input[1:4], csr_arrays(w)):
        target = next(t for t in new.graph.initializer if t.name == name)
        target.CopyFrom(numpy_helper.from_array(array, name))
    return new


@pytest.fixture(scope="module")
def sparse_model(exports) -> onnx.ModelProto:
    model, _ = expand(exports["torchscript_gemm"], alpha=ALPHA, split="random", seed=3, format="sparse")
    return model


def untie(w: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Move some children apart (as fine-tuning does) and drop single copies (a straddled threshold);
    returns the new weight and how many of its entries are no longer in a tied run."""
    w = w.copy()
    runs = w.reshape(w.shape[0], -1, ALPHA)
    full = np.argwhere((runs != 0).all(axis=2))
    picked = full[rng.choice(len(full), size=6, replace=False)]
    for n, (row, parent) in enumerate(picked):
        if n % 2:
            runs[row, parent, 1] *= 1.5  # moved apart: all alpha entries stay, untied
        else:
            runs[row, parent, 2] = 0.0  # one copy pruned: alpha - 1 entries, untied
    return w, 3 * ALPHA + 3 * (ALPHA - 1)


def test_untied_copies_are_kept_beside_the_folded_parents(sparse_model, exports) -> None:
    node, w = second_layer(sparse_model)
    moved, untied = untie(w, np.random.default_rng(0))
    model = with_second_layer(sparse_model, moved)
    folded, report = fold_tied_children(model)
    onnx.checker.check_model(folded, full_check=True)
    (row,) = report.folded
    assert row["untied_nonzeros"] == untied > 0
    assert row["parent_nonzeros"] * ALPHA + row["untied_nonzeros"] == row["nonzeros"] == np.count_nonzero(moved)
    ops = [n.op_type for n in folded.graph.node]
    assert ops.count(OP) == 3 and "Gather" in ops and "Add" in ops, ops  # first layer, parents, untied
    feeds = sample_for(exports["torchscript_gemm"], batch=7)
    want = plain_ort(model, feeds)[0]
    np.testing.assert_allclose(plain_ort(folded, feeds)[0], want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    # and against numpy over the moved weights: y = W2' relu(W1' x + b1') + b2
    index = GraphIndex.build(model.graph)
    first = [n for n in model.graph.node if n.op_type == OP][0]
    w1 = densify(*[index.constant_value(n) for n in first.input[1:4]], 16, int(get_attr(first, "out_features", None)))
    b1, b2 = index.constant_value(first.input[4]), index.constant_value(node.input[4])
    hidden = np.maximum(feeds["x"] @ w1.T + b1, 0)
    np.testing.assert_allclose(plain_ort(folded, feeds)[0], hidden @ moved.T + b2, rtol=1e-4, atol=1e-5)


def test_an_initializer_shared_with_another_node_survives_the_fold(sparse_model, exports) -> None:
    """The folded node's CSR arrays are dropped only when nothing else reads them."""
    model = onnx.ModelProto()
    model.CopyFrom(sparse_model)
    node, _ = second_layer(model)
    shared = [node.input[1], node.input[3]]  # values and indptr, read by the fold and by two Identity nodes
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for k, name in enumerate(shared):
        model.graph.node.append(helper.make_node("Identity", [name], [f"also_{k}"], name=f"reader_{k}"))
        elem = helper.np_dtype_to_tensor_dtype(arrays[name].dtype)
        model.graph.output.append(helper.make_tensor_value_info(f"also_{k}", elem, list(arrays[name].shape)))
    onnx.checker.check_model(model, full_check=True)
    folded, report = fold_tied_children(model)
    assert report.folded, "the node still folds"
    onnx.checker.check_model(folded, full_check=True)
    names = {t.name for t in folded.graph.initializer}
    assert set(shared) <= names
    feeds = sample_for(exports["torchscript_gemm"], batch=3)
    for got, want in zip(plain_ort(folded, feeds), plain_ort(model, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_untied_copies_over_many_columns_keep_their_column_indices(tmp_path) -> None:
    """The untied part indexes the children it gathers with the narrowest integer type; with 129
    gathered columns the local indices reach 128, one past int8: the type must follow the largest index."""
    import torch
    from torch import nn

    from tests.conftest import export_torch

    torch.manual_seed(0)
    path = export_torch(nn.Sequential(nn.Linear(16, 40), nn.ReLU(), nn.Linear(40, 8)), torch.randn(3, 16),
                        tmp_path / "wide.onnx")
    model, _ = expand(path, alpha=ALPHA, seed=0, format="sparse", prune="layer")
    node, w = second_layer(model)
    runs = w.reshape(w.shape[0], -1, ALPHA)
    parents = [next((r, p) for r in range(w.shape[0]) if (runs[r, p] != 0).all()) for p in range(runs.shape[1])
               if (runs[:, p] != 0).all(axis=1).any()]
    assert len(parents) >= 33
    for k, (row, parent) in enumerate(parents[:33]):
        if k < 30:
            runs[row, parent, 1] *= 1.5  # moved apart: 4 children gathered
        else:
            runs[row, parent, 2] = 0.0  # one copy pruned: the other 3 gathered
    moved = with_second_layer(model, w)
    folded, report = fold_tied_children(moved)
    (row,) = report.folded
    assert row["untied_nonzeros"] == 30 * ALPHA + 3 * (ALPHA - 1) == 129
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    want = plain_ort(moved, {"x": x})[0]
    np.testing.assert_allclose(plain_ort(folded, {"x": x})[0], want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
