"""Pairing the blocks of an original model with a rewritten one, and explaining what does not pair."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import export, mlp

import neurorewrite
from neurorewrite.analysis import analyze
from neurorewrite.analysis.summary import summarize
from neurorewrite.errors import NoBlocksError


def test_an_expansion_pairs_by_its_fpe_record(models):
    analysis = analyze(models["mlp"].path, models["mlp_fpe"].path)
    (pair,) = analysis.matching.pairs
    assert (pair.how, pair.alpha) == ("FPE metadata", 4)
    assert not analysis.matching.mismatches and not analysis.matching.notes
    before, after = analysis.model.block(pair.before), analysis.other.block(pair.after)
    assert (before.width, after.width) == (16, 64)
    shift = summarize(analysis)["pairs"][0]
    assert shift["nonzeros"][0] == shift["nonzeros"][1]  # the pass keeps the count exactly
    # the same parents are pictured before and after: all 16 parents and their 64 children
    assert (before.gram.rows, after.gram.rows, after.gram.group) == (16, 64, 4)


def test_blocks_with_the_same_node_names_pair_by_name(models):
    analysis = analyze(models["chain"].path, models["chain"].path)
    assert [p.how for p in analysis.matching.pairs] == ["node names", "node names"]
    assert [p.alpha for p in analysis.matching.pairs] == [1, 1]


def test_differently_named_exports_pair_in_graph_order(models, tmp_path):
    dynamo = export(models["mlp"].module, tmp_path / "dyn.onnx", dynamo=True).path
    analysis = analyze(models["mlp"].path, dynamo)
    (pair,) = analysis.matching.pairs
    assert pair.how == "graph order" and pair.before != pair.after
    a, b = analysis.model.block(pair.before), analysis.other.block(pair.after)
    np.testing.assert_allclose(a.capacity, b.capacity, rtol=1e-6)  # same weights, same metrics


def test_unrelated_blocks_are_mismatches_with_reasons(models):
    analysis = analyze(models["mlp"].path, models["chain"].path)
    assert analysis.matching.pairs == []
    reasons = {(m.model, m.block): m.reason for m in analysis.matching.mismatches}
    assert set(reasons) == {("first", "/0/Gemm"), ("second", "/0/Gemm"), ("second", "/2/Gemm")}
    # the same-named blocks differ in shape: both sides say so
    assert "maps 8 -> 3 features" in reasons["first", "/0/Gemm"] and "8 -> 10" in reasons["first", "/0/Gemm"]
    assert reasons["second", "/0/Gemm"] == reasons["first", "/0/Gemm"]
    assert "unpaired there: /0/Gemm" in reasons["second", "/2/Gemm"]


def test_an_fpe_record_that_does_not_fit_the_original_is_explained(tmp_path):
    small = export(mlp(h=8, seed=5), tmp_path / "small.onnx").path
    wide = export(mlp(h=16, seed=6), tmp_path / "wide.onnx").path
    expanded = tmp_path / "small.fpe.onnx"
    neurorewrite.expand(small, alpha=2, output=expanded)  # 8 -> 16 hidden, like wide's width
    analysis = analyze(wide, expanded)
    (mismatch,) = analysis.matching.mismatches
    assert "FPE record says" in mismatch.reason and "not the one that was expanded" in mismatch.reason
    assert analysis.matching.pairs == []


def test_the_rewritten_model_given_first_is_noted(models):
    analysis = analyze(models["mlp_fpe"].path, models["mlp"].path)
    assert any("give the original model first" in n for n in analysis.matching.notes)
    assert any("shrinks" in m.reason for m in analysis.matching.mismatches)


def test_a_model_without_mlp_blocks_is_rejected(models):
    with pytest.raises(NoBlocksError, match="no MLP block"):
        analyze(models["linear"].path)
    with pytest.raises(NoBlocksError, match="linear.onnx"):
        analyze(models["mlp"].path, models["linear"].path)
