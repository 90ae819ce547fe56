"""Nothing silent: every linear-looking node an activation follows is either in a block or listed as
skipped with a reason, in ``find_blocks``, ``inspect --json`` and ``expand``'s report; checked with a
definition of "linear followed by an activation" written here, apart from the detector's."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest

from neurorewrite.rewriter.blocks import find_blocks
from neurorewrite.rewriter.io import load_model

LINEAR_OPS = {"MatMul", "Gemm", "Conv", "FusedMatMul", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat"}
ACTIVATION_OPS = {"Relu", "Gelu", "Erf", "Tanh", "Sigmoid", "FastGelu", "BiasGelu", "QuickGelu", "QLinearSigmoid"}
slow = pytest.mark.slow
FILES = [
    ("llama", "ts", None), ("phi3", "ts", None), ("gpt2", "ts", None), ("conv_mlp", "ts", None),
    ("bert", "ts", "ortopt"), ("bert", "ts", "qdyn"),
    *[pytest.param(f, e, v, marks=slow) for f, e, v in [
        ("llama", "dynamo", None), ("phi3", "dynamo", None), ("gpt2", "dynamo", None), ("bert", "dynamo", None),
        ("gemma", "ts", None), ("t5_gated_gelu", "dynamo", None), ("llama", "ts", "qdq"), ("llama", "ts", "qdyn"),
        ("bert", "ts", "qdq"), ("gpt2", "ts", "ortopt"),
    ]],
]


def followed_by_activation(model: onnx.ModelProto, start: int, depth: int = 4) -> bool:
    """An activation op within ``depth`` nodes after node ``start``, not passing through another linear."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    frontier = list(model.graph.node[start].output)
    for _ in range(depth):
        nxt = []
        for name in frontier:
            for node in consumers.get(name, []):
                if node.op_type in ACTIVATION_OPS:
                    return True
                if node.op_type not in LINEAR_OPS:
                    nxt += list(node.output)
        frontier = nxt
    return False


def _path(families, family: str, exporter: str, variant: str | None):
    return families.variant(family, exporter, variant) if variant else families.path(family, exporter)


@pytest.mark.parametrize("family,exporter,variant", FILES)
def test_every_linear_an_activation_follows_is_accounted_for(families, family: str, exporter: str, variant: str | None) -> None:
    path = _path(families, family, exporter, variant)
    model = load_model(path)
    search = find_blocks(model)
    covered = {lin.name for b in search.blocks for lin in b.linears} | {s.name for s in search.skipped}
    for i, node in enumerate(model.graph.node):
        if node.op_type in LINEAR_OPS and followed_by_activation(model, i):
            assert node.name in covered, f"{node.op_type} node {node.name} is followed by an activation but neither rewritten nor listed"
    assert all(s.reason and s.code for s in search.skipped)


def test_skipped_reasons_reach_the_cli(families, tmp_path) -> None:
    path = families.variant("bert", "ts", "qdyn")
    out = subprocess.run([sys.executable, "-m", "neurorewrite.cli", "inspect", str(path), "--json"],
                         capture_output=True, text=True, check=True)
    (skip,) = json.loads(out.stdout)["skipped"]
    assert skip["code"] == "quantized" and "expand the float model, then quantize" in skip["reason"]
    text = subprocess.run([sys.executable, "-m", "neurorewrite.cli", "expand", str(path), "--alpha", "4",
                           "-o", str(tmp_path / "q.onnx")], capture_output=True, text=True)
    assert text.returncode == 2 and "expand the float model, then quantize" in text.stderr
    assert not (tmp_path / "q.onnx").exists()
    ortopt = families.variant("bert", "ts", "ortopt")
    report = subprocess.run([sys.executable, "-m", "neurorewrite.cli", "expand", str(ortopt), "--alpha", "4", "--json",
                             "-o", str(tmp_path / "o.onnx")], capture_output=True, text=True, check=True)
    (block,) = json.loads(report.stdout)["blocks"]
    assert any("SkipLayerNormalization" in n for n in block["notes"]) and block["form"] == "mlp"
