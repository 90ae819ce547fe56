"""`convert` (API and CLI): an expanded dense model, calibrated or trained after expand, stored in another
format computes the same outputs in onnxruntime with the same stored nonzeros; `expand` refuses a model it
already expanded, and `convert` refuses one it did not expand or did not store dense."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import neurorewrite
from neurorewrite.errors import InvalidOptionError
from neurorewrite.rewriter.record import read_record
from neurorewrite.runtime.ort import ort_session
from tests.builders import mlp_model
from tests.passes.test_calibrate_lead import correlated
from tests.test_cli_expand import run_cli


def calibrated_dense(split: str = "tiered") -> onnx.ModelProto:
    """A dense expanded file whose weights are no longer the expansion's (the calibration changed them)."""
    model, report = neurorewrite.expand(mlp_model(d=6, h=8, o=3, seed=3), alpha=4, split=split,
                                        calibrate={"x": correlated(300, d=6, seed=2)})
    assert report.calibration and read_record(model).format == "dense"
    return model


@pytest.fixture(scope="module")
def calibrated() -> onnx.ModelProto:
    return calibrated_dense()


def outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort_session(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("fmt", ["sparse", "grouped"])
def test_a_converted_model_computes_what_the_dense_one_computes(fmt: str) -> None:
    calibrated = calibrated_dense("tiered" if fmt == "sparse" else "blocks")  # grouped: one input partition
    before = calibrated.SerializeToString()
    new, report = neurorewrite.convert(calibrated, fmt)
    assert calibrated.SerializeToString() == before  # the input is not modified
    assert report.format == read_record(new).format == fmt and report.layers
    x = correlated(40, d=6, seed=9)
    np.testing.assert_allclose(outputs(new, x), outputs(calibrated, x), rtol=1e-5, atol=1e-6)
    assert [b.nnz_after for b in read_record(new).blocks] == [b.nnz_after for b in read_record(calibrated).blocks]


def test_expand_refuses_an_expanded_model_and_convert_refuses_others(calibrated: onnx.ModelProto) -> None:
    with pytest.raises(InvalidOptionError, match="already expanded by neurorewrite .alpha 4, format dense.*convert"):
        neurorewrite.expand(calibrated, alpha=4)
    with pytest.raises(InvalidOptionError, match="carries no FPE record"):
        neurorewrite.convert(mlp_model(d=6, h=8, o=3), "sparse")
    sparse, _ = neurorewrite.convert(calibrated, "sparse")
    with pytest.raises(InvalidOptionError, match="stored as sparse; convert reads the dense format only"):
        neurorewrite.convert(sparse, "grouped")


def test_convert_from_the_command_line(capsys, tmp_path, calibrated: onnx.ModelProto) -> None:
    dense = tmp_path / "model.fpe.onnx"
    onnx.save_model(calibrated, str(dense))
    code, out, err = run_cli(capsys, "convert", dense, "--format", "sparse")
    assert code == 0, err
    written = tmp_path / "model.fpe.sparse.onnx"
    assert written.is_file() and "csr" in out and f"wrote {written}" in out
    x = correlated(10, d=6, seed=4)
    np.testing.assert_allclose(outputs(onnx.load(str(written)), x), outputs(calibrated, x), rtol=1e-5, atol=1e-6)
    code, out, err = run_cli(capsys, "convert", dense, "--format", "sparse", "--json", "-o", tmp_path / "s.onnx")
    assert code == 0 and json.loads(out)["format"] == "sparse" and json.loads(out)["layers"], err
    code, out, err = run_cli(capsys, "convert", dense, "--format", "grouped", "-o", tmp_path / "g.onnx")
    assert code == 2 and "needs one input partition" in err and not (tmp_path / "g.onnx").exists()
    code, out, err = run_cli(capsys, "expand", dense, "--alpha", "4")
    assert code == 2 and not out and err.count("\n") == 1 and "neurorewrite convert" in err


def test_convert_refuses_to_write_over_its_input(capsys, tmp_path, calibrated: onnx.ModelProto) -> None:
    dense = tmp_path / "model.fpe.onnx"
    onnx.save_model(calibrated, str(dense))
    before = dense.read_bytes()
    code, out, err = run_cli(capsys, "convert", dense, "--format", "sparse", "-o", dense)
    assert code == 2 and err.count("\n") == 1 and dense.read_bytes() == before
