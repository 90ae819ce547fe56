"""Runtime preparation: one named pass sequence per runtime, called once by the runtimes, and reported."""

from __future__ import annotations

import numpy as np
import pytest

from neurorewrite.api import expand
from neurorewrite.errors import InvalidOptionError
from neurorewrite.passes.prepare import prepare_for_runtime, preparation_steps
from neurorewrite.runtime.ort import ort_session
from tests.builders import mlp_model
from tests.conftest import run_model


@pytest.fixture(scope="module")
def sparse_fpe(tmp_path_factory):
    path = tmp_path_factory.mktemp("prepare") / "m.fpe.onnx"
    model, _ = expand(mlp_model(d=12, h=10, o=4), alpha=4, format="sparse", output=path)
    return model, path


def test_the_sequences_by_runtime() -> None:
    assert [name for name, _ in preparation_steps("onnxruntime")] == [
        "fold tied children", "fold constant children", "sparse to standard ops (densify)"]
    assert [name for name, _ in preparation_steps("onnxruntime", "gather")][-1] == "sparse to standard ops (gather)"
    assert [name for name, _ in preparation_steps("tvm")] == ["fold tied children", "fold constant children"]
    with pytest.raises(InvalidOptionError, match="runtime must be one of"):
        preparation_steps("tflite")
    with pytest.raises(InvalidOptionError, match="sparse method"):
        preparation_steps("onnxruntime", "bsr")


def test_ort_session_prepares_once_and_reports(sparse_fpe) -> None:
    model, path = sparse_fpe
    before = path.read_bytes()
    session = ort_session(path, providers=["CPUExecutionProvider"])
    report = session.neurorewrite_preparation
    assert report.steps == ["fold tied children", "fold constant children", "sparse to standard ops (densify)"]
    assert report.folded and report.folded[0]["parent_nonzeros"] * 4 <= report.folded[0]["nonzeros"]
    assert path.read_bytes() == before, "loading a model must not rewrite its file"
    x = np.random.default_rng(0).standard_normal((5, 12)).astype(np.float32)
    dense, _ = expand(mlp_model(d=12, h=10, o=4), alpha=4)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], run_model(dense, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_a_standard_model_passes_through(sparse_fpe) -> None:
    plain = mlp_model()
    prepared, report = prepare_for_runtime(plain, "onnxruntime")
    assert prepared is plain and not report.modified
    assert not ort_session(plain, providers=["CPUExecutionProvider"]).neurorewrite_preparation.steps


def test_preparation_leaves_its_input_alone(sparse_fpe) -> None:
    model, _ = sparse_fpe
    before = model.SerializeToString()
    prepared, report = prepare_for_runtime(model, "onnxruntime", "gather")
    assert model.SerializeToString() == before and prepared is not model
    assert not any(n.domain == "ai.neurorewrite" for n in prepared.graph.node)
    assert all(o.domain != "ai.neurorewrite" for o in prepared.opset_import)


def test_a_dense_fpe_file_is_lowered_to_sparse_and_folded_at_load(tmp_path) -> None:
    """The format expand writes by default: both runtimes lower it to sparse first, so the folds apply and the
    zeros of the widened layers are not multiplied; the function is the dense file's. A grouped file and a
    model without a record are not touched."""
    path = tmp_path / "m.fpe.onnx"
    dense, _ = expand(mlp_model(d=12, h=10, o=4), alpha=4, output=path)
    before = path.read_bytes()
    session = ort_session(path, providers=["CPUExecutionProvider"])
    assert session.neurorewrite_preparation.steps == [
        "dense FPE layers to sparse", "fold tied children", "fold constant children", "sparse to standard ops (densify)"]
    assert path.read_bytes() == before
    x = np.random.default_rng(0).standard_normal((5, 12)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], run_model(dense, {"x": x})[0], rtol=1e-5, atol=1e-5)
    prepared, report = prepare_for_runtime(dense, "tvm")
    assert report.steps[0] == "dense FPE layers to sparse" and report.folded
    assert any(n.domain == "ai.neurorewrite" for n in prepared.graph.node)
    grouped, _ = expand(mlp_model(d=12, h=10, o=4), alpha=4, split="blocks", format="grouped")
    same, report = prepare_for_runtime(grouped, "onnxruntime")
    assert same is grouped and not report.modified
