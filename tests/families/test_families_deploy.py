"""Graphs as deployments write them: merged and Identity-shared biases of untrained exports,
onnxruntime's optimizer (BiasGelu, FastGelu, Gelu, QuickGelu, SkipLayerNormalization, FusedMatMul),
and quantized models, each made by the real tool."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import neurorewrite
from neurorewrite.errors import NoBlocksError, UnsupportedModelError
from neurorewrite.rewriter.blocks import find_blocks
from neurorewrite.rewriter.io import load_model
from tests.conftest import run_model
from tests.families.hf import feeds
from tests.families.reference import block_io, block_reference
from tests.families.test_families_expand import block_nonzeros

slow = pytest.mark.slow


def check_values(model: onnx.ModelProto, family: str) -> None:
    for block in find_blocks(model).blocks:
        x, y = block_io(model, block, feeds(family))
        want = block_reference(model, block, x)
        np.testing.assert_allclose(y, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def outside_blocks(model: onnx.ModelProto) -> dict[str, tuple[list[str], list[bytes]]]:
    """Every node outside the blocks: its inputs and the bytes of the constants it reads."""
    blocks = find_blocks(model).blocks
    inside = {i for b in blocks for lin in b.linears for i in (*lin.nodes, lin.bias_holder)}
    inside |= {i for b in blocks for i in b.activation_nodes}
    inits = {t.name: t.SerializeToString() for t in model.graph.initializer}
    return {n.name: (list(n.input), [inits.get(i, b"") for i in n.input])
            for i, n in enumerate(model.graph.node) if i not in inside}


@pytest.mark.parametrize("exporter", ["ts", pytest.param("dynamo", marks=slow)])
def test_shared_first_biases_are_rewritten_on_private_copies(families, exporter: str) -> None:
    """Untrained 2-layer BERT: the exporter merges the equal intermediate biases into one initializer
    (dynamo) or an Identity of the first (TorchScript), read by both blocks and by other nodes."""
    path = families.path("bert2", exporter, perturb=False)
    original = load_model(path)
    search = find_blocks(original)
    assert len(search.blocks) == 2 and not search.skipped
    assert any("shared with" in n and "private copy" in n for n in search.blocks[0].notes)
    new, report = neurorewrite.expand(path, alpha=4, seed=2)
    assert [b.nnz_after for b in report.blocks] == [b.nnz_before for b in report.blocks] == block_nonzeros(original)
    assert block_nonzeros(new) == block_nonzeros(original)
    assert all(any("shared with" in n for n in b.notes) for b in report.blocks)
    firsts = [find_blocks(new).blocks[k].first.bias for k in range(2)]
    assert firsts[0] != firsts[1], "each block reads its own copy"
    kept, now = outside_blocks(original), outside_blocks(new)
    assert all(kept[name] == value for name, value in now.items()), "nodes outside the blocks read what they read before"
    gone = {n.op_type for n in original.graph.node if n.name in kept.keys() - now.keys()}
    assert gone <= {"Identity"}, "only the Identity copies that fed the rewritten biases are dropped"
    check_values(new, "bert")
    same, _ = neurorewrite.expand(path, alpha=1)
    np.testing.assert_allclose(run_model(same, feeds("bert"))[0], run_model(original, feeds("bert"))[0], rtol=1e-5, atol=1e-5)


def test_bias_gelu_and_skip_layer_norm_from_the_optimizer(families) -> None:
    path = families.variant("bert", "ts", "ortopt")
    original = load_model(path)
    ops = {(n.domain, n.op_type) for n in original.graph.node}
    assert ("com.microsoft", "BiasGelu") in ops and ("com.microsoft", "SkipLayerNormalization") in ops
    (block,) = find_blocks(original).blocks
    assert block.activation == "Gelu(erf) [com.microsoft]" and block.first.bias_node is not None
    assert any("added by BiasGelu" in n for n in block.notes)
    assert any("added by SkipLayerNormalization" in n and "not counted" in n for n in block.notes)
    new, report = neurorewrite.expand(path, alpha=4)
    assert report.blocks[0].nnz_after == report.blocks[0].nnz_before == block_nonzeros(original)[0]
    check_values(new, "bert")
    want = run_model(neurorewrite.expand(path, alpha=4, split="blocks")[0], feeds("bert"))[0]
    for fmt in ("sparse", "grouped"):
        got = run_model(_prepared(neurorewrite.expand(path, alpha=4, split="blocks", format=fmt)[0]), feeds("bert"))[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    same, _ = neurorewrite.expand(path, alpha=1)
    np.testing.assert_allclose(run_model(same, feeds("bert"))[0], run_model(original, feeds("bert"))[0], rtol=1e-5, atol=1e-5)


def _prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    from neurorewrite.passes.prepare import prepare_for_runtime

    return prepare_for_runtime(model, "onnxruntime")[0]


@pytest.mark.parametrize("family,kind,label", [
    ("bert", "ortopt_nobiasgelu", "Gelu(erf) [com.microsoft]"),
    ("bert_quick_gelu", "ortopt", "QuickGelu [com.microsoft]"),
    pytest.param("gpt2", "ortopt", "Gelu(tanh) [com.microsoft]", marks=slow),
])
def test_contrib_activations_from_the_optimizer(families, family: str, kind: str, label: str) -> None:
    path = families.variant(family, "ts", kind)
    (block,) = find_blocks(load_model(path)).blocks
    assert block.activation == label
    new, report = neurorewrite.expand(path, alpha=4)
    assert report.blocks[0].nnz_after == report.blocks[0].nnz_before
    check_values(new, "bert" if family != "gpt2" else "gpt2")


def test_quick_gelu_decomposition_is_named(families) -> None:
    (block,) = find_blocks(load_model(families.path("bert_quick_gelu", "ts"))).blocks
    assert block.activation == "QuickGelu"


def test_fused_matmul_from_the_session_optimizer(tmp_path) -> None:
    """onnxruntime's MatMulScaleFusion turns ``MatMul(x * 0.125, W)`` into ``FusedMatMul(alpha=0.125)``."""
    torch = pytest.importorskip("torch")
    import onnxruntime as ort

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(16, 24), torch.nn.Linear(24, 8)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x * 0.125)))

    torch.manual_seed(0)
    src, dst = tmp_path / "scaled.onnx", tmp_path / "scaled.opt.onnx"
    torch.onnx.export(Scaled().eval(), (torch.randn(2, 5, 16),), str(src), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b", 1: "s"}})
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    (block,) = find_blocks(load_model(dst)).blocks
    assert block.first.op == "FusedMatMul" and block.first.scale == 0.125
    x = {"x": np.random.default_rng(0).standard_normal((3, 4, 16)).astype(np.float32)}
    same, _ = neurorewrite.expand(dst, alpha=1)
    np.testing.assert_allclose(run_model(same, x)[0], run_model(dst, x)[0], rtol=1e-5, atol=1e-6)
    new, report = neurorewrite.expand(dst, alpha=4)
    assert report.blocks[0].nnz_after == report.blocks[0].nnz_before
    (wide,) = find_blocks(new).blocks
    x_rows, y_rows = block_io(new, wide, x)
    np.testing.assert_allclose(y_rows, block_reference(new, wide, x_rows), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family,kind", [
    ("bert", "qdyn"), pytest.param("bert", "qdq", marks=slow), pytest.param("llama", "qdyn", marks=slow),
    pytest.param("llama", "qdq", marks=slow),
])
def test_quantized_blocks_are_listed_with_what_to_do(families, family: str, kind: str) -> None:
    path = families.variant(family, "ts", kind)
    search = find_blocks(load_model(path))
    assert not search.blocks
    quantized = [s for s in search.skipped if s.code == "quantized"]
    assert len(quantized) == 1, search.skipped  # the block's first linear, followed by its activation
    assert "expand the float model, then quantize" in quantized[0].reason
    assert ("gate_proj" if family == "llama" else "intermediate") in quantized[0].name
    with pytest.raises(NoBlocksError, match="expand the float model, then quantize"):
        neurorewrite.expand(path, alpha=4)


def test_calibrating_an_optimized_model_says_to_use_the_export(families) -> None:
    """The lifter does not run onnxruntime's fused contrib ops (Attention, SkipLayerNormalization, ...): the
    one-line error names them and says to calibrate the model as exported."""
    path = families.variant("bert", "ts", "ortopt")
    sample = {"input_ids": np.random.default_rng(3).integers(0, 101, (48, 9)).astype(np.int64)}
    with pytest.raises(UnsupportedModelError, match="Attention .*onnxruntime's fusions: run this on the model as exported") as info:
        neurorewrite.expand(path, alpha=4, calibrate=sample)
    assert len(str(info.value).splitlines()) == 1
