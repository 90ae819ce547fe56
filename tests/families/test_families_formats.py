"""Gated, fused, GPT-2 and 1x1-Conv blocks through every step after expand: formats, --structured,
calibration, the runtime's fold of tied children, analyze and inspect on every format written."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import neurorewrite
from neurorewrite.analysis.metrics import feature_capacity, row_cosines
from neurorewrite.analysis.summary import block_nonzeros
from neurorewrite.passes.calibrate import CalibrateOptions
from neurorewrite.passes.prepare import prepare_for_runtime
from neurorewrite.passes.sparse_to_standard import to_standard_ops
from neurorewrite.rewriter.blocks import find_blocks
from neurorewrite.rewriter.record import read_record
from neurorewrite.runtime.ort import ort_session
from tests.families.hf import H, feeds
from tests.families.reference import block_io, block_reference

CASES = [("llama", "ts"), ("phi3", "ts"), ("gpt2", "ts"), pytest.param("phi3", "dynamo", marks=pytest.mark.slow),
         pytest.param("gemma", "ts", marks=pytest.mark.slow)]


def run(model: onnx.ModelProto, family: str) -> np.ndarray:
    return ort_session(model, providers=["CPUExecutionProvider"]).run(None, feeds(family))[0]


def check_stored_function(model: onnx.ModelProto, family: str) -> None:
    """Every block read back from its stored form (FPE layout) computes what onnxruntime computes."""
    standard = prepare_for_runtime(model, "onnxruntime")[0]
    blocks = find_blocks(model).blocks
    assert blocks
    for block in blocks:
        x, y = block_io(standard, block, feeds(family))
        want = block_reference(model, block, x)
        np.testing.assert_allclose(y, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("family,exporter", CASES)
def test_formats_structured_and_analyze(families, family: str, exporter: str) -> None:
    path = families.path(family, exporter)
    dense, report = neurorewrite.expand(path, alpha=3, split="blocks", seed=1)
    want = run(dense, family)
    form = report.blocks[0].form
    layers = len(find_blocks(dense).blocks[0].linears)  # gate, up, down; a fused gate/up is one layer
    for fmt in ("sparse", "grouped"):
        lowered, _ = neurorewrite.expand(path, alpha=3, split="blocks", seed=1, format=fmt)
        np.testing.assert_allclose(run(lowered, family), want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
        check_stored_function(lowered, family)
        if fmt == "sparse":
            assert sum(n.op_type == "SparseLinear" for n in lowered.graph.node) == layers
    structured, srep = neurorewrite.expand(path, alpha=3, structured=True, seed=1)
    record = read_record(structured)
    assert record.structured and record.tied == (report.blocks[0].second,)
    assert srep.blocks[0].nnz_after == srep.blocks[0].nnz_before
    check_stored_function(structured, family)
    analyses = {name: neurorewrite.analyze(path, m) for name, m in
                (("dense", dense), ("sparse", lowered), ("structured", structured))}
    with_data = neurorewrite.analyze(path, structured, data=feeds(family, batch=4))
    (before,), (after,) = with_data.model.blocks, with_data.other.blocks
    assert before.activations is not None
    # written one MatMul per child, a lone tied block has no hidden tensor to measure
    assert (after.activations is None) == (find_blocks(structured).blocks[0].hidden == "")
    for name, result in analyses.items():
        (after,) = result.other.blocks
        (before,) = result.model.blocks
        if name == "structured":  # tied: the count is over stored parameters, as the record says
            assert block_nonzeros(after) == srep.blocks[0].nnz_after == block_nonzeros(before)
        assert (after.form, after.width) == (form, 3 * (128 if family == "gpt2" else H)), name
        assert result.matching.pairs and not result.matching.mismatches, name
        if form != "mlp" and name == "dense":  # measured over gate and up rows together (docs/methods.md 1.8)
            gate, up = _gate_up(dense)
            np.testing.assert_allclose(after.capacity, feature_capacity(np.vstack([gate, up])), rtol=1e-6)
            assert after.cosine.mean_abs == pytest.approx(row_cosines(np.hstack([gate, up])).mean_abs)


def _gate_up(model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray]:
    """The gate and up weights of a dense gated model, read independently of analyze."""
    from neurorewrite.rewriter.graph import GraphIndex
    from neurorewrite.rewriter.linear import read_weights

    (block,) = find_blocks(model).blocks
    index = GraphIndex.build(model.graph)
    w = read_weights(index, block.first)[0]
    if block.split is not None:
        return w[: w.shape[0] // 2], w[w.shape[0] // 2 :]
    return w, read_weights(index, block.up)[0]


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_calibration_refits_the_down_projection(families, family: str) -> None:
    path = families.path(family, "ts")
    sample = {"input_ids": np.random.default_rng(3).integers(0, 101, (48, 9)).astype(np.int64)}
    for structured in (False, True):
        model, report = neurorewrite.expand(path, alpha=4, calibrate=sample, structured=structured)
        (note,) = report.calibration
        assert "down_proj" in note["layer"] and note["rmse_after"] < note["rmse_before"]
        assert report.blocks[0].nnz_after == report.blocks[0].nnz_before
        assert read_record(model).calibrated == (note["layer"],)


@pytest.mark.parametrize("family,exporter", [
    ("gpt2", "ts"), ("bert", "ts"), pytest.param("gpt2", "dynamo", marks=pytest.mark.slow),
    pytest.param("bert", "dynamo", marks=pytest.mark.slow)])
def test_calibration_of_conv1d_and_bert_blocks_and_their_fold_at_load(families, family: str, exporter: str) -> None:
    """GPT-2's Conv1D (Reshapes inside the block whose targets come from the Shape of its input) and BERT
    (GatherElements, GatherND in the exports) calibrate; the sparse file's children without an input are
    folded at load (the Reshape targets cut with them) and the function is the same."""
    path = families.path(family, exporter)
    sample = {"input_ids": np.random.default_rng(3).integers(0, 101, (48, 9)).astype(np.int64)}
    model, report = neurorewrite.expand(path, alpha=4, calibrate=sample, format="sparse")
    (note,) = report.calibration
    assert note["holdout_rmse_after"] < 0.2 * note["holdout_rmse_before"]
    prepared, prep = prepare_for_runtime(model, "onnxruntime")
    (row,) = prep.constant
    assert row["constant"] == note["constant_inputs"] > 0
    want = run(to_standard_ops(model), family)
    np.testing.assert_allclose(run(prepared, family), want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_gated_sparse_down_is_folded_at_load(families) -> None:
    path = families.path("llama", "ts")
    sparse, _ = neurorewrite.expand(path, alpha=4, format="sparse")
    dense, _ = neurorewrite.expand(path, alpha=4)
    prepared, report = prepare_for_runtime(sparse, "onnxruntime")
    assert [row["node"] for row in report.folded] and all("down_proj" in row["node"] for row in report.folded)
    np.testing.assert_allclose(run(prepared, "llama"), run(dense, "llama"), rtol=1e-5, atol=1e-5)


def test_pointwise_conv_dense_sparse_and_analyze(families) -> None:
    path = families.path("conv_mlp", "ts")
    dense, _ = neurorewrite.expand(path, alpha=4, split="blocks")
    sparse, _ = neurorewrite.expand(path, alpha=4, split="blocks", format="sparse")
    np.testing.assert_allclose(run(sparse, "conv_mlp"), run(dense, "conv_mlp"), rtol=1e-5, atol=1e-5)
    check_stored_function(sparse, "conv_mlp")
    data = {"x": feeds("conv_mlp", batch=6)["x"]}
    result = neurorewrite.analyze(path, sparse, data=data)
    (before,), (after,) = result.model.blocks, result.other.blocks
    assert before.activations.mean.shape == (96,) and after.activations.mean.shape == (4 * 96,)
    with pytest.raises(neurorewrite.errors.InvalidOptionError, match="1x1 Conv block"):
        neurorewrite.expand(path, alpha=4, structured=True)


def test_pointwise_conv_calibration_fits_the_channels(families) -> None:
    """The refit reads the channel axis: the error it reports is the error the written model has."""
    path = families.path("conv_mlp", "ts")
    sample = {"x": feeds("conv_mlp", batch=16, seed=4)["x"]}
    # no held-out rows: the note's error is then over every row the check runs
    model, report = neurorewrite.expand(path, alpha=4, calibrate=sample, calibrate_options=CalibrateOptions(holdout=0.0))
    (note,) = report.calibration
    want = ort_session(path).run(None, sample)[0]
    got = ort_session(model).run(None, sample)[0]
    assert note["rmse_after"] < note["rmse_before"]
    assert float(np.sqrt(np.mean((got - want) ** 2))) == pytest.approx(note["rmse_after"], rel=1e-3)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_every_split_and_prune_on_gated_blocks(families, family: str, tmp_path) -> None:
    import json

    from neurorewrite.fpe import PRUNE_MODES, SPLITS

    path = families.path(family, "ts")
    info = neurorewrite.inspect(path)
    (block,) = info.blocks
    assert block.parameters == 3 * 32 * H and block.form.startswith("gated")
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps([list(range(0, 32, 2)), list(range(1, 32, 2))]))
    for split in SPLITS:
        for prune in PRUNE_MODES:
            model, report = neurorewrite.expand(path, alpha=2, split=split, prune=prune,
                                                groups=groups if split == "groups" else None)
            (row,) = report.blocks
            assert row.nnz_after == row.nnz_before == block.nonzeros, (split, prune)
            assert np.isfinite(run(model, family)).all()
            record = read_record(model).blocks[0]
            assert record.form == block.form and record.up == block.up
