"""Hugging Face exports (GPT-2, BERT, Llama; TorchScript and dynamo) compiled by TVM with fixed input
shapes: calibrated, in the sparse format, their mask and shape arithmetic folded into constants
(passes/fold_static.py), the library takes the token ids as int64 and matches onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import neurorewrite
from neurorewrite.errors import DataError, ModelLoadError, UnsupportedModelError
from neurorewrite.passes.fold_static import fold_static_values
from neurorewrite.runtime import compile, load, ort_session
from tests.conftest import run_model
from tests.families.hf import feeds

pytest.importorskip("tvm")

CASES = [("gpt2", "ts"), ("bert", "ts"), ("llama", "ts"), pytest.param("gpt2", "dynamo", marks=pytest.mark.slow),
         pytest.param("llama", "dynamo", marks=pytest.mark.slow)]


@pytest.mark.parametrize("family,exporter", CASES)
def test_exports_compile_with_fixed_shapes_and_match_onnxruntime(families, tmp_path: Path, family: str,
                                                                 exporter: str) -> None:
    sample = {"input_ids": np.random.default_rng(3).integers(0, 101, (48, 9)).astype(np.int64)}
    model, _ = neurorewrite.expand(families.path(family, exporter), alpha=4, calibrate=sample, format="sparse")
    path = tmp_path / "model.fpe.onnx"
    onnx.save_model(model, str(path))
    ids = feeds(family)["input_ids"]
    _, report = compile(path, "llvm", output=tmp_path / "m.so", shapes={"input_ids": list(ids.shape)},
                        kernel_choice="estimate")
    assert report.input_types == {"input_ids": "int64"}
    assert any("fixed input shapes determine were folded" in note for note in report.notes)
    library = load(tmp_path / "m.so")
    want = ort_session(path).run(None, {"input_ids": ids})[0]
    np.testing.assert_allclose(library(ids)[0], want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    np.testing.assert_allclose(library(ids.astype(np.float32))[0], want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))
    with pytest.raises(DataError, match="takes int64 values"):
        library(ids + 0.5)


def test_the_static_fold_keeps_an_export_s_outputs(families) -> None:
    """The pass alone on Llama's export (its causal mask built from the sequence length): the same outputs in
    onnxruntime for inputs of the fixed shape, and no Shape left."""
    model = onnx.load(str(families.path("llama", "ts")))
    ids = feeds("llama")["input_ids"]
    folded, report = fold_static_values(model, {"input_ids": list(ids.shape)})
    assert report.tensors > 0 and not [n for n in folded.graph.node if n.op_type == "Shape"]
    np.testing.assert_allclose(run_model(folded, {"input_ids": ids})[0], run_model(model, {"input_ids": ids})[0],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("family", "error"), [("llama", ModelLoadError), ("bert", UnsupportedModelError)])
def test_without_shape_the_failure_says_to_fix_the_shapes(families, tmp_path: Path, family: str, error: type) -> None:
    """TVM's frontend (Llama: at import) or its lowering (BERT: at build) fails on these exports' symbolic
    shape arithmetic; the one-line error names the fix."""
    with pytest.raises(error, match="fix them with --shape, e.g. --shape input_ids=1,128") as info:
        compile(families.path(family, "ts"), "llvm", output=tmp_path / "m.so", kernel_choice="estimate")
    assert len(str(info.value).splitlines()) == 1 and not (tmp_path / "m.so").exists()
