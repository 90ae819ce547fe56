"""``neurorewrite finetune`` end to end: a real export, expand, finetune, onnxruntime; and its errors."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from neurorewrite.api import expand
from neurorewrite.cli import main
from neurorewrite.rewriter.record import read_record
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.linear import find_linears, read_weights
from neurorewrite.runtime.ort import ort_session

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finetune_cli")
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(dense, (torch.randn(2, 6),), str(root / "dense.onnx"), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    expand(root / "dense.onnx", alpha=2, seed=0, output=root / "model.fpe.onnx")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    np.savez(root / "train.npz", x=x, y=y)
    np.savez(root / "no_y.npz", x=x, labels=y)
    np.savez(root / "wide.npz", x=np.zeros((400, 7), np.float32), y=y)
    (root / "truncated.npz").write_bytes((root / "train.npz").read_bytes()[:300])
    return root


def nonzero_patterns(path: Path) -> list[np.ndarray]:
    model = onnx.load(str(path))
    index = GraphIndex.build(model.graph)
    return [read_weights(index, lin)[0] != 0 for lin in find_linears(index).values()]


def test_finetune_writes_a_trained_model(workdir, capsys):
    out = workdir / "tuned.onnx"
    code = main(["finetune", str(workdir / "model.fpe.onnx"), "--data", str(workdir / "train.npz"),
                 "--epochs", "20", "--lr", "0.01", "-o", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "train accuracy" in text and f"wrote {out}" in text
    onnx.checker.check_model(str(out), full_check=True)
    for a, b in zip(nonzero_patterns(workdir / "model.fpe.onnx"), nonzero_patterns(out), strict=True):
        np.testing.assert_array_equal(a, b)
    assert read_record(onnx.load(str(out))) == read_record(onnx.load(str(workdir / "model.fpe.onnx")))
    with np.load(workdir / "train.npz") as data:
        x, y = data["x"], data["y"]
    before = (ort_session(workdir / "model.fpe.onnx").run(None, {"x": x})[0].argmax(1) == y).mean()
    after = (ort_session(out).run(None, {"x": x})[0].argmax(1) == y).mean()
    assert after > before


@pytest.mark.parametrize(
    "data,extra,message",
    [
        ("no_y.npz", [], "needs arrays x (inputs) and y (labels or targets); missing y (found labels, x)"),
        ("wide.npz", [], "x has shape [400, 7] but the model input x expects"),
        ("dense.onnx", [], "not a readable .npz file"),
        ("missing.npz", [], "not a readable .npz file"),
        ("truncated.npz", [], "not a readable .npz file"),
        ("train.npz", ["--epochs", "-1"], "--epochs must be >= 0"),
        ("train.npz", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ],
    ids=["missing-array", "shape-mismatch", "not-npz", "no-file", "truncated", "epochs", "batch"],
)
def test_errors_are_one_line_and_write_nothing(workdir, capsys, data, extra, message):
    out = workdir / "never.onnx"
    code = main(["finetune", str(workdir / "model.fpe.onnx"), "--data", str(workdir / data), "-o", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and err.startswith("neurorewrite finetune: error:")
    assert not out.exists()
    assert not [p for p in workdir.iterdir() if p.name.startswith(".never")], "a temporary file was left behind"


def test_help_names_the_expected_arrays():
    result = subprocess.run([sys.executable, "-m", "neurorewrite.cli", "finetune", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "arrays x" in result.stdout and "--epochs" in result.stdout and "--data" in result.stdout
