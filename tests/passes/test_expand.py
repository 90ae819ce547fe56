"""The expand pass end to end on real exports: counts, structure, numerics in onnxruntime."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import onnx
import pytest

import neurorewrite
from neurorewrite.fpe import FPEConfig, block_nnz, copy_outputs, expand_bias, scatter_children, split_neurons
from neurorewrite.rewriter.blocks import find_blocks
from neurorewrite.rewriter.editor import NewWeights, replace_weights
from neurorewrite.rewriter.record import read_record
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.io import load_model
from neurorewrite.rewriter.linear import find_linears, read_weights
from tests.builders import LINEAR_VARIANTS, mlp_model
from tests.conftest import run_model, sample_for

EXPORTS = [
    "torchscript_gemm", "dynamo_gemm", "gelu_silu_chain", "gelu_erf", "gelu_tanh", "leaky", "sigmoid", "tanh",
    "elu", "softplus", "transformer", "sklearn_mlp",
]


def digest(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()


def linear_nnz(model: onnx.ModelProto) -> int:
    index = GraphIndex.build(model.graph)
    total = 0
    for lin in find_linears(index).values():
        w, b = read_weights(index, lin)
        total += int(np.count_nonzero(w)) + (0 if b is None else int(np.count_nonzero(b)))
    return total


@pytest.mark.parametrize("name", EXPORTS)
def test_expand_keeps_counts_structure_and_runs(exports, name):
    original = load_model(exports[name])
    before = digest(original)
    new, report = neurorewrite.expand(original, alpha=4, seed=3)
    assert digest(original) == before, "the pass mutated its input"
    onnx.checker.check_model(new, full_check=True)
    onnx.shape_inference.infer_shapes(new, strict_mode=True)
    # exact count per block, and for the whole model
    assert report.blocks and all(b.nnz_after == b.nnz_before for b in report.blocks)
    assert linear_nnz(new) == linear_nnz(original)
    assert all(b.width_after == 4 * b.width_before for b in report.blocks)
    widths = [b.width for b in find_blocks(new).blocks]
    assert widths == [b.width_after for b in report.blocks]
    # everything outside the weights is kept
    assert Counter((n.op_type, n.domain, n.name) for n in new.graph.node) == Counter(
        (n.op_type, n.domain, n.name) for n in original.graph.node
    )
    assert [(o.domain, o.version) for o in new.opset_import] == [(o.domain, o.version) for o in original.opset_import]
    assert [i.SerializeToString() for i in new.graph.input] == [i.SerializeToString() for i in original.graph.input]
    assert [o.SerializeToString() for o in new.graph.output] == [o.SerializeToString() for o in original.graph.output]
    meta = read_record(new)
    assert meta is not None and meta.alpha == 4 and meta.config.seed == 3
    assert [b.nnz_after for b in meta.blocks] == [b.nnz_after for b in report.blocks]
    feeds = sample_for(exports[name])
    outs_before = run_model(original, feeds)
    outs_after = run_model(new, feeds)
    assert [o.shape for o in outs_before] == [o.shape for o in outs_after]
    assert all(np.isfinite(o).all() for o in outs_after if o.dtype.kind == "f")


@pytest.mark.parametrize("name", EXPORTS)
def test_alpha_one_reproduces_outputs(exports, name):
    new, _ = neurorewrite.expand(exports[name], alpha=1)
    feeds = sample_for(exports[name])
    for a, b in zip(run_model(exports[name], feeds), run_model(new, feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs", LINEAR_VARIANTS,
)
def test_linear_variants_expand_exactly(kwargs):
    model = mlp_model(**kwargs)
    x = np.random.default_rng(1).standard_normal((6, 4) if kwargs.get("gemm_attrs", {}).get("transA") else
                                                 (4, 5, 6) if kwargs.get("rank3") else (4, 6)).astype(np.float32)
    same, _ = neurorewrite.expand(model, alpha=1)
    np.testing.assert_allclose(run_model(same, {"x": x})[0], run_model(model, {"x": x})[0], rtol=1e-5, atol=1e-6)
    new, report = neurorewrite.expand(model, alpha=3)
    assert report.blocks[0].nnz_after == report.blocks[0].nnz_before
    assert linear_nnz(new) == linear_nnz(model)
    used = {i for n in new.graph.node for i in n.input}
    constants = [n.output[0] for n in new.graph.node if n.op_type == "Constant"]
    assert all(c in used for c in constants), "dead weight Constants are removed"
    if kwargs.get("weights_as_constants"):  # the second bias is unchanged: kept, not copied
        assert constants == ["fc2.b"]
    assert run_model(new, {"x": x})[0].shape == run_model(model, {"x": x})[0].shape


def test_split_and_copy_preserve_an_identity_block_before_pruning():
    """With a linear activation, splitting inputs and copying outputs (bias split) is exact; it is the
    pruning to the original count that changes the function, so this checks the expansion stage."""
    model = mlp_model(act=None, h=8, d=12, o=5)
    index = GraphIndex.build(model.graph)
    (block,) = find_blocks(model).blocks
    w1, b1 = read_weights(index, block.first)
    w2, b2 = read_weights(index, block.second)
    cfg = FPEConfig(alpha=4, seed=0)
    w1e = scatter_children(w1, split_neurons(w1, cfg), 4)
    new = replace_weights(
        model,
        [NewWeights(block.first, w1e, expand_bias(b1, 4, "split")), NewWeights(block.second, copy_outputs(w2, 4), b2)],
        stale_tensors={block.first.output},
    )
    x = np.random.default_rng(0).standard_normal((7, 12)).astype(np.float32)
    np.testing.assert_allclose(run_model(new, {"x": x})[0], run_model(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_sklearn_keeps_ai_onnx_ml_nodes_and_labels_run(exports):
    new, _ = neurorewrite.expand(exports["sklearn_mlp"], alpha=2)
    assert "ai.onnx.ml" in {o.domain for o in new.opset_import}
    assert any(n.domain == "ai.onnx.ml" for n in new.graph.node)
    x = sample_for(exports["sklearn_mlp"])
    label, proba = run_model(new, x)
    assert label.shape == (4,) and proba.shape == (4, 10)


def test_chain_blocks_share_a_linear_and_total_count_is_exact(exports):
    model = load_model(exports["gelu_silu_chain"])
    new, report = neurorewrite.expand(model, alpha=3)
    assert len(report.blocks) == 2
    middle = find_blocks(new).blocks[1].first
    assert (middle.in_features, middle.out_features) == (60, 36)
    assert linear_nnz(new) == linear_nnz(model)


def test_layers_restricts_the_rewrite(exports):
    model = load_model(exports["gelu_silu_chain"])
    names = [b.name for b in find_blocks(model).blocks]
    new, report = neurorewrite.expand(model, alpha=2, layers=[names[1]])
    assert [b.name for b in report.blocks] == [names[1]]
    assert [b.width for b in find_blocks(new).blocks] == [20, 24]


def test_external_data_models_round_trip(tmp_path):
    model = mlp_model(d=64, h=32, o=8)
    src = tmp_path / "ext.onnx"
    onnx.save_model(model, str(src), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    out = tmp_path / "ext.fpe.onnx"
    new, report = neurorewrite.expand(src, alpha=2, output=out)
    (data,) = tmp_path.glob("ext.fpe.onnx.*.data")  # a name unique to this write (rewriter/io.py)
    stored = onnx.load(str(out), load_external_data=False)
    assert {e.value for t in stored.graph.initializer for e in t.external_data if e.key == "location"} == {data.name}
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in stored.graph.initializer)
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(run_model(out, {"x": x})[0], run_model(new, {"x": x})[0], rtol=1e-6)


def test_block_counts_match_the_numpy_core(exports):
    """The count the report states is the count of the weights actually written."""
    model = load_model(exports["torchscript_gemm"])
    new, report = neurorewrite.expand(model, alpha=4)
    index = GraphIndex.build(new.graph)
    (block,) = find_blocks(new).blocks
    w1, b1 = read_weights(index, block.first)
    w2, b2 = read_weights(index, block.second)
    assert block_nnz(w1, b1, w2, b2) == report.blocks[0].nnz_after
