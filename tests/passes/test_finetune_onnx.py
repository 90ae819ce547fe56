"""The ONNX fine-tuning pass: lift to torch with masks, train, write back (real exports, real onnxruntime)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from neurorewrite.api import expand
from neurorewrite.errors import DataError, NoBlocksError, UnsupportedModelError
from neurorewrite.models.onnx_module import OnnxMLP
from neurorewrite.passes.finetune_onnx import FINETUNE_KEY, FinetuneOptions, finetune_model
from neurorewrite.rewriter.record import read_record
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.linear import find_linears, read_weights
from neurorewrite.runtime.ort import ort_session

torch.set_num_threads(1)


def torch_export(module: nn.Module, d: int, opset: int | None = None) -> onnx.ModelProto:
    import io

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.randn(2, d),), buffer, dynamo=False, opset_version=opset,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    return onnx.load_from_string(buffer.getvalue())


def matmul_model(seed: int = 0) -> onnx.ModelProto:
    """x -> MatMul+Add (Constant weights) -> Tanh -> Gemm(alpha=0.5, beta=2, transB=0) -> Softmax."""
    rng = np.random.default_rng(seed)
    w1, b1 = rng.standard_normal((5, 7)).astype(np.float32), rng.standard_normal(7).astype(np.float32)
    w2, b2 = rng.standard_normal((7, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w1"], value=numpy_helper.from_array(w1, "w1")),
        helper.make_node("MatMul", ["x", "w1"], ["mm"], name="fc1"),
        helper.make_node("Add", ["mm", "b1"], ["h"], name="fc1_add"),
        helper.make_node("Tanh", ["h"], ["a"], name="act"),
        helper.make_node("Gemm", ["a", "w2", "b2"], ["z"], name="fc2", alpha=0.5, beta=2.0),
        helper.make_node("Softmax", ["z"], ["y"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(b2, "b2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def data(d: int, n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x, ((x[:, 0] > 0).astype(np.int64) + (x[:, 1] * x[:, 2] > 0))


def layer_weights(model: onnx.ModelProto) -> list[np.ndarray]:
    index = GraphIndex.build(model.graph)
    return [read_weights(index, lin)[0] for lin in find_linears(index).values()]


LIFT_CASES = {
    "gemm-gelu-erf": lambda: torch_export(nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)), 6, opset=17),
    "gemm-chain-silu": lambda: torch_export(nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.SiLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3)), 6),
    "matmul-constant-gemm-scaled": matmul_model,
}


@pytest.mark.parametrize("name", LIFT_CASES)
def test_lifted_module_matches_onnxruntime(name):
    torch.manual_seed(0)
    model = LIFT_CASES[name]()
    lifted = OnnxMLP(model)
    x = data(lifted.input_shape[1])[0][:50]
    ref = ort_session(model).run(None, {"x": x})[0]
    with torch.no_grad():
        np.testing.assert_allclose(lifted(torch.from_numpy(x)).numpy(), ref, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def expanded() -> onnx.ModelProto:
    torch.manual_seed(1)
    dense = torch_export(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)), 6)
    return expand(dense, alpha=3, seed=2)[0]


def test_finetune_keeps_masks_counts_and_metadata(expanded, tmp_path):
    original = expanded.SerializeToString()
    x, y = data(6)
    new, report = finetune_model(expanded, x, y, FinetuneOptions(epochs=15, lr=1e-2, optimizer="sgd", momentum=0.9, weight_decay=1e-2))
    assert expanded.SerializeToString() == original, "the pass changed its input model"
    for before, after in zip(layer_weights(expanded), layer_weights(new), strict=True):
        np.testing.assert_array_equal(before != 0, after != 0)
        assert not np.array_equal(before, after)
    assert all(layer.nnz_before == layer.nnz_after for layer in report.layers) and len(report.layers) == 3
    assert report.loss == "cross_entropy" and report.loss_after < report.loss_before
    assert read_record(new) == read_record(expanded)
    record = json.loads(next(p.value for p in new.metadata_props if p.key == FINETUNE_KEY))
    assert record["epochs"] == 15 and record["optimizer"] == "sgd"
    path = tmp_path / "tuned.onnx"
    onnx.save(new, path)
    onnx.checker.check_model(str(path), full_check=True)
    lifted = OnnxMLP(new)
    with torch.no_grad():
        ours = lifted(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ort_session(path).run(None, {"x": x})[0], ours, rtol=1e-5, atol=1e-5)
    accuracy = float((ours.argmax(1) == y).mean())
    assert accuracy == pytest.approx(report.accuracy_after, abs=1e-6)


def test_float_targets_train_with_mse():
    model = matmul_model()
    x, _ = data(5)
    target = np.eye(3, dtype=np.float32)[(x[:, 0] > 0).astype(int)]
    _, report = finetune_model(model, x, target, FinetuneOptions(epochs=10, lr=1e-2))
    assert report.loss == "mse" and report.accuracy_after is None
    assert report.loss_after < report.loss_before


@pytest.mark.parametrize(
    "x_shape,y,match",
    [
        ((300, 5), None, r"x has shape \[300, 5\] but the model input x expects"),
        ((300, 6), np.zeros(299, np.int64), "300 samples but y has 299"),
        ((300, 6), np.full(300, 3, np.int64), r"values in 0..2"),
        ((300, 6), np.zeros((300, 2), np.float32), r"float targets y have shape \[300, 2\]"),
        ((300, 6), np.array(["a"] * 300), "dtype"),
    ],
    ids=["x-width", "length", "label-range", "target-shape", "string-labels"],
)
def test_data_that_does_not_fit_the_model(expanded, x_shape, y, match):
    x = np.zeros(x_shape, np.float32)
    with pytest.raises(DataError, match=match):
        finetune_model(expanded, x, np.zeros(300, np.int64) if y is None else y, FinetuneOptions(epochs=1))


def test_model_without_linear_layers():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    with pytest.raises(NoBlocksError, match="no linear layer"):
        OnnxMLP(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_unsupported_op_is_named():
    model = matmul_model()
    model.graph.node[-1].op_type = "Hardmax"  # an op the lifter has no torch version of
    with pytest.raises(UnsupportedModelError, match="Hardmax"):
        OnnxMLP(model)
