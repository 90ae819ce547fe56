"""Every family of issue 10, built from its transformers config and exported with both exporters:
found with the right form, expanded at alpha 4 with exact counts, run in onnxruntime and checked
against a numpy forward of the expanded weights; alpha 1 reproduces the outputs.

The fast tier runs one representative export per family (TorchScript: dynamo exports take 20 to 100 s
each on two cores); the rest of the matrix is marked slow. The forms only dynamo writes (Phi-3's Split,
the merged shared bias) have hand-built cases in the fast tier (tests/rewriter/test_block_reasons.py,
tests/rewriter/test_blocks.py) and their real exports in the slow one.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import neurorewrite
from neurorewrite.rewriter.blocks import find_blocks
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.io import load_model
from neurorewrite.rewriter.linear import read_weights
from tests.conftest import run_model
from tests.families.hf import FAMILIES, feeds
from tests.families.reference import block_io, block_reference

# family -> (form, activation) of its one FFN block
EXPECTED = {
    "llama": ("gated", "SiLU (gated)"), "mistral": ("gated", "SiLU (gated)"), "qwen2": ("gated", "SiLU (gated)"),
    "gemma": ("gated", "Gelu(tanh) (gated)"), "t5_gated_gelu": ("gated", "Gelu(tanh) (gated)"),
    "phi3": ("gated (fused gate/up)", "SiLU (gated)"), "t5_relu": ("mlp", "Relu"), "gpt2": ("mlp", "Gelu(tanh)"),
    "bert": ("mlp", "Gelu(erf)"), "conv_mlp": ("mlp", "Gelu(erf)"), "llama_fp16": ("gated", "SiLU (gated)"),
}
FAST = {("llama", "ts"), ("gemma", "ts"), ("t5_gated_gelu", "ts"), ("phi3", "ts"),
        ("t5_relu", "ts"), ("gpt2", "ts"), ("bert", "ts"), ("conv_mlp", "ts"), ("llama_fp16", "ts")}
MATRIX = [
    pytest.param(f, e, marks=() if (f, e) in FAST else pytest.mark.slow, id=f"{f}.{e}")
    for f in FAMILIES if f != "llama_bf16" for e in ("ts", "dynamo")
]


def block_nonzeros(model: onnx.ModelProto) -> list[int]:
    """Each block's count (weights and biases of its linears) read from the graph."""
    index = GraphIndex.build(model.graph)
    return [sum(int(np.count_nonzero(a)) for lin in b.linears for a in read_weights(index, lin) if a is not None)
            for b in find_blocks(model).blocks]


def check_block_values(model: onnx.ModelProto, family: str, rtol: float) -> None:
    """onnxruntime's block output equals a numpy forward of the block's stored weights on its input."""
    (block,) = find_blocks(model).blocks
    x, y = block_io(model, block, feeds(family))
    want = block_reference(model, block, x)
    np.testing.assert_allclose(y, want, rtol=0, atol=rtol * float(np.abs(want).max()))


@pytest.mark.parametrize("family,exporter", MATRIX)
def test_family_expands_exactly_and_runs(families, family: str, exporter: str) -> None:
    path = families.path(family, exporter)
    original = load_model(path)
    search = find_blocks(original)
    assert [(b.form, b.activation) for b in search.blocks] == [EXPECTED[family]]
    assert not search.skipped, search.skipped
    new, report = neurorewrite.expand(path, alpha=4, seed=0)
    onnx.checker.check_model(new, full_check=True)
    (row,) = report.blocks
    assert row.nnz_after == row.nnz_before == block_nonzeros(original)[0] == block_nonzeros(new)[0]
    assert (row.width_after, row.form) == (4 * row.width_before, EXPECTED[family][0])
    fp16 = family == "llama_fp16"
    before, after = run_model(original, feeds(family)), run_model(new, feeds(family))
    assert after[0].shape == before[0].shape and np.isfinite(after[0]).all()
    check_block_values(new, family, rtol=5e-3 if fp16 else 1e-5)
    same, _ = neurorewrite.expand(path, alpha=1)
    np.testing.assert_allclose(run_model(same, feeds(family))[0], before[0], rtol=1e-5, atol=1e-3 if fp16 else 1e-5)


@pytest.mark.parametrize("exporter", ["ts", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_fp16_weights_stay_fp16(families, exporter: str) -> None:
    path = families.path("llama_fp16", exporter)
    new, _ = neurorewrite.expand(path, alpha=4)
    (block,) = find_blocks(new).blocks
    index = GraphIndex.build(new.graph)
    for lin in block.linears:
        assert index.initializers[lin.weight].data_type == onnx.TensorProto.FLOAT16
    assert run_model(new, feeds("llama_fp16"))[0].dtype == np.float16


@pytest.mark.slow
def test_fp16_converted_by_onnxruntime_expands(families) -> None:
    path = families.variant("llama", "ts", "fp16")
    new, report = neurorewrite.expand(path, alpha=4)
    assert report.blocks[0].nnz_after == report.blocks[0].nnz_before
    assert np.isfinite(run_model(new, feeds("llama"))[0]).all()


@pytest.mark.parametrize("exporter", ["ts", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_bf16_weights_are_kept(families, exporter: str) -> None:
    """onnxruntime's CPU provider cannot run these models (no bf16 Where); the expansion keeps bf16."""
    path = families.path("llama_bf16", exporter)
    new, report = neurorewrite.expand(path, alpha=4)
    onnx.checker.check_model(new, full_check=True)
    assert report.blocks[0].nnz_after == report.blocks[0].nnz_before == block_nonzeros(new)[0]
    index = GraphIndex.build(new.graph)
    for lin in find_blocks(new).blocks[0].linears:
        assert index.initializers[lin.weight].data_type == onnx.TensorProto.BFLOAT16


def test_bf16_models_calibrate_in_float32_and_keep_bf16(families) -> None:
    """The lifter (models/onnx_module.py) computes a bfloat16 graph in float32 (torch cannot take numpy's
    bfloat16): the calibration runs, improves the held-out error, and writes bfloat16 weights back."""
    path = families.path("llama_bf16", "ts")
    sample = {"input_ids": np.random.default_rng(3).integers(0, 101, (48, 9)).astype(np.int64)}
    new, report = neurorewrite.expand(path, alpha=4, calibrate=sample)
    (note,) = report.calibration
    assert note["holdout_rmse_after"] < 0.8 * note["holdout_rmse_before"]
    assert report.blocks[0].nnz_after == report.blocks[0].nnz_before == block_nonzeros(new)[0]
    index = GraphIndex.build(new.graph)
    for lin in find_blocks(new).blocks[0].linears:
        assert index.initializers[lin.weight].data_type == onnx.TensorProto.BFLOAT16
