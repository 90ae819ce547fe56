"""The fold over a whole model (passes/fold_tied.py): every foldable node folds, each node is reported
with what happened to it, the CSR arrays it replaces are dropped, and the result computes the same
function on 3-D (sequence) inputs, with and without a bias, and with a few untied copies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from neurorewrite.api import expand
from neurorewrite.ops import OP
from neurorewrite.passes.fold_tied import fold_tied_children
from neurorewrite.passes.sparse_to_standard import to_standard_ops
from neurorewrite.rewriter.graph import GraphIndex
from tests.conftest import export_torch

ALPHA = 4


def plain_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(to_standard_ops(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="module")
def three_blocks(tmp_path_factory) -> Path:
    """Three FFN blocks on a (batch, sequence, features) input: the first reads 15 features (not a
    multiple of alpha), the third has no biases, the last two sit on residual Adds."""
    import torch
    from torch import nn

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Sequential(nn.Linear(15, 16), nn.ReLU(), nn.Linear(16, 16))
            self.f1 = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
            self.f2 = nn.Sequential(nn.Linear(16, 32, bias=False), nn.ReLU(), nn.Linear(32, 16, bias=False))

        def forward(self, x):  # noqa: ANN001, ANN202
            y = self.inp(x)
            y = y + self.f1(y)
            return y + self.f2(y)

    torch.manual_seed(0)
    return export_torch(Model(), torch.randn(2, 5, 15), tmp_path_factory.mktemp("fold") / "three.onnx")


def test_every_node_is_folded_or_kept_with_its_reason(three_blocks: Path) -> None:
    model, _ = expand(three_blocks, alpha=ALPHA, seed=1, format="sparse")
    folded, report = fold_tied_children(model)
    names = [n.name for n in model.graph.node if n.op_type == OP]
    assert len(names) == 6
    # the first node is kept for its width, and the fold goes on past it to the later nodes
    assert report.kept[0] == {"node": names[0], "reason": f"in_features is not a multiple of {ALPHA}"}
    assert all(set(row) == {"node", "reason"} for row in report.kept)
    assert [row["node"] for row in report.folded] == [names[1], names[3], names[5]]
    index = GraphIndex.build(model.graph)
    for row in report.folded:
        node = next(n for n in model.graph.node if n.name == row["node"])
        assert set(row) == {"node", "nonzeros", "parent_nonzeros", "untied_nonzeros"}
        assert row["nonzeros"] == np.count_nonzero(index.constant_value(node.input[1]))
        assert row["parent_nonzeros"] * ALPHA + row["untied_nonzeros"] == row["nonzeros"]
    assert any(row["untied_nonzeros"] for row in report.folded)  # the untied path runs here
    onnx.checker.check_model(folded, full_check=True)
    # the arrays of every folded node are gone, and only they: every initializer left is read
    read = {i for n in folded.graph.node for i in n.input}
    assert all(t.name in read for t in folded.graph.initializer)
    replaced = {i for n in model.graph.node if n.name in {r["node"] for r in report.folded} for i in n.input[1:4]}
    assert not replaced & {t.name for t in folded.graph.initializer}
    # the sparse arrays stay integer-indexed
    new_index = GraphIndex.build(folded.graph)
    for node in folded.graph.node:
        if node.op_type == OP:
            assert all(new_index.constant_value(i).dtype.kind in "iu" for i in node.input[2:4]), node.name


def test_the_folded_model_computes_the_same_function_on_sequences(three_blocks: Path) -> None:
    model, _ = expand(three_blocks, alpha=ALPHA, seed=1, format="sparse")
    folded, report = fold_tied_children(model)
    assert len(report.folded) == 3
    ops = [n.op_type for n in folded.graph.node]
    assert "Gather" in ops  # the untied copies read their children along the last axis
    x = np.random.default_rng(0).standard_normal((3, 5, 15)).astype(np.float32)
    want = plain_ort(model, x)
    np.testing.assert_allclose(plain_ort(folded, x), want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_alpha_one_has_nothing_to_fold(three_blocks: Path) -> None:
    model, _ = expand(three_blocks, alpha=1, format="sparse")
    assert any(n.op_type == OP for n in model.graph.node)
    folded, report = fold_tied_children(model)
    assert folded is model and not report.folded and not report.kept
