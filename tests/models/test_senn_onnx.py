"""A SENN-grown network exports to plain ONNX ops and onnxruntime reproduces torch (1e-5)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from neurorewrite.models.senn import SelfExpandingMLP
from neurorewrite.models.senn_config import SENNConfig
from neurorewrite.models.senn_train import fit

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
torch.set_num_threads(1)
PLAIN_OPS = {"Gemm", "MatMul", "Add", "Mul", "Div", "Sqrt", "Reciprocal", "Pow", "Constant", "Identity"}


def test_grown_network_runs_in_onnxruntime(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.rand(128, 2) * 2 - 1
    y = torch.sin(3 * x[:, :1]) * x[:, 1:]
    config = SENNConfig(tau=0.0, alpha_abs=0.0, cooldown=2, candidates=4, search_steps=5, depth_margin=0.0)
    net = SelfExpandingMLP(2, 1, [], config=config)
    fit(net, x, y, epochs=6)
    assert any(e.kind == "depth" for e in net.history) and any(e.kind == "width" for e in net.history)
    net.eval()
    path = tmp_path / "senn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net, (x[:4],), str(path), dynamo=False, input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert {node.op_type for node in model.graph.node} <= PLAIN_OPS
    assert all(node.domain in ("", "ai.onnx") for node in model.graph.node)
    probe = torch.randn(50, 2) * 2
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": probe.numpy()})
    with torch.no_grad():
        expected = net(probe).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
