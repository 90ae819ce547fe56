"""save_model's promise: the model is checked on disk before the rename, so a model the full checker
rejects never replaces anything, and nothing of the attempt is left beside the output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from neurorewrite.errors import NeurorewriteError, VerificationError
from neurorewrite.rewriter.io import save_model
from tests.builders import mlp_model
from tests.conftest import run_model


def unknown_op() -> onnx.ModelProto:
    """Serialisable, but the checker knows no ``NoSuchOp`` in the default domain."""
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(np.ones((64, 64), np.float32), "big")],  # weights for the external-data case
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def type_clash() -> onnx.ModelProto:
    """Valid node by node; only full_check's shape inference sees float + int64 in one Add."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "k"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(np.ones((2, 4), np.int64), "k")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("bad", [unknown_op, type_clash])
@pytest.mark.parametrize("external_data", [False, True])
def test_a_model_the_checker_rejects_leaves_the_old_output_untouched(tmp_path, bad, external_data) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous model")
    (tmp_path / "model.onnx.data").write_bytes(b"its weights")
    before = listing(tmp_path)
    with pytest.raises(VerificationError, match="model.onnx: the written model fails the ONNX checker") as caught:
        save_model(bad(), out, external_data=external_data)
    assert isinstance(caught.value, NeurorewriteError) and "\n" not in str(caught.value)
    assert listing(tmp_path) == before, "the old output changed or a temporary file was left"


def test_a_model_the_checker_rejects_writes_nothing_where_nothing_was(tmp_path) -> None:
    with pytest.raises(VerificationError):
        save_model(unknown_op(), tmp_path / "new.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("external_data", [False, True])
def test_a_valid_model_replaces_the_old_output(tmp_path, external_data) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous model")
    model = mlp_model(d=40, h=30, o=5)
    save_model(model, out, external_data=external_data)
    names = sorted(p.name for p in tmp_path.iterdir())
    # the data file has a unique name (model.onnx.<random>.data), published with the model as one unit
    assert names[0] == "model.onnx" and len(names) == 1 + external_data
    assert all(n.startswith("model.onnx.") and n.endswith(".data") for n in names[1:])
    onnx.checker.check_model(str(out), full_check=True)
    x = np.ones((2, 40), np.float32)
    np.testing.assert_array_equal(run_model(out, {"x": x})[0], run_model(model, {"x": x})[0])


def test_external_data_with_only_small_tensors(tmp_path) -> None:
    """A model that came with external data but whose tensors are all small: onnx writes no data file,
    and the save must not fail looking for one (it raised FileNotFoundError)."""
    small = mlp_model(d=4, h=3, o=2)
    out = save_model(small, tmp_path / "small.onnx", external_data=True)
    assert [p.name for p in tmp_path.iterdir()] == ["small.onnx"]
    x = np.ones((2, 4), np.float32)
    np.testing.assert_array_equal(run_model(out, {"x": x})[0], run_model(small, {"x": x})[0])
