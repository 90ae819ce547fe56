"""Calibration at transformer shape: padding is not rows, held-out rows are scored, alpha 1 changes nothing,
too few rows warns, bad samples are one-line errors; activation-aware pruning keeps the count."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import neurorewrite
from neurorewrite.api import CalibrationWarning
from neurorewrite.errors import DataError
from neurorewrite.passes.calibrate import CalibrateOptions
from neurorewrite.rewriter.blocks import find_blocks
from neurorewrite.rewriter.graph import GraphIndex
from neurorewrite.rewriter.linear import read_weights
from neurorewrite.runtime.ort import ort_session
from tests.text_models import Embedder, export_embedder, tiny_bert, token_sample

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bert_onnx() -> onnx.ModelProto:
    return export_embedder(Embedder(tiny_bert()))


def block_weights(model: onnx.ModelProto) -> list[np.ndarray]:
    index = GraphIndex.build(model.graph)
    return [w for b in find_blocks(model).blocks for lin in (b.first, b.second) for w in read_weights(index, lin) if w is not None]


def embedding_error(model: onnx.ModelProto, original: onnx.ModelProto, sample: dict) -> float:
    ref = ort_session(original).run(None, sample)[0]
    return float(np.abs(ort_session(model).run(None, sample)[0] - ref).mean())


def test_calibration_scores_held_out_rows_and_recovers_the_embedding(bert_onnx):
    sample, unseen = token_sample(60, seed=1), token_sample(30, seed=2)
    bare, _ = neurorewrite.expand(bert_onnx, alpha=4, seed=0)
    cal, report = neurorewrite.expand(bert_onnx, alpha=4, seed=0, calibrate=sample)
    real = int(sample["attention_mask"].sum())
    notes = report.calibration
    assert len(notes) == 2 and all(n["target"] == "residual" for n in notes)
    for n in notes:
        assert n["rows"] + n["holdout_rows"] == real  # padding positions are not rows
        assert n["holdout_rows"] > 0 and n["holdout_rmse_after"] < n["holdout_rmse_before"]
    assert report.calibration_summary["holdout_samples"] == 12
    assert [b.nnz_after for b in report.blocks] == [b.nnz_before for b in report.blocks]
    assert embedding_error(cal, bert_onnx, unseen) < 0.5 * embedding_error(bare, bert_onnx, unseen)


def test_padding_never_enters_the_fit(bert_onnx):
    """The same sentences with different token ids at padded positions give the same calibrated model."""
    options = CalibrateOptions(holdout=0.0)
    a, _ = neurorewrite.expand(bert_onnx, alpha=2, calibrate=token_sample(30, seed=3), calibrate_options=options)
    b, _ = neurorewrite.expand(bert_onnx, alpha=2, calibrate=token_sample(30, seed=3, garbage=9), calibrate_options=options)
    for wa, wb in zip(block_weights(a), block_weights(b), strict=True):
        np.testing.assert_allclose(wa, wb, rtol=1e-4, atol=1e-6)


def test_alpha_one_with_a_sample_changes_nothing(bert_onnx):
    new, report = neurorewrite.expand(bert_onnx, alpha=1, calibrate=token_sample(20))
    bare, _ = neurorewrite.expand(bert_onnx, alpha=1)
    assert report.calibration == []
    for got, original, expanded in zip(block_weights(new), block_weights(bert_onnx), block_weights(bare), strict=True):
        np.testing.assert_array_equal(got, original)
        np.testing.assert_array_equal(got, expanded)


def test_too_few_rows_is_a_warning(bert_onnx):
    with pytest.warns(CalibrationWarning, match="underdetermined"):
        _, report = neurorewrite.expand(bert_onnx, alpha=4, calibrate=token_sample(2, length=4))
    assert report.warnings and "give at least" in report.warnings[0]


def test_cg_and_exact_solvers_agree(bert_onnx):
    sample = token_sample(40, seed=4)
    cg, _ = neurorewrite.expand(bert_onnx, alpha=2, calibrate=sample, prune_by="magnitude",
                                calibrate_options=CalibrateOptions(max_iters=500, tol=1e-6))
    exact, _ = neurorewrite.expand(bert_onnx, alpha=2, calibrate=sample, prune_by="magnitude",
                                   calibrate_options=CalibrateOptions(solver="exact"))
    for wc, we in zip(block_weights(cg), block_weights(exact), strict=True):
        np.testing.assert_allclose(wc, we, rtol=2e-2, atol=2e-3 * np.abs(we).max())


def test_activation_aware_pruning_keeps_the_count_and_changes_the_choice(bert_onnx):
    sample = token_sample(30, seed=5)
    options = CalibrateOptions(refit="none")
    aware, report = neurorewrite.expand(bert_onnx, alpha=4, calibrate=sample, calibrate_options=options)
    plain, _ = neurorewrite.expand(bert_onnx, alpha=4)
    assert report.calibration == [] and [b.nnz_after for b in report.blocks] == [b.nnz_before for b in report.blocks]
    masks_aware = [w != 0 for w in block_weights(aware)]
    masks_plain = [w != 0 for w in block_weights(plain)]
    assert any((a != p).any() for a, p in zip(masks_aware, masks_plain))
    assert sum(int(m.sum()) for m in masks_aware) == sum(int(m.sum()) for m in masks_plain)


@pytest.mark.parametrize("bad,match", [
    (lambda s: {k: v for k, v in s.items() if k != "token_type_ids"}, "no array for model input"),
    (lambda s: {**s, "input_ids": s["input_ids"][:5]}, "different numbers of samples"),
])
def test_bad_samples_are_one_line_errors(bert_onnx, bad, match):
    with pytest.raises(DataError, match=match):
        neurorewrite.expand(bert_onnx, alpha=2, calibrate=bad(token_sample(10)))


def test_non_finite_rows_are_named(exports):
    from tests.conftest import sample_for

    sample = sample_for(exports["torchscript_gemm"], batch=8)
    sample["x"][5, 2] = np.nan
    with pytest.raises(DataError, match=r"array x holds 1 non-finite value\(s\), the first \(nan\) at row 5, column 2"):
        neurorewrite.expand(exports["torchscript_gemm"], alpha=2, calibrate=sample)


def test_a_refit_per_parent_keeps_the_pattern_and_shares_each_parents_weight(bert_onnx):
    sample = token_sample(40, seed=6)
    options = CalibrateOptions(refit_per="parent")
    bare, _ = neurorewrite.expand(bert_onnx, alpha=4, calibrate=sample, calibrate_options=CalibrateOptions(refit="none"))
    cal, report = neurorewrite.expand(bert_onnx, alpha=4, calibrate=sample, calibrate_options=options)
    assert all(n["width"] == 64 and n["holdout_rmse_after"] < n["holdout_rmse_before"] for n in report.calibration)
    def seconds(model):
        index = GraphIndex.build(model.graph)
        return [read_weights(index, b.second)[0] for b in find_blocks(model).blocks]

    for w_bare, w_cal in zip(seconds(bare), seconds(cal), strict=True):
        np.testing.assert_array_equal(w_bare != 0, w_cal != 0)
        kept = w_cal.reshape(w_cal.shape[0], -1, 4)
        full = (kept != 0).all(axis=2)  # parents whose four copies all survived share one value
        assert np.all(kept[full] == kept[full][:, :1])
